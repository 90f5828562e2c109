"""The OCR service on LitServe: API server processes in front of inference worker processes.

    python -m benchmarks.peers.litserve_app --port 8000 --workers 2

LitServe's API servers (uvicorn + FastAPI, one per inference worker by default) put
each request on a queue; each inference worker process runs ``decode_request``,
``predict`` and ``encode_response`` for one request at a time.

Why LitServe's own batching (``max_batch_size > 1``) is not used: it batches whole
requests, handing ``predict`` a list of images, while this service is a pipeline of
three models with image work between them, and its inputs differ in size (the detector
sees each page at its own resolution, the recogniser one tensor per group of text
lines). Batching requests would mean running the pipeline image by image inside one
``predict`` (no gain, plus ``batch_timeout`` of waiting), or rewriting the service stage
by stage with padding, which changes its code and, for the detector, its answers.
splitserve batches per model inside the pipeline instead; that is the difference under test.
"""

# No ``from __future__ import annotations`` here: LitServe reads decode_request's and
# encode_response's annotations at run time to build the FastAPI route.
import argparse
import sys
from typing import Annotated, Any

import litserve as ls
from fastapi import Body, Response

from benchmarks.peers.common import (
    DEFAULT_CONTENT_TYPE,
    ROUTE,
    load_ocr,
    parse_threads,
    reply_headers,
)
from splitserve.replies import Reply


class OCRLitAPI(ls.LitAPI):
    """The service in a LitAPI: the raw body in, the service's JSON bytes out, unchanged."""

    def __init__(self, engine_threads: int | None, info_dir: str | None) -> None:
        super().__init__(api_path=ROUTE, max_batch_size=1)
        self.engine_threads = engine_threads
        self.info_dir = info_dir
        self.service: Any = None

    def setup(self, device: str) -> None:
        self.service = load_ocr("litserve", self.engine_threads, self.info_dir)

    # The annotation makes FastAPI hand over the raw body (not parsed JSON).
    def decode_request(
        self, request: Annotated[bytes, Body(media_type=DEFAULT_CONTENT_TYPE)]
    ) -> bytes:
        return request

    def predict(self, x: bytes) -> Reply:
        return self.service.call(x, DEFAULT_CONTENT_TYPE)

    def encode_response(self, output: Reply) -> Response:
        return Response(
            output.body,
            status_code=output.status,
            media_type=output.content_type,
            headers=reply_headers(output),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2, help="inference worker processes")
    parser.add_argument("--engine-threads", default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--info-dir", default=None)
    args = parser.parse_args(argv)
    api = OCRLitAPI(parse_threads(args.engine_threads), args.info_dir)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    # Run under the module's importable name, so the LitAPI pickles by reference.
    from benchmarks.peers import litserve_app

    sys.exit(litserve_app.main())
