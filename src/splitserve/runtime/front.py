"""The front process: HTTP in, jobs out to CPU workers, answers back. No user code.

``--fronts`` of them share the HTTP port (SO_REUSEPORT: the kernel spreads the
connections); each listens on its own ``front-K.sock``, to which every CPU worker
connects. Workers announce themselves with ``WorkerHello`` and the share of their slots
this front may fill; each job goes to the worker with the fewest jobs in flight, never
past its capacity. When every worker is full a request
waits in a bounded queue, but only if it can still be served before its deadline
(admission.py); otherwise it is refused at once (503 with Retry-After). A job whose
deadline passes, or whose client disconnects, is cancelled at its worker; its slot is
freed when the worker answers (it always does, or dies: then its jobs are sent again
to another worker, ``crash_retries`` times, within their deadlines).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

from splitserve.config import ServerConfig
from splitserve.errors import DeadlineExceeded, Overloaded, ProcessDied, Unavailable
from splitserve.protocol import tracing
from splitserve.protocol.metrics import FrontCounters
from splitserve.protocol.rest import create_app, serve_app
from splitserve.replies import Reply, error_reply
from splitserve.runtime import channel as chan
from splitserve.runtime import messages as msg
from splitserve.runtime.admission import AdmissionEstimate
from splitserve.runtime.control import ControlSender, report_ready, server_states
from splitserve.runtime.process import become_child
from splitserve.runtime.rundir import RunDir

log = logging.getLogger("splitserve.front")

# How often a front sends its counters to the supervisor (the other fronts' /metrics
# include them from the next state broadcast on).
STATS_INTERVAL_S = 1.0


@dataclass(eq=False)
class FrontJob:
    """A request at a CPU worker: the future of its reply and when it took its slot."""

    future: asyncio.Future
    started: float


@dataclass(eq=False)
class WorkerSlot:
    channel: chan.Channel
    index: int
    pid: int
    capacity: int
    jobs: dict[int, FrontJob] = field(default_factory=dict)
    reserved: int = 0  # slots handed to queued requests that have not resumed yet

    @property
    def load(self) -> float:
        return (len(self.jobs) + self.reserved) / self.capacity


@dataclass(eq=False)
class Waiter:
    """A request queued for a slot; its future gets the worker whose slot it takes."""

    future: asyncio.Future
    deadline: float


class SplitDispatcher:
    mode = "split"

    def __init__(self, cfg: ServerConfig, run: RunDir, index: int = 0) -> None:
        self.cfg = cfg
        self.run = run
        self.index = index
        self.counters = FrontCounters(index, self.peer_stats, run.started)
        self.tasks: list[asyncio.Task] = []
        self.workers: dict[chan.Channel, WorkerSlot] = {}
        self.waiters: deque[Waiter] = deque()
        self.state: msg.ServerState | None = None
        self.estimate = AdmissionEstimate()
        self.draining = False
        self._ids = itertools.count(1)

    async def start(self) -> None:
        """Listen for workers (inside the HTTP server's event loop)."""
        self.server = await chan.listen(self.run.front_socket(self.index), self.on_worker)
        self.tasks = [
            asyncio.create_task(self.watch_state()),
            asyncio.create_task(self.shed_late_waiters()),
            asyncio.create_task(self.report_stats()),
        ]
        report_ready(self.run, "front", self.index)

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()

    def engine_stats(self) -> list[msg.EngineStats]:
        return list(self.state.engine_stats) if self.state is not None else []

    def peer_stats(self) -> list[msg.FrontStats]:
        """The other fronts' latest counts and those of fronts that died (this one's
        earlier runs too), as the supervisor last broadcast them."""
        if self.state is None:
            return []
        pid = os.getpid()
        return [stats for stats in self.state.front_stats if stats.pid != pid]

    async def report_stats(self, interval_s: float = STATS_INTERVAL_S) -> None:
        """Send this front's counters to the supervisor every ``interval_s``."""
        sender = ControlSender(self.run)
        try:
            while True:
                await asyncio.sleep(interval_s)
                sender.send(self.counters.report(os.getpid()))
        finally:
            sender.close()

    def ready(self) -> bool:
        return (
            not self.draining and self.state is not None and self.state.ready and bool(self.workers)
        )

    def begin_drain(self) -> None:
        """Admit nothing new (503); what is admitted finishes (see ``in_flight``)."""
        self.draining = True

    def in_flight(self) -> int:
        return sum(len(w.jobs) for w in self.workers.values()) + len(self.waiters)

    def slots(self) -> int:
        return sum(w.capacity for w in self.workers.values())

    def _free_worker(self) -> WorkerSlot | None:
        live = (w for w in self.workers.values() if not w.channel.closed)
        best = min(live, key=lambda w: w.load, default=None)
        return best if best is not None and best.load < 1 else None

    async def _acquire(self, deadline: float) -> WorkerSlot:
        """A worker slot for a request, now or from the queue, or ``Overloaded`` (503)
        at once when the request could not be served in time (see admission.py)."""
        if not self.waiters:
            worker = self._free_worker()
            if worker is not None:
                return worker
        position = len(self.waiters) + 1
        retry_after = max(1.0, self.estimate.start_in(position, self.slots()))
        if len(self.waiters) >= self.cfg.queue_size:
            raise Overloaded(
                f"all workers busy and {self.cfg.queue_size} requests queued",
                retry_after_s=retry_after,
            )
        now = time.monotonic()
        refusal = self.estimate.refusal(position, self.slots(), deadline - now)
        if refusal is not None:
            raise Overloaded(f"not admitted: {refusal}; retry later", retry_after_s=retry_after)
        waiter = Waiter(asyncio.get_running_loop().create_future(), deadline)
        self.waiters.append(waiter)
        try:
            worker = await asyncio.wait_for(waiter.future, deadline - now)
        except TimeoutError:
            raise Overloaded(
                "no CPU worker slot came free in time to serve this request; retry later",
                retry_after_s=retry_after,
            ) from None
        except asyncio.CancelledError:  # the client left: a slot handed over goes on
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().reserved -= 1
                self._hand_out()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)
        worker.reserved -= 1
        return worker

    def _hand_out(self) -> None:
        """Give free slots to queued requests, first come first served; a request that
        can no longer finish in time is refused rather than given a slot."""
        now = time.monotonic()
        while self.waiters:
            worker = self._free_worker()
            if worker is None:
                return
            waiter = self.waiters.popleft()
            if waiter.future.done():
                continue
            if now > self.estimate.latest_start(waiter.deadline):
                waiter.future.set_exception(self._late())
                continue
            worker.reserved += 1
            waiter.future.set_result(worker)

    def _late(self) -> Overloaded:
        return Overloaded(
            "the request waited for a CPU worker slot until it could no longer finish "
            "before its deadline; retry later",
            retry_after_s=max(1.0, self.estimate.start_in(len(self.waiters), self.slots())),
        )

    async def shed_late_waiters(self, interval_s: float = 0.05) -> None:
        """Refuse queued requests that can no longer start in time as soon as the latest
        estimate says so (it grows with the load), not only when a slot frees."""
        while True:
            await asyncio.sleep(interval_s)
            if not self.waiters:
                continue
            now = time.monotonic()
            for waiter in list(self.waiters):
                if not waiter.future.done() and now > self.estimate.latest_start(waiter.deadline):
                    waiter.future.set_exception(self._late())

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
        arrived = time.monotonic()
        job_id = next(self._ids)
        traced = tracing.recording()  # then the job comes back with its stages
        job_msg = msg.Job(job_id, service, content_type, deadline, headers, model, traced)
        header = msg.encode(job_msg)
        retries = self.cfg.crash_retries
        while True:  # until a worker answers, or the deadline; a worker that dies under
            # the job gets it resent elsewhere (``crash_retries`` times: no side effects)
            worker, job = await self._hand_to_worker(job_id, header, body, deadline)
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    reply: Reply = await job.future
            except ProcessDied:
                if retries <= 0 or time.monotonic() >= deadline:
                    raise
                retries -= 1
                log.info("CPU worker %d died under job %d; sending it again", worker.index, job_id)
                continue
            except TimeoutError:
                self._cancel(worker, job_id)
                reply = error_reply(
                    DeadlineExceeded("the request did not finish before its deadline")
                )
            except asyncio.CancelledError:  # the client went away
                self._cancel(worker, job_id)
                raise
            break
        reply.timings["front_queue_ms"] = (job.started - arrived) * 1000
        reply.timings["front_ms"] = (time.monotonic() - arrived) * 1000
        if traced:
            attempts = self.cfg.crash_retries - retries + 1
            where = {"splitserve.worker": worker.index, "splitserve.attempts": attempts}
            tracing.record_dispatch(service, model, arrived, reply, job.started, where)
        return reply

    async def _hand_to_worker(
        self, job_id: int, header: bytes, body: bytes, deadline: float
    ) -> tuple[WorkerSlot, FrontJob]:
        """A worker slot (admission decides, see ``_acquire``) and the job sent on it; a
        worker that just died never got it, so another is picked."""
        while True:
            worker = await self._acquire(deadline)
            job = FrontJob(asyncio.get_running_loop().create_future(), time.monotonic())
            worker.jobs[job_id] = job
            try:
                worker.channel.send([header, body])
                return worker, job
            except chan.ChannelClosed:
                worker.jobs.pop(job_id, None)
                log.info("CPU worker %d is gone; sending its new job elsewhere", worker.index)

    def _cancel(self, worker: WorkerSlot, job_id: int) -> None:
        """Tell the worker to stop a job nobody waits for; its slot frees on the answer."""
        if job_id in worker.jobs:
            with contextlib.suppress(chan.ChannelClosed):
                worker.channel.send([msg.encode(msg.Cancel(job_id))])

    def _finish(self, worker: WorkerSlot, job_id: int, reply: Reply | BaseException) -> None:
        job = worker.jobs.pop(job_id, None)
        if job is None:
            return
        if isinstance(reply, BaseException):
            if not job.future.done():
                job.future.set_exception(reply)
        else:
            self.estimate.observe(time.monotonic() - job.started)
            if not job.future.done():
                job.future.set_result(reply)
        self._hand_out()

    async def on_worker(self, channel: chan.Channel) -> None:
        """One CPU worker's connection: its hello, then its replies, until it closes."""
        header, *_ = await channel.recv()
        hello = msg.front_decoder.decode(header)
        if not isinstance(hello, msg.WorkerHello):
            return
        worker = WorkerSlot(channel, hello.index, hello.pid, hello.capacity)
        self.workers[channel] = worker
        log.info("CPU worker %d (pid %d) joined", hello.index, hello.pid)
        self._hand_out()
        try:
            while True:
                header, *frames = await channel.recv()
                reply = msg.front_decoder.decode(header)
                if isinstance(reply, msg.JobReply):
                    body = bytes(frames[0]) if frames else b""
                    self._finish(
                        worker,
                        reply.id,
                        Reply(
                            reply.status,
                            reply.content_type,
                            body,
                            reply.timings,
                            reply.headers,
                            reply.stages,
                        ),
                    )
        finally:
            del self.workers[channel]
            if worker.jobs:
                log.warning(
                    "CPU worker %d (pid %d) is gone with %d jobs in flight",
                    worker.index,
                    worker.pid,
                    len(worker.jobs),
                )
            for job_id in list(worker.jobs):
                self._finish(
                    worker, job_id, ProcessDied("the CPU worker handling this request died; retry")
                )

    async def watch_state(self) -> None:
        """Follow the supervisor's view of the engines (for readiness)."""
        async for state in server_states(self.run):
            self.state = state


def run_front(cfg: ServerConfig, run: RunDir, index: int, catalogue: dict) -> None:
    """Entry point of front ``index`` (started by the supervisor)."""
    become_child(f"splitserve-front-{index}", run.supervisor_pid, cfg.log_level)
    dispatcher = SplitDispatcher(cfg, run, index)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await dispatcher.start()
        yield
        dispatcher.stop()

    app = create_app(dispatcher, cfg, catalogue, lifespan=lifespan, counters=dispatcher.counters)
    serve_app(app, cfg, dispatcher, reuse_port=cfg.front_count > 1)
