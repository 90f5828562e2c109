"""The OCR service as a BentoML 1.4 service, served by ``bentoml serve`` on 127.0.0.1.

    python -m benchmarks.peers.bentoml_app --port 8000 --workers 2 --threads 1

``main`` puts the settings into the environment (the module is imported again in every
worker process, which reads them there) and replaces itself with
``bentoml serve benchmarks.peers.bentoml_app:OCR`` (same pid, so stopping it by pid
stops BentoML's arbiter, which stops its workers).

BentoML's best documented CPU configuration for a model that runs synchronously:
``workers`` processes (each loads the models; the docs' rule is one per core for
CPU-bound work, ``"cpu_count"``), each running the sync API on ``threads`` threads
(BentoML's default is 1: one request computed at a time per worker, the rest wait on
its event loop), access logs off as for every other peer. Adaptive batching
(``@bentoml.api(batchable=True)``) is not used for the reason litserve_app.py gives: it
batches whole requests, while this service is a pipeline of three models over images
of different sizes.

The request is the one BentoML documents (and its own client sends) for a file input:
``multipart/form-data`` with one part, ``image``, holding the encoded image
(``multipart_request``, built once per image by run_peers.py). BentoML parses it,
stores the part in a temporary file and hands the API its ``Path``; that work is
BentoML's way of taking a file and counts in its numbers. The answer is the service's
reply unchanged (a Starlette ``Response``: status, JSON body and
``X-Splitserve-Timings``), not re-encoded through a pydantic model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import bentoml
from starlette.responses import Response

from benchmarks.peers.common import (
    DEFAULT_CONTENT_TYPE,
    INFO_DIR_ENV,
    ROUTE,
    load_ocr,
    parse_threads,
    reply_headers,
)

WORKERS_ENV = "SPLITSERVE_BENTOML_WORKERS"
THREADS_ENV = "SPLITSERVE_BENTOML_THREADS"
ENGINE_THREADS_ENV = "SPLITSERVE_BENTOML_ENGINE_THREADS"
FIELD = "image"
BOUNDARY = "splitserve-peer-boundary"
TIMEOUT_S = 300  # a request may wait behind many others at high concurrency


def multipart_request(image: bytes, filename: str = "image.jpg") -> tuple[bytes, str]:
    """(body, content type): ``image`` as the one file part of a multipart form."""
    head = (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="{FIELD}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + image + f"\r\n--{BOUNDARY}--\r\n".encode(), (
        f"multipart/form-data; boundary={BOUNDARY}"
    )


@bentoml.service(
    name="ocr",
    workers=int(os.environ.get(WORKERS_ENV, "1")),
    threads=int(os.environ.get(THREADS_ENV, "1")),
    traffic={"timeout": TIMEOUT_S},
    logging={"access": {"enabled": False}},
)
class OCR:
    """One BentoML worker: the service, loaded once, answering ``POST ROUTE``."""

    def __init__(self) -> None:
        self.service = load_ocr("bentoml", parse_threads(os.environ.get(ENGINE_THREADS_ENV)))

    @bentoml.api(route=ROUTE)
    def ocr(self, image: Path) -> Any:
        reply = self.service.call(image.read_bytes(), DEFAULT_CONTENT_TYPE)
        return Response(
            reply.body,
            status_code=reply.status,
            media_type=reply.content_type,
            headers=reply_headers(reply),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="API threads per worker")
    parser.add_argument("--engine-threads", default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--info-dir", default=None)
    parser.add_argument("--temp-dir", default=None, help="BENTOML_HOME (absolute)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be >= 1")
    os.environ[WORKERS_ENV] = str(args.workers)
    os.environ[THREADS_ENV] = str(args.threads)
    os.environ[ENGINE_THREADS_ENV] = str(args.engine_threads or "none")
    if args.info_dir:
        os.environ[INFO_DIR_ENV] = args.info_dir
    if args.temp_dir:
        os.environ["BENTOML_HOME"] = str(Path(args.temp_dir) / "bentoml")
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"  # no usage reports
    bentoml_cli = shutil.which("bentoml", path=str(Path(sys.executable).parent))
    if bentoml_cli is None:
        parser.error(f"no bentoml command beside {sys.executable}: pip install 'bentoml>=1.4'")
    repo = str(Path(__file__).resolve().parent.parent.parent)
    os.execv(
        bentoml_cli,
        [
            *(bentoml_cli, "serve", "benchmarks.peers.bentoml_app:OCR"),
            *("--working-dir", repo, "--host", "127.0.0.1", "--port", str(args.port)),
        ],
    )
    return 1  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
