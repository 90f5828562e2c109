"""A service with its models loaded in this process, run synchronously per request.

The classic design's core: threaded mode serves it from a thread pool, and the peer
benchmarks wrap it in other frameworks' handlers, so every comparison runs the same
service code on the same engines.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from splitserve.engines.base import Engine, create_engine
from splitserve.errors import DeadlineExceeded, NotFound
from splitserve.layout import Declaration, resolve
from splitserve.replies import Reply, Stage, error_reply
from splitserve.runtime.batcher import stack_padded
from splitserve.runtime.invoke import invoke_model, invoke_service, job_stage
from splitserve.service import DEFAULT_MAX_IMAGE_PIXELS, Model, Request, Service, Tensors
from splitserve.spec import ModelKey
from splitserve.stats import EngineStats, ModelCounters, ModelStats


class InProcessService:
    """Load ``cls``'s models (and warm them up), set the service up, then ``call`` it.

    ``call`` is thread-safe: each thread gets its own event loop for ``handle``, and the
    engines are shared (ONNX Runtime sessions may run concurrently). No cross-request
    batching: a request's inference runs on its own, in chunks of the model's limit.

    ``artifacts`` replaces model files by name (built engines: see splitserve.compile);
    ``models`` replaces the class's declarations (a config file's overrides);
    ``observe`` sees every model's inputs before they run (calibration capture).
    """

    def __init__(
        self,
        cls: type[Service],
        *,
        engine_threads: int | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        artifacts: Mapping[str, Path] | None = None,
        models: Mapping[str, Model] | None = None,
        observe: Callable[[str, Mapping[str, np.ndarray]], None] | None = None,
    ) -> None:
        self.name = cls.service_name()
        self.max_image_pixels = max_image_pixels
        self.observe = observe
        self.engines: dict[str, tuple[Engine, int, ModelCounters]] = {}
        artifacts = artifacts or {}
        for model_name, model in (models or cls.declared_models()).items():
            key = ModelKey(self.name, model_name)
            spec = resolve(Declaration(key, cls, model), artifacts.get(model_name), engine_threads)
            engine = create_engine(spec)
            engine.run_batch(engine.warmup_batch())
            limit = min(model.max_batch_size, engine.max_batch_size or model.max_batch_size)
            counters = ModelCounters(model.backend, engine.simulated, engine.inputs, engine.outputs)
            self.engines[model_name] = (engine, limit, counters)
        self.service = cls()
        self.service.setup()
        self._local = threading.local()
        self.started = time.monotonic()

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray]) -> Tensors:
        entry = self.engines.get(model)
        if entry is None:
            raise NotFound(f"service {self.name!r} declares no model {model!r}")
        engine, limit, counters = entry
        engine.check_inputs(inputs)
        rows = next(iter(inputs.values())).shape[0]
        chunks = []
        called = time.monotonic()
        stages = getattr(self._local, "stages", None)  # a traced request's
        computes: list[Stage] = []
        for start in range(0, rows, limit):
            chunk = {k: v[start : start + limit] for k, v in inputs.items()}
            if self.observe is not None:  # what the engine runs: batches within its limit
                self.observe(model, chunk)
            began = time.monotonic()
            chunks.append(engine.run_batch(chunk))
            ended = time.monotonic()
            size = min(limit, rows - start)
            counters.record(size, ended - began, 0.0)
            if stages is not None:
                sizes = {"splitserve.batch_size": size, "splitserve.rows": size}
                computes.append(Stage("engine.compute", began, ended, sizes))
        if stages is not None:
            key = {"splitserve.model": str(ModelKey(self.name, model))}
            stages.append(Stage("infer", called, time.monotonic(), key, computes))
        if counters.simulated:
            self._local.simulated = True
        if len(chunks) == 1:
            return chunks[0]
        return {k: stack_padded([c[k] for c in chunks]) for k in chunks[0]}

    def call(
        self,
        body: bytes,
        content_type: str = "application/octet-stream",
        headers: Mapping[str, str] | None = None,
        *,
        deadline: float | None = None,
        traced: bool = False,
    ) -> Reply:
        """The service's reply to one request, computed in the calling thread.

        It blocks, so it must not run on a thread whose event loop is running (an async
        framework's handler): hand it to an executor there. A request whose ``deadline``
        (time.monotonic()) passed before it started is answered 504 without running. A
        ``traced`` request's reply carries its stages (``Reply.stages``).
        """
        request = Request(body, content_type, headers, self.max_image_pixels)
        return self._run(invoke_service(self.service, request, self.infer), deadline, traced)

    def call_model(
        self, model: str, body: bytes, deadline: float | None = None, traced: bool = False
    ) -> Reply:
        """One engine model called directly: a tensor bundle in and out (see ``call``)."""
        return self._run(invoke_model(model, body, self.infer), deadline, traced, direct=True)

    def _run(
        self,
        work: Coroutine[Any, Any, Reply],
        deadline: float | None,
        traced: bool = False,
        direct: bool = False,
    ) -> Reply:
        if asyncio._get_running_loop() is not None:
            work.close()
            raise RuntimeError(
                "InProcessService.call blocks: call it from a worker thread (e.g. "
                "loop.run_in_executor), not from a running event loop"
            )
        started = time.monotonic()
        if deadline is not None and started >= deadline:
            work.close()
            return error_reply(DeadlineExceeded("deadline passed before the request started"))
        loop = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
        self._local.simulated = False
        calls: list[Stage] | None = [] if traced else None
        self._local.stages = calls
        try:
            reply = loop.run_until_complete(work)
        finally:
            self._local.stages = None
        ended = time.monotonic()
        reply.timings["worker_ms"] = (ended - started) * 1000
        if self._local.simulated:
            reply.timings["simulated_accelerator"] = 1
        if calls is not None:
            where = {"thread.name": threading.current_thread().name}
            stage = job_stage(self.service, reply, started, ended, calls, where, direct=direct)
            reply.stages = [stage]
        return reply

    def model_stats(self) -> dict[str, ModelStats]:
        return {
            str(ModelKey(self.name, m)): entry[2].snapshot() for m, entry in self.engines.items()
        }


def engine_stats(services: list[InProcessService]) -> list[EngineStats]:
    """This process as the one 'engine' of ``/v1/stats``."""
    models: dict[str, ModelStats] = {}
    for service in services:
        models.update(service.model_stats())
    uptime = time.monotonic() - min((s.started for s in services), default=time.monotonic())
    return [EngineStats(0, os.getpid(), uptime, models)]
