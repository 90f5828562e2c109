"""The CPU worker process: runs the services' Python code, never a model.

One asyncio loop per process. A job's pre/post-processing runs on the loop; while the
job awaits an engine, the loop runs other jobs' CPU work (the fronts cap how many jobs a
worker holds). Inference calls go to the engine processes over Unix sockets; tensors
above the inline threshold go through this process's shared-memory pool.

The worker connects to every front (``--fronts``) and tells each the share of its
``--worker-concurrency`` slots that front may fill (``front_share``): the shares add up
to the worker's slots, so the fronts together never give it more jobs than that, and
each front's admission counts only slots that are its own. A front that dies is
reconnected when it is back; the jobs it sent are cancelled (nobody waits for them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np

from splitserve.config import ServerConfig
from splitserve.errors import (
    Cancelled,
    DeadlineExceeded,
    NotFound,
    ProcessDied,
    ServiceError,
    Unavailable,
)
from splitserve.layout import load_services
from splitserve.replies import Reply, Stage, error_reply
from splitserve.runtime import channel as chan
from splitserve.runtime import messages as msg
from splitserve.runtime.control import report_ready
from splitserve.runtime.invoke import invoke_model, invoke_service, job_stage
from splitserve.runtime.process import become_child, on_exit, run_loop
from splitserve.runtime.rundir import RunDir
from splitserve.runtime.shm import ShmAttachments, ShmPool
from splitserve.runtime.transport import pack_tensors, unpack_tensors
from splitserve.service import Request, Service, Tensors
from splitserve.spec import ModelKey

log = logging.getLogger("splitserve.worker")

# How long a connected engine may take to welcome a worker before the worker reconnects
# (an engine's loop answers at once; only one that is dying or wedged does not).
ENGINE_WELCOME_TIMEOUT_S = 10.0


@dataclass(eq=False)
class EngineCall:
    """One call of a model on an engine, from send to answer: the sole owner of the
    reply's future and of the shared-memory segments its inputs occupy.

    The segments are this worker's, lent to the engine until it answers (or its
    connection closes); a caller that gives up (deadline, cancel) abandons the call,
    which tells the engine to drop it, but the segments stay lent until that answer.
    """

    id: int
    link: EngineLink
    segments: list[str]
    future: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def release_inputs(self, pool: ShmPool) -> None:
        for segment in self.segments:
            pool.release(segment)
        self.segments = []

    def abandon(self) -> None:
        """The caller no longer waits: ask the engine to drop the request if it can."""
        if self.link.channel is not None and self.id in self.link.pending:
            with contextlib.suppress(chan.ChannelClosed):
                self.link.channel.send([msg.encode(msg.CancelInfer(self.id))])


def front_share(capacity: int, fronts: int, worker: int, front: int) -> int:
    """How many of worker ``worker``'s ``capacity`` slots front ``front`` may fill: an
    even split, the remainder going to different fronts for different workers (so the
    fronts' totals differ by one slot at most). ``fronts <= capacity`` (config.py), so
    every front gets one at least; the shares add up to ``capacity``."""
    base, extra = divmod(capacity, fronts)
    return base + (1 if (front - worker) % fronts < extra else 0)


@dataclass(eq=False)
class FrontConnection:
    """One connection to a front and the jobs it sent that run here (by its job ids:
    each front numbers its own, and a restarted front starts over)."""

    index: int
    channel: chan.Channel
    jobs: dict[int, asyncio.Task] = field(default_factory=dict)


class EngineLink:
    """The connection to one engine process and the calls waiting on it."""

    def __init__(self, index: int, path: str) -> None:
        self.index = index
        self.path = path
        self.channel: chan.Channel | None = None
        self.connected = asyncio.Event()
        self.pending: dict[int, EngineCall] = {}
        self.peer_prefixes: set[str] = set()


class CpuWorker:
    def __init__(
        self, cfg: ServerConfig, run: RunDir, index: int, routes: Mapping[str, Sequence[int]]
    ) -> None:
        self.cfg = cfg
        self.run = run
        self.index = index
        self.pool = ShmPool(run.supervisor_pid, cfg.shm_pool_bytes)
        on_exit(self.pool.close)
        self.attachments = ShmAttachments()
        classes = load_services(cfg.services)
        self.services: dict[str, Service] = {name: cls() for name, cls in classes.items()}
        engine_count = 1 + max((j for js in routes.values() for j in js), default=-1)
        self.links = [EngineLink(j, run.engine_socket(j)) for j in range(engine_count)]
        # model key -> the engine links hosting a replica of it
        self.routes: dict[str, list[EngineLink]] = {
            key: [self.links[j] for j in engines] for key, engines in routes.items()
        }
        self._ids = itertools.count(1)
        self.tasks: set[asyncio.Task] = set()

    def setup(self) -> None:
        for service in self.services.values():
            service.setup()
        if "cv2" in sys.modules:  # numerics stay single-threaded: the cores are shared
            sys.modules["cv2"].setNumThreads(1)

    def make_infer(
        self,
        service: str,
        deadline: float,
        timings: dict[str, float],
        stages: list[Stage] | None = None,
    ):
        """The ``infer`` callable a service's ``handle`` receives for one job."""

        async def infer(model: str, inputs: Mapping[str, np.ndarray]) -> Tensors:
            key = str(ModelKey(service, model))
            return await self.call_engine(key, inputs, deadline, timings, stages)

        return infer

    async def call_engine(
        self,
        key: str,
        inputs: Mapping[str, np.ndarray],
        deadline: float,
        timings: dict[str, float],
        stages: list[Stage] | None = None,
    ) -> Tensors:
        """Run ``inputs`` through model ``key`` on the least busy engine hosting it.

        ``timings`` accumulates, over a job's calls, the wall time awaiting engines and
        the engines' own queue and compute times (answered in X-Splitserve-Timings);
        ``stages`` (a traced job's) gets the call's stage, the engine's within it.
        """
        started = time.monotonic()
        routes = self.routes.get(key)
        if not routes:
            service, model = ModelKey.parse(key)
            raise NotFound(f"service {service!r} declares no model {model!r}")
        retries = self.cfg.crash_retries
        while True:  # until an engine answers, or the deadline; an engine that dies under
            # the call gets it sent again (``crash_retries`` times: inference has no side
            # effects), to another replica or to its replacement
            link, call = await self._send_call(key, routes, inputs, deadline, stages is not None)
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    reply, reply_frames = await call.future
            except ProcessDied:
                if retries <= 0 or time.monotonic() >= deadline:
                    raise
                retries -= 1
                log.info("engine %d died under a call of %s; sending it again", link.index, key)
                continue
            except TimeoutError:
                call.abandon()
                raise DeadlineExceeded(
                    f"no answer from the engine for {key} before the deadline"
                ) from None
            except asyncio.CancelledError:
                call.abandon()
                raise
            break
        if stages is not None:
            stages.append(call_stage(key, link.index, started, reply))
        if reply.error is not None:
            err = reply.error
            raise ServiceError(f"{key}: {err.message}", status=err.status, kind=err.kind)
        outputs = unpack_tensors(reply.tensors, reply_frames, self.attachments, copy_shared=True)
        self._release_outputs(link, reply)
        for name, value in (
            ("infer_calls", 1),
            ("infer_wait_ms", (time.monotonic() - started) * 1000),
            ("engine_queue_ms", reply.queue_ms),
            ("engine_compute_ms", reply.infer_ms),
            ("engine_batch_rows", reply.batch_size),
        ):
            timings[name] = timings.get(name, 0) + value
        if reply.simulated:
            timings["simulated_accelerator"] = 1
        return outputs

    async def _send_call(
        self,
        key: str,
        routes: list[EngineLink],
        inputs: Mapping[str, np.ndarray],
        deadline: float,
        traced: bool = False,
    ) -> tuple[EngineLink, EngineCall]:
        """The call sent to the least busy engine hosting ``key``; an engine that just
        died never got it, so it goes to another (or waits for one, see ``_engine_for``)."""
        while True:
            link = await self._engine_for(key, routes, deadline)
            assert link.channel is not None
            frames: list = []
            refs, segments = pack_tensors(inputs, frames, self.pool)
            call = EngineCall(next(self._ids), link, segments)
            header = msg.encode(msg.InferRequest(call.id, key, deadline, refs, traced))
            try:
                link.channel.send([header, *frames])
            except chan.ChannelClosed:  # nothing reached it
                call.release_inputs(self.pool)
                link.channel = None
                link.connected.clear()
                continue
            link.pending[call.id] = call
            return link, call

    async def _engine_for(self, key: str, routes: list[EngineLink], deadline: float) -> EngineLink:
        """The least busy connected engine hosting ``key``; while every replica restarts,
        wait for one within the deadline."""
        while True:
            if time.monotonic() >= deadline:  # no work for an answer that is already late
                raise DeadlineExceeded(f"deadline passed before {key} could run")
            links = [link for link in routes if link.channel is not None]
            if links:
                return min(links, key=lambda link: len(link.pending))
            waits = [asyncio.ensure_future(link.connected.wait()) for link in routes]
            _, pending = await asyncio.wait(
                waits, timeout=deadline - time.monotonic(), return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in pending:
                waiter.cancel()
            if not any(link.channel is not None for link in routes):
                raise Unavailable(f"no engine process hosting {key} came up in time; retry")

    def _release_outputs(self, link: EngineLink, reply: msg.InferReply) -> None:
        shared = [t.segment for t in reply.tensors if t.segment]
        if shared and link.channel is not None:
            link.peer_prefixes.update(s.rpartition("-")[0] for s in shared)
            with contextlib.suppress(chan.ChannelClosed):
                link.channel.send([msg.encode(msg.Release(shared))])

    async def engine_link(self, link: EngineLink) -> None:
        """Keep a connection to one engine: read its replies, reconnect when it restarts."""
        while True:
            channel = await chan.connect(link.path, timeout=float("inf"))
            if not await self._greet(channel):  # it died as we connected: its successor
                channel.close()
                await asyncio.sleep(0.05)
                continue
            link.channel = channel
            link.connected.set()
            try:
                while True:
                    header, *frames = await link.channel.recv()
                    reply = msg.engine_decoder.decode(header)
                    if isinstance(reply, msg.InferReply):
                        self._on_reply(link, reply, frames)
            except chan.ChannelClosed:
                log.warning(
                    "engine %d closed its connection with %d calls in flight",
                    link.index,
                    len(link.pending),
                )
            except Exception:  # a message we cannot read: drop the link, connect anew
                log.exception("engine %d: unreadable message; reconnecting", link.index)
                channel.close()
            finally:
                link.channel = None
                link.connected.clear()
                for call in link.pending.values():
                    call.release_inputs(self.pool)
                    if not call.future.done():
                        call.future.set_exception(
                            ProcessDied(f"engine process {link.index} died; retry")
                        )
                link.pending.clear()
                for prefix in link.peer_prefixes:
                    self.attachments.forget(prefix)
                link.peer_prefixes.clear()

    async def _greet(self, channel: chan.Channel) -> bool:
        """Say hello and wait for the engine's welcome: True when it came in time."""
        try:
            channel.send([msg.encode(msg.EngineHello(self.cfg.worker_concurrency))])
            async with asyncio.timeout(ENGINE_WELCOME_TIMEOUT_S):
                header, *_ = await channel.recv()
            return isinstance(msg.engine_decoder.decode(header), msg.EngineWelcome)
        except (chan.ChannelClosed, TimeoutError, msgspec.DecodeError):
            return False

    def _on_reply(self, link: EngineLink, reply: msg.InferReply, frames: list) -> None:
        call = link.pending.pop(reply.id, None)
        if call is None:
            return
        call.release_inputs(self.pool)
        if not call.future.done():
            call.future.set_result((reply, frames))
        else:  # the caller gave up (deadline, cancel): give back the outputs unread
            self._release_outputs(link, reply)

    async def run_job(self, front: FrontConnection, job: msg.Job, body: bytes) -> None:
        """Run one job and answer it, whatever happens; a job whose deadline passes, or
        that the front cancels, stops at its next ``await`` and answers 504 / 499."""
        started = time.monotonic()
        timings: dict[str, float] = {}
        calls: list[Stage] | None = [] if job.traced else None
        try:
            async with asyncio.timeout(job.deadline - time.monotonic()):
                reply = await self._invoke(job, body, timings, calls)
        except TimeoutError:
            reply = error_reply(DeadlineExceeded("the request did not finish before its deadline"))
        except asyncio.CancelledError:
            reply = error_reply(Cancelled("the front no longer waits for this request"))
        finally:
            front.jobs.pop(job.id, None)
        ended = time.monotonic()
        timings["worker_ms"] = (ended - started) * 1000
        reply.timings.update(timings)
        if calls is not None:
            where = {"splitserve.worker": self.index, "process.pid": os.getpid()}
            service = self.services.get(job.service)
            stage = job_stage(service, reply, started, ended, calls, where, direct=bool(job.model))
            reply.stages = [stage]
        self._answer(front, job.id, reply)

    async def _invoke(
        self, job: msg.Job, body: bytes, timings: dict[str, float], calls: list[Stage] | None
    ) -> Reply:
        service = self.services.get(job.service)
        if service is None:
            return error_reply(NotFound(f"no service named {job.service!r}"))
        infer = self.make_infer(job.service, job.deadline, timings, calls)
        if job.model:
            return await invoke_model(job.model, body, infer)
        request = Request(body, job.content_type, job.headers, self.cfg.max_image_pixels)
        return await invoke_service(service, request, infer)

    def on_job(self, front: FrontConnection, job: msg.Job, body: bytes) -> None:
        if job.deadline <= time.monotonic():  # late already: answer without running it
            late = error_reply(DeadlineExceeded("deadline passed before start"))
            self._answer(front, job.id, late)
            return
        front.jobs[job.id] = self._spawn(self.run_job(front, job, body))

    def on_cancel(self, front: FrontConnection, cancel: msg.Cancel) -> None:
        task = front.jobs.get(cancel.id)
        if task is not None:
            task.cancel()

    def _answer(self, front: FrontConnection, job_id: int, reply: Reply) -> None:
        """Answer on the connection the job came in on (a closed one: nobody waits)."""
        header = msg.JobReply(
            job_id, reply.status, reply.content_type, reply.timings, reply.headers, reply.stages
        )
        with contextlib.suppress(chan.ChannelClosed):
            front.channel.send([msg.encode(header), reply.body])

    async def front_link(self, index: int, joined: asyncio.Event) -> None:
        """Keep a connection to front ``index``: announce this worker's share of slots,
        run the jobs it sends; when it goes away, cancel them and connect anew."""
        fronts = self.cfg.front_count
        share = front_share(self.cfg.worker_concurrency, fronts, self.index, index)
        path = self.run.front_socket(index)
        while True:
            channel = await chan.connect(path, timeout=float("inf"))
            front = FrontConnection(index, channel)
            try:
                channel.send([msg.encode(msg.WorkerHello(self.index, os.getpid(), share))])
                joined.set()
                while True:
                    header, *frames = await channel.recv()
                    message = msg.front_decoder.decode(header)
                    if isinstance(message, msg.Job):
                        self.on_job(front, message, bytes(frames[0]) if frames else b"")
                    elif isinstance(message, msg.Cancel):
                        self.on_cancel(front, message)
            except chan.ChannelClosed:
                log.info("front %d closed its connection (restarting, or stopping)", index)
            except Exception:  # a message we cannot read: drop the link, connect anew
                log.exception("front %d: unreadable message; reconnecting", index)
            finally:
                channel.close()
                for task in list(front.jobs.values()):
                    task.cancel()
            await asyncio.sleep(0.05)  # no busy loop on a front that closes at once

    async def main(self) -> None:
        for link in self.links:
            self._spawn(self.engine_link(link))
        for link in self.links:  # ready means able to reach every engine
            await link.connected.wait()
        joined = asyncio.Event()
        fronts = [self._spawn(self.front_link(k, joined)) for k in range(self.cfg.front_count)]
        await joined.wait()  # and one front at least (each front's readiness needs its own)
        report_ready(self.run, "worker", self.index)
        await asyncio.gather(*fronts)  # until SIGTERM (the supervisor stops the workers)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


def call_stage(key: str, engine: int, started: float, reply: msg.InferReply) -> Stage:
    """A traced engine call: from its send to its answer, the engine's stages within."""
    attributes: dict[str, str | int | float] = {
        "splitserve.model": key,
        "splitserve.engine": engine,
    }
    if reply.error is not None:
        attributes["error.type"] = reply.error.kind
    return Stage("infer", started, time.monotonic(), attributes, reply.stages)


def run_cpu_worker(
    cfg: ServerConfig, run: RunDir, index: int, routes: Mapping[str, Sequence[int]]
) -> None:
    """Entry point of a CPU worker process (started by the supervisor).

    It gets the engines hosting each model (``routes``: every engine hosts one at least),
    never the models' specs: nothing here loads a model.
    """
    become_child(f"splitserve-cpu-{index}", run.supervisor_pid, cfg.log_level)
    worker = CpuWorker(cfg, run, index, routes)
    worker.setup()
    run_loop(worker.main())
