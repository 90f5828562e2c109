"""What every peer app shares: the route, the service and a record of its thread settings.

Each serving process builds the service with ``load_ocr`` and, once its models are loaded
and warmed up, writes ``info-PID.json`` into the folder ``run_peers.py`` names. That file
is both the readiness signal (a multi-process peer is ready when every process wrote one,
gunicorn's master answers before its workers have loaded anything) and the record of the
thread settings each framework really ran with (Ray, for one, sets ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.bench import loadgen
from splitserve.bench.bodies import Payload
from splitserve.replies import TIMINGS_HEADER, Reply, timings_header
from splitserve.runtime.inprocess import InProcessService

ROUTE = "/v1/services/ocr"
HEALTH = "/health/ready"
INFO_DIR_ENV = "SPLITSERVE_PEER_INFO_DIR"
DEFAULT_CONTENT_TYPE = "application/octet-stream"


def parse_threads(value: str | None) -> int | None:
    """``--engine-threads`` as given on a command line: a count, or none/0 for the default."""
    if value is None or value.strip().lower() in ("", "none", "0", "default"):
        return None
    threads = int(value)
    if threads < 0:
        raise ValueError(f"engine threads must be >= 0, got {threads}")
    return threads


def thread_settings() -> dict[str, Any]:
    """This process's thread-related settings, as the service sees them."""
    import cv2
    import onnxruntime

    return {
        "pid": os.getpid(),
        "cv2_threads": cv2.getNumThreads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        # Threads alive after the models loaded: ONNX Runtime's intra-op pool shows here.
        "process_threads": len(os.listdir("/proc/self/task")),
        "onnxruntime": onnxruntime.__version__,
    }


def load_ocr(
    framework: str, engine_threads: int | None, info_dir: str | os.PathLike[str] | None = None
) -> InProcessService:
    """The OCR service with its three models in this process, then the info file."""
    from examples.ocr.service import OCRService

    service = InProcessService(OCRService, engine_threads=engine_threads)
    folder = info_dir if info_dir is not None else os.environ.get(INFO_DIR_ENV)
    if folder:
        info = {"framework": framework, "engine_threads": engine_threads, **thread_settings()}
        path = Path(folder) / f"info-{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)  # atomic: a reader never sees half a file
    return service


def reply_headers(reply: Reply) -> dict[str, str]:
    """The reply's own headers plus ``X-Splitserve-Timings`` as splitserve's front sends it,
    so the load generator sees each peer's time inside the service (``worker_ms``)."""
    headers = dict(reply.headers)
    if reply.timings:
        headers[TIMINGS_HEADER] = timings_header(reply.timings)
    return headers


@dataclass(frozen=True)
class HeaderPayload(Payload):
    """A request body sent with headers beyond Content-Type (Triton's KServe v2 binary
    request needs ``Inference-Header-Content-Length``)."""

    headers: tuple[tuple[str, str], ...] = ()


@contextlib.contextmanager
def payload_headers() -> Iterator[None]:
    """While open, the load generator's aiohttp client also sends each
    ``HeaderPayload``'s headers (its own headers are Content-Type only).

    The load generator builds each client's per-body headers once, before the load
    starts; this wraps its client factory to add the extra ones there, so the load loop
    itself is unchanged and costs the same per request. Only the aiohttp client (the one
    run_peers.py uses) is supported; the raw client builds its request bytes elsewhere.
    """
    original = loadgen._client_factory

    def factory(url: str, payloads: list[Payload], client: str, *args: Any) -> Any:
        make = original(url, payloads, client, *args)
        extra = [dict(getattr(p, "headers", ())) for p in payloads]
        if not any(extra):
            return make
        if client != "aiohttp":
            raise ValueError(f"extra request headers need the aiohttp client, not {client!r}")

        def make_with_headers() -> Any:
            conn = make()
            conn.headers = [{**own, **more} for own, more in zip(conn.headers, extra, strict=True)]
            return conn

        return make_with_headers

    loadgen._client_factory = factory
    try:
        yield
    finally:
        loadgen._client_factory = original
