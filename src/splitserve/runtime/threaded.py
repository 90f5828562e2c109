"""Threaded mode: the classic design, kept as the baseline of every comparison.

One process; each request runs preprocess, inference and postprocess in a thread of a
pool, the models shared by all threads and run one request at a time (no cross-request
batching). The same Service class and the same HTTP layer as split mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from splitserve.config import ServerConfig
from splitserve.errors import DeadlineExceeded, Overloaded, Unavailable
from splitserve.layout import Services
from splitserve.protocol import tracing
from splitserve.protocol.rest import create_app, serve_app
from splitserve.replies import Reply
from splitserve.runtime.inprocess import InProcessService, engine_stats
from splitserve.runtime.process import configure_logging
from splitserve.stats import EngineStats, FrontStats

log = logging.getLogger("splitserve.threaded")


class ThreadedDispatcher:
    mode = "threaded"

    def __init__(self, cfg: ServerConfig, services: Services, built: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.catalogue = services.catalogue()
        # engine_threads None: the backend's default (all cores), as a classic service has
        self.services = {}
        for name, cls in services.classes.items():
            models = services.models_of(name)
            self.services[name] = InProcessService(
                cls,
                engine_threads=cfg.engine_threads,
                max_image_pixels=cfg.max_image_pixels,
                artifacts={
                    m: Path(built[str(d.key)]) for m, d in models.items() if str(d.key) in built
                },
                models={m: d.model for m, d in models.items()},
            )
        self.pool = ThreadPoolExecutor(cfg.threads, thread_name_prefix="request")
        self._admitted = 0
        self._lock = threading.Lock()
        self.draining = False

    def ready(self) -> bool:
        return not self.draining  # built only after every model loaded and warmed up

    def begin_drain(self) -> None:
        self.draining = True

    def in_flight(self) -> int:
        return self._admitted

    def engine_stats(self) -> list[EngineStats]:
        return engine_stats(list(self.services.values()))

    def peer_stats(self) -> list[FrontStats]:
        return []  # one process: its counters are the server's

    async def dispatch(
        self,
        service: str,
        body: bytes,
        content_type: str,
        headers: dict[str, str],
        deadline: float,
        model: str = "",
    ) -> Reply:
        if self.draining:
            raise Unavailable("the server is shutting down; retry elsewhere")
        with self._lock:
            if self._admitted >= self.cfg.threads + self.cfg.queue_size:
                raise Overloaded(
                    f"all {self.cfg.threads} threads busy and {self.cfg.queue_size} requests queued"
                )
            self._admitted += 1
        arrived = time.monotonic()
        traced = tracing.recording()
        target = self.services[service]
        if model:
            work = functools.partial(target.call_model, model, body, deadline, traced)
        else:
            work = functools.partial(
                target.call, body, content_type, headers, deadline=deadline, traced=traced
            )
        future = asyncio.wrap_future(self.pool.submit(work))
        future.add_done_callback(self._release)
        try:
            reply = await asyncio.wait_for(asyncio.shield(future), deadline - time.monotonic())
        except TimeoutError:
            raise DeadlineExceeded("the request did not finish before its deadline") from None
        if traced:
            tracing.record_dispatch(service, model, arrived, reply)
        return reply

    def _release(self, _: object) -> None:
        with self._lock:
            self._admitted -= 1


def serve_threaded(cfg: ServerConfig, services: Services, built: Mapping[str, str]) -> int:
    """Serve the declared models (engines already built: see ``splitserve.cli``)."""
    configure_logging(cfg.log_level)
    dispatcher = ThreadedDispatcher(cfg, services, built)
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

    # uvicorn re-raises the signal that stopped it once it has drained and shut down:
    # make that a normal exit, as in split mode.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))
    app = create_app(dispatcher, cfg, dispatcher.catalogue, lifespan=lifespan)
    serve_app(app, cfg, dispatcher)
    return 0
