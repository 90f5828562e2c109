"""The OCR service on NVIDIA Triton Inference Server through PyTriton (CPU, Python model).

    .venv-triton/bin/python -m benchmarks.peers.triton_app --port 8000 --grpc-port 8001 \\
        --metrics-port 8002 --instances 2

It runs in its own virtual environment (``make peers-venvs`` builds ``.venv-triton``
with a Python 3.12 that has a shared libpython): ``nvidia-pytriton`` pins ``numpy<2``
and ships the ``tritonserver`` binary with Python-backend stubs that link libpython;
this module puts the interpreter's ``LIBDIR`` on ``LD_LIBRARY_PATH`` before Triton
starts, so the stubs find it.

How it serves: ``tritonserver`` (a C++ process) answers HTTP (KServe v2), gRPC and
metrics, all bound to 127.0.0.1 here. The model ``ocr`` is PyTriton's proxy Python
model: each model instance is a Python-backend stub process that hands each request
to this process (ZeroMQ messages, tensors in shared memory), where the instance's infer
function runs ``InProcessService(OCRService).call`` on a thread of its own. The
instances share one service (``call`` is thread-safe and ONNX Runtime sessions run
concurrently), like the threads of gunicorn's gthread worker.

Its best documented configuration for this workload:

- no batching (``ModelConfig(batching=False)``): Triton's dynamic batcher stacks
  requests of equal shape into one tensor, while here one request is a whole pipeline of
  three models over an encoded image of its own size; batching requests would mean
  running the pipeline image by image inside one call (see litserve_app.py);
- ``--instances`` model instances (Triton's ``instance_group`` count, KIND_CPU): the
  number of requests computed at once; Triton queues the rest in its scheduler;
- ONNX Runtime intra-op threads as every peer gets them (``--engine-threads``; its
  default uses all cores);
- ``strict=False`` (PyTriton does not re-check the outputs against the model config)
  and one BYTES input (the encoded image) and one BYTES output (the service's JSON).

The request is Triton's native one, with no shim in front: a KServe v2 inference
request with the binary tensor extension (``kserve_request``), which run_peers.py builds
once per image, so the load generator sends pre-built bytes to
``POST /v2/models/ocr/infer`` as for every other server; the answer is the service's JSON
as a binary output tensor (``kserve_answer`` unwraps it to check it). What Triton cannot
send: the reply's own HTTP status and ``X-Splitserve-Timings`` (its answers are
tensors); a service error (status >= 400) is raised, and Triton answers it 500 with the
service's message inside its own. SIGINT or SIGTERM stops Triton, its stubs and this
process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
import sysconfig
from pathlib import Path
from typing import Any

MODEL = "ocr"
INPUT = "image"
OUTPUT = "reply"
INFER_ROUTE = f"/v2/models/{MODEL}/infer"
# The model's readiness: the server's own (/v2/health/ready) is true before PyTriton has
# loaded the model (Triton starts with none, in explicit model control).
HEALTH = f"/v2/models/{MODEL}/ready"
HEADER_LENGTH = "Inference-Header-Content-Length"
# Each model instance's stub waits only 1 s (hard-coded in PyTriton) for this process's
# handshake socket; on a machine busy with other work that can pass, and the model fails
# to load. Triton is then started afresh, up to this many times in all.
LOAD_ATTEMPTS = 3


def kserve_request(image: bytes) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 request with one BYTES tensor in the binary extension: (body, headers).

    The body is the JSON header followed by the tensor's bytes (each BYTES element is a
    4-byte little-endian length then its bytes); ``Inference-Header-Content-Length``
    tells Triton where the JSON ends. The output is asked for in binary too.
    """
    tensor = struct.pack("<I", len(image)) + image
    header = {
        "inputs": [
            {
                "name": INPUT,
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(tensor)},
            }
        ],
        "outputs": [{"name": OUTPUT, "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + tensor, {HEADER_LENGTH: str(len(head))}


def kserve_answer(body: bytes, header_length: int | None) -> bytes:
    """The service's JSON out of Triton's answer (binary output, or JSON when the
    header length is absent); raises ValueError on an answer without that output."""
    if header_length is None:
        doc = json.loads(body)
        outputs = {o["name"]: o for o in doc.get("outputs", [])}
        if OUTPUT not in outputs:
            raise ValueError(f"no {OUTPUT!r} output in {doc}")
        return outputs[OUTPUT]["data"][0].encode()
    doc = json.loads(body[:header_length])
    offset = header_length
    for output in doc.get("outputs", []):
        size = int(output.get("parameters", {}).get("binary_data_size", 0))
        if output["name"] == OUTPUT:
            (length,) = struct.unpack_from("<I", body, offset)
            return bytes(body[offset + 4 : offset + 4 + length])
        offset += size
    raise ValueError(f"no {OUTPUT!r} output in {doc}")


def make_infer_function(service: Any) -> Any:
    """An infer function for one model instance: the image in, the service's JSON out.

    PyTriton runs an instance's infer function on that instance's own event loop, and a
    blocking function blocks the loop (one request at a time per instance, as Triton
    means it). ``InProcessService.call`` refuses to run where a loop is running (it
    runs the service on a loop of its own), so it runs on one thread kept for the
    instance, as ray_app.py does.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from pytriton.exceptions import PyTritonBadParameterError

    from benchmarks.peers.common import DEFAULT_CONTENT_TYPE

    compute = ThreadPoolExecutor(1, thread_name_prefix="ocr")

    async def infer(requests: list[Any]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        answers = []
        for request in requests:  # without batching, one request per call
            image = bytes(request[INPUT].reshape(-1)[0])
            reply = await loop.run_in_executor(compute, service.call, image, DEFAULT_CONTENT_TYPE)
            if reply.status >= 400:
                message = bytes(reply.body).decode(errors="replace")
                raise PyTritonBadParameterError(f"{reply.status}: {message}")
            answers.append({OUTPUT: np.array([bytes(reply.body)], dtype=np.object_)})
        return answers

    return infer


def _libpython_on_library_path() -> None:
    """Triton's Python-backend stub links libpython: let it find this interpreter's."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(os.pathsep):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, current]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="HTTP port (KServe v2)")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--instances", type=int, default=2, help="model instances (at once)")
    parser.add_argument("--engine-threads", default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--info-dir", default=None)
    parser.add_argument("--temp-dir", default=None, help="PyTriton's workspace (absolute)")
    args = parser.parse_args(argv)
    if args.instances < 1:
        parser.error("--instances must be >= 1")
    _libpython_on_library_path()

    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig
    from tritonclient.utils import InferenceServerException

    from benchmarks.peers.common import load_ocr, parse_threads

    service = load_ocr("triton", parse_threads(args.engine_threads), args.info_dir)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        strict_readiness=True,
        log_verbose=0,
    )
    workspace = Path(args.temp_dir) / "pytriton" if args.temp_dir else None
    # serve() returns on SIGINT (KeyboardInterrupt); SIGTERM is made to do the same.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    infer_functions = [make_infer_function(service) for _ in range(args.instances)]
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        try:
            with Triton(config=config, workspace=workspace and workspace / str(attempt)) as triton:
                triton.bind(
                    model_name=MODEL,
                    infer_func=infer_functions,
                    inputs=[Tensor(name=INPUT, dtype=bytes, shape=(1,))],
                    outputs=[Tensor(name=OUTPUT, dtype=bytes, shape=(1,))],
                    config=ModelConfig(batching=False),
                    strict=False,
                )
                print(f"triton ready on http://127.0.0.1:{args.port}{INFER_ROUTE}", flush=True)
                triton.serve()
            break
        except InferenceServerException as exc:  # the model failed to load
            if attempt == LOAD_ATTEMPTS:
                raise
            print(f"loading the model failed (attempt {attempt}), again: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
