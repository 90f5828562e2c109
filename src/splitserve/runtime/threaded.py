"""Threaded mode: the classic design, kept as the baseline of every comparison.

One process; each request runs preprocess, inference and postprocess in a thread of a
pool, the models shared by all threads and run one request at a time (no cross-request
batching). The same Service class and the same HTTP layer as split mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from splitserve.config import ServerConfig
from splitserve.engines.base import Engine, create_engine
from splitserve.errors import DeadlineExceeded, NotFound, Overloaded
from splitserve.protocol.rest import create_app, describe_services, serve_app
from splitserve.runtime.batcher import stack_padded
from splitserve.runtime.invoke import Reply, invoke_service
from splitserve.runtime.process import check_port_free, configure_logging
from splitserve.service import Request, Service, Tensors

log = logging.getLogger("splitserve.threaded")


class ThreadedDispatcher:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        classes = cfg.load_services()
        self.catalogue = describe_services(classes)
        self.services: dict[str, Service] = {}
        self.engines: dict[str, tuple[Engine, int]] = {}
        threads = cfg.engine_threads or None  # None: the backend's default (all cores)
        for name, cls in classes.items():
            for model_name, model in cls.declared_models().items():
                engine = create_engine(model, cls.model_path(model), threads=threads)
                engine.infer(engine.warmup_batch())
                limit = min(model.max_batch_size, engine.max_batch_size or model.max_batch_size)
                self.engines[f"{name}/{model_name}"] = (engine, limit)
            service = cls()
            service.setup()
            self.services[name] = service
        self.pool = ThreadPoolExecutor(cfg.threads, thread_name_prefix="request")
        self._local = threading.local()
        self._admitted = 0
        self._lock = threading.Lock()

    def ready(self) -> bool:
        return True  # built only after every model loaded and warmed up

    def _infer_fn(self, service: str):
        async def infer(model: str, inputs: Mapping[str, np.ndarray]) -> Tensors:
            entry = self.engines.get(f"{service}/{model}")
            if entry is None:
                raise NotFound(f"service {service!r} declares no model {model!r}")
            engine, limit = entry
            engine.check_inputs(inputs)
            rows = next(iter(inputs.values())).shape[0]
            if rows <= limit:
                return engine.infer(inputs)
            chunks = [
                engine.infer({k: v[i : i + limit] for k, v in inputs.items()})
                for i in range(0, rows, limit)
            ]
            return {k: stack_padded([c[k] for c in chunks]) for k in chunks[0]}

        return infer

    def _run(self, service: str, request: Request) -> Reply:
        loop = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
        started = time.monotonic()
        reply = loop.run_until_complete(
            invoke_service(self.services[service], request, self._infer_fn(service))
        )
        reply.timings["worker_ms"] = (time.monotonic() - started) * 1000
        return reply

    async def dispatch(
        self, service: str, body: bytes, content_type: str, headers: dict[str, str], deadline: float
    ) -> Reply:
        with self._lock:
            if self._admitted >= self.cfg.threads + self.cfg.queue_size:
                raise Overloaded(
                    f"all {self.cfg.threads} threads busy and {self.cfg.queue_size} requests queued"
                )
            self._admitted += 1
        request = Request(body, content_type, headers, self.cfg.max_image_pixels)
        future = asyncio.wrap_future(self.pool.submit(self._run, service, request))
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.shield(future), deadline - time.monotonic())
        except TimeoutError:
            raise DeadlineExceeded("the request did not finish before its deadline") from None

    def _release(self, _: object) -> None:
        with self._lock:
            self._admitted -= 1


def serve_threaded(cfg: ServerConfig) -> int:
    configure_logging(cfg.log_level)
    check_port_free(cfg.host, cfg.port)
    dispatcher = ThreadedDispatcher(cfg)
    log.info(
        "serving %s in threaded mode on http://%s:%d (%d threads)",
        ", ".join(cfg.services),
        cfg.host,
        cfg.port,
        cfg.threads,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        dispatcher.pool.shutdown(wait=False, cancel_futures=True)

    # uvicorn re-raises the signal that stopped it once it has shut down: make that a
    # normal exit, as in split mode.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))
    serve_app(create_app(dispatcher, cfg, dispatcher.catalogue, lifespan=lifespan), cfg)
    return 0
