"""The engine process: loads models, batches requests from CPU workers, runs inference.

Threads:
- the I/O thread (the process's main thread) runs an asyncio loop that accepts the CPU
  workers' connections, decodes and validates requests, queues them in the model's
  ``Batcher`` and handles ``Release`` messages;
- one thread per model waits for batches and runs them, then hands each reply back to
  the loop (``call_soon_threadsafe``). ONNX Runtime (like TensorRT and PyTorch) releases
  the GIL while it computes, so the loop keeps receiving and the next batch fills up
  during the current one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from splitserve.config import ServerConfig
from splitserve.engines.base import Engine, create_engine
from splitserve.errors import (
    BadRequest,
    Cancelled,
    DeadlineExceeded,
    NotFound,
    ServiceError,
    error_status_and_kind,
)
from splitserve.replies import Stage
from splitserve.runtime import channel as chan
from splitserve.runtime import messages as msg
from splitserve.runtime.batcher import Batch, Batcher, PendingRequest
from splitserve.runtime.control import ControlSender, report_ready
from splitserve.runtime.process import become_child, exit_now, on_exit, run_loop
from splitserve.runtime.rundir import RunDir
from splitserve.runtime.shm import ShmAttachments, ShmPool
from splitserve.runtime.transport import TransportError, pack_tensors, unpack_tensors
from splitserve.spec import ModelSpec
from splitserve.stats import ModelCounters

log = logging.getLogger("splitserve.engine")


@dataclass(frozen=True)
class ReplyTo:
    """Where an answer goes: the caller's connection and its request id (hashable: a
    cancel names the request it drops)."""

    channel: chan.Channel
    request_id: int


Deliver = Callable[[ReplyTo, list, list[str]], None]


class ModelRunner(threading.Thread):
    """Runs the batches of one model and hands the replies to the I/O thread."""

    def __init__(
        self,
        key: str,
        model: ModelSpec,
        engine: Engine,
        pool: ShmPool,
        deliver: Deliver,
        compute_slot: threading.Lock | None = None,
    ) -> None:
        super().__init__(name=f"model:{key}", daemon=True)
        self.key = key
        self.engine = engine
        own_limit = engine.max_batch_size
        max_batch = min(model.max_batch_size, own_limit) if own_limit else model.max_batch_size
        if own_limit and own_limit < model.max_batch_size:
            log.info(
                "%s: the model's batch axis is fixed at %d; batches are capped there",
                key,
                own_limit,
            )
        self.batcher = Batcher(
            max_batch,
            model.max_delay_ms / 1000.0,
            model.pad_axes,
            model.pad_value,
            pad_bucket=model.pad_bucket,
        )
        self.pool = pool
        self.deliver = deliver
        # Held while a batch computes on the host's cores (see EngineProcess).
        self.compute_slot = compute_slot if engine.on_host_cores else None
        self.counters = ModelCounters(
            model.backend, engine.simulated, engine.inputs, engine.outputs
        )
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()
        self.batcher.close()

    def run(self) -> None:
        """Serve batches until stopped. An error fails only the requests it touched: this
        thread must outlive any batch, since a silent death would stall the model."""
        while not self._stop.is_set():
            batch, expired = self.batcher.next_batch(timeout=0.5)
            for req in expired:
                self.send_error(req.key, DeadlineExceeded("deadline passed in the engine queue"))
            if batch is not None:
                try:
                    self.run_batch(batch)
                except Exception as exc:  # a bug of ours: fail the batch, keep serving
                    log.exception("%s: failed to answer a batch of %d", self.key, batch.size)
                    for req in batch.fail():
                        self.send_error(req.key, EngineFault(f"{type(exc).__name__}: {exc}"))

    def run_batch(self, batch: Batch) -> None:
        try:
            with self.compute_slot or contextlib.nullcontext():
                started = time.monotonic()
                outputs = self.engine.run_batch(batch.inputs)
            check_outputs(outputs, batch.size)
        except Exception as exc:
            log.warning("%s: inference failed on a batch of %d: %s", self.key, batch.size, exc)
            for req in batch.fail():
                self.send_error(req.key, exc)
            return
        finished = time.monotonic()
        infer_ms = (finished - started) * 1000
        queue_ms = sum((batch.formed - r.arrived) * 1000 for r in batch.requests)
        self.counters.record(batch.size, finished - started, queue_ms)
        for req, _, rows, _ in batch.parts:
            if req.stages is not None:
                self.trace(req, batch, rows, started, finished)
        for req in batch.complete(outputs):
            try:
                self.send_outputs(req, batch.formed, infer_ms, batch.size)
            except Exception as exc:  # e.g. an output dtype the transport refuses
                log.warning("%s: cannot send a reply: %s", self.key, exc)
                self.send_error(req.key, EngineFault(str(exc)))

    def trace(
        self, req: PendingRequest, batch: Batch, rows: int, started: float, finished: float
    ) -> None:
        """A traced request's stages in this batch: its wait in the queue (before its first
        batch), for the compute slot (CPU models), and the batch's compute."""
        assert req.stages is not None
        where = {"splitserve.model": self.key, "process.pid": os.getpid()}
        if not req.stages:
            req.stages.append(Stage("engine.queue", req.arrived, batch.formed, where))
        if self.compute_slot is not None:
            req.stages.append(Stage("engine.slot_wait", batch.formed, started, where))
        sizes = {"splitserve.batch_size": batch.size, "splitserve.rows": rows}
        req.stages.append(Stage("engine.compute", started, finished, {**where, **sizes}))

    def send_outputs(self, req: PendingRequest, formed: float, infer_ms: float, size: int) -> None:
        frames: list = []
        assert req.outputs is not None
        refs, segments = pack_tensors(req.outputs, frames, self.pool)
        header = msg.InferReply(
            req.key.request_id,
            refs,
            queue_ms=(formed - req.arrived) * 1000,
            infer_ms=infer_ms,
            batch_size=size,
            simulated=self.counters.simulated,
            stages=req.stages or [],
        )
        self.deliver(req.key, [msg.encode(header), *frames], segments)

    def send_error(self, key: ReplyTo, exc: BaseException) -> None:
        self.deliver(key, [error_header(key, exc)], [])


class EngineFault(ServiceError):
    """The engine ran the model but could not turn its result into an answer."""

    kind = "engine_error"


def check_outputs(outputs: dict, rows: int) -> None:
    """Every output needs the batch's rows along axis 0, or nobody can be answered."""
    for name, value in outputs.items():
        shape = getattr(value, "shape", None)
        if not shape or shape[0] != rows:
            raise EngineFault(
                f"model output {name!r} has shape {shape} for a batch of {rows} rows; "
                "outputs need the batch axis first"
            )


def error_header(key: ReplyTo, exc: BaseException) -> bytes:
    status, kind, message = error_status_and_kind(exc)
    error = msg.EngineError(status, kind, message)
    return msg.encode(msg.InferReply(key.request_id, error=error))


class EngineProcess:
    def __init__(
        self, cfg: ServerConfig, run: RunDir, index: int, models: dict[str, ModelSpec]
    ) -> None:
        self.cfg = cfg
        self.run = run
        self.index = index
        # As in a CPU worker: a pool for what this process sends, maps of what it reads.
        self.pool = ShmPool(run.supervisor_pid, cfg.shm_pool_bytes)
        on_exit(self.pool.close)
        self.attachments = ShmAttachments()
        # Output segments each connection still reads; freed by Release or on close.
        self.lent: dict[chan.Channel, set[str]] = {}
        # The jobs each connected worker may hold: a bound on the requests in flight.
        self.capacities: dict[chan.Channel, int] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        # One batch at a time computes on the host's cores in this process: each uses the
        # process's `threads`, so models that run side by side (det, cls, rec) would
        # otherwise run several times as many compute threads as cores and lose to the
        # switching (measured: docs/benchmarks.md). Batches of other models queue for the
        # slot as kernels queue for a GPU; accelerator batches never wait for it.
        compute_slot = threading.Lock()
        self.runners: dict[str, ModelRunner] = {}
        for key, model in models.items():
            started = time.monotonic()
            engine = create_engine(model, run_dir=Path(run.path))
            self._warm_up(key, engine)
            log.info(
                "engine %d loaded %s (%s, %s threads) in %.2fs",
                index,
                key,
                Path(model.source).name,
                model.threads,
                time.monotonic() - started,
            )
            self.runners[key] = ModelRunner(
                key, model, engine, self.pool, self.deliver, compute_slot
            )

    @staticmethod
    def _warm_up(key: str, engine: Engine) -> None:
        try:
            engine.run_batch(engine.warmup_batch())
        except Exception as exc:  # a model with strict shapes: the first request warms it
            log.warning("%s: warm-up with a generic batch failed (%s)", key, exc)

    def deliver(self, key: ReplyTo, frames: list, segments: list[str]) -> None:
        """Called from model threads: send a reply from the loop's thread."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._send, key.channel, frames, segments)

    def _send(self, channel: chan.Channel, frames: list, segments: list[str]) -> None:
        lent = self.lent.get(channel)
        if lent is None:  # the worker is gone: nobody will read these outputs
            for segment in segments:
                self.pool.release(segment)
            return
        lent.update(segments)
        with contextlib.suppress(chan.ChannelClosed):
            channel.send(frames)

    async def main(self) -> None:
        self.loop = asyncio.get_running_loop()
        for runner in self.runners.values():
            runner.start()
        server = await chan.listen(self.run.engine_socket(self.index), self.on_channel)
        report_ready(self.run, "engine", self.index)
        reporter = asyncio.create_task(self.report_stats())
        watchdog = asyncio.create_task(self.watch_runners())
        try:
            await server.serve_forever()
        finally:
            reporter.cancel()
            watchdog.cancel()
            for runner in self.runners.values():
                runner.stop()

    async def watch_runners(self, interval_s: float = 0.2) -> None:
        """A model thread that died would stall its model: exit, so that the supervisor
        marks this engine not ready, fails its calls (connections close) and restarts it."""
        while True:
            await asyncio.sleep(interval_s)
            dead = [key for key, runner in self.runners.items() if not runner.is_alive()]
            if dead:
                log.critical("engine %d: the thread of %s died; exiting", self.index, dead)
                exit_now(70)

    async def report_stats(self, interval_s: float = 1.0) -> None:
        """Send this engine's counters to the supervisor every ``interval_s``."""
        sender = ControlSender(self.run)
        started = time.monotonic()
        while True:  # the first at once: the front learns the models' signatures from it
            models = {key: r.counters.snapshot() for key, r in self.runners.items()}
            uptime = time.monotonic() - started
            shm = self.pool.total_bytes
            sender.send(msg.EngineStats(self.index, os.getpid(), uptime, models, shm))
            await asyncio.sleep(interval_s)

    async def on_channel(self, channel: chan.Channel) -> None:
        self.lent[channel] = set()
        try:
            while True:
                frames = await channel.recv()
                self.on_message(channel, frames[0], frames[1:])
        finally:
            for segment in self.lent.pop(channel, ()):
                self.pool.release(segment)
            self.capacities.pop(channel, None)
            self._update_senders()

    def _update_senders(self) -> None:
        """Tell each batcher how many requests can be in flight at most.

        A job makes one call at a time to a one-model service; a pipeline that issues
        several at once (asyncio.gather) can exceed it, and then a batch merely forms
        a little early, which costs batching efficiency, never correctness.
        """
        total = sum(self.capacities.values()) or None
        for runner in self.runners.values():
            runner.batcher.max_senders = total

    def on_message(self, channel: chan.Channel, header: memoryview, frames: list) -> None:
        try:
            message = msg.engine_decoder.decode(header)
        except Exception as exc:
            log.warning("dropping an undecodable message: %s", exc)
            return
        if isinstance(message, msg.EngineHello):
            self.capacities[channel] = message.capacity
            self._update_senders()
            channel.send([msg.encode(msg.EngineWelcome(os.getpid()))])
        elif isinstance(message, msg.Release):
            lent = self.lent.get(channel, set())
            for segment in message.segments:
                if segment in lent:
                    lent.discard(segment)
                    self.pool.release(segment)
        elif isinstance(message, msg.CancelInfer):
            key = ReplyTo(channel, message.id)
            for runner in self.runners.values():
                if runner.batcher.cancel(key) is not None:
                    channel.send([error_header(key, Cancelled("the caller gave up"))])
                    break
        elif isinstance(message, msg.InferRequest):
            key = ReplyTo(channel, message.id)
            runner = self.runners.get(message.model)
            try:
                if runner is None:
                    raise NotFound(f"engine {self.index} does not host model {message.model!r}")
                inputs = unpack_tensors(message.tensors, frames, self.attachments)
                runner.engine.check_inputs(inputs)
                stages = [] if message.traced else None
                runner.batcher.submit(PendingRequest(key, inputs, message.deadline, stages=stages))
            except (TransportError, ValueError) as exc:
                channel.send([error_header(key, BadRequest(str(exc)))])
            except Exception as exc:
                channel.send([error_header(key, exc)])


def run_engine_process(
    cfg: ServerConfig, run: RunDir, index: int, models: dict[str, ModelSpec]
) -> None:
    """Entry point of an engine process (started by the supervisor with its models'
    resolved specs: it imports no service module)."""
    become_child(f"splitserve-engine-{index}", run.supervisor_pid, cfg.log_level)
    engine = EngineProcess(cfg, run, index, models)
    run_loop(engine.main())
