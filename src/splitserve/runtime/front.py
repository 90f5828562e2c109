"""The front process: HTTP in, jobs out to CPU workers, answers back. No user code.

Workers announce themselves with ``WorkerHello``; each job goes to the worker with the
fewest jobs in flight, never past its capacity. When every worker is full a request
waits in a bounded queue (503 with Retry-After when that is full too); every wait ends
at the request's deadline (504). A job's slot is freed when its worker answers or dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from splitserve.config import ServerConfig
from splitserve.errors import DeadlineExceeded, Overloaded, Unavailable
from splitserve.protocol.rest import create_app, serve_app
from splitserve.replies import Reply
from splitserve.runtime import channel as chan
from splitserve.runtime import messages as msg
from splitserve.runtime.control import report_ready, server_states
from splitserve.runtime.process import become_child
from splitserve.runtime.rundir import RunDir

log = logging.getLogger("splitserve.front")


@dataclass(eq=False)
class WorkerSlot:
    channel: chan.Channel
    index: int
    pid: int
    capacity: int
    jobs: dict[int, asyncio.Future] = field(default_factory=dict)


class SplitDispatcher:
    mode = "split"

    def __init__(self, cfg: ServerConfig, run: RunDir) -> None:
        self.cfg = cfg
        self.run = run
        self.tasks: list[asyncio.Task] = []
        self.workers: dict[chan.Channel, WorkerSlot] = {}
        self.waiters: deque[asyncio.Future] = deque()
        self.state: msg.ServerState | None = None
        self._ids = itertools.count(1)

    async def start(self) -> None:
        """Listen for workers (inside the HTTP server's event loop)."""
        self.server = await chan.listen(self.run.socket_path("front"), self.on_worker)
        self.tasks = [asyncio.create_task(self.watch_state())]
        report_ready(self.run, "front", 0)

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()

    def engine_stats(self) -> list[msg.EngineStats]:
        return list(self.state.engine_stats) if self.state is not None else []

    def ready(self) -> bool:
        return self.state is not None and self.state.ready and bool(self.workers)

    def _free_worker(self) -> WorkerSlot | None:
        best = min(self.workers.values(), key=lambda w: len(w.jobs) / w.capacity, default=None)
        return best if best is not None and len(best.jobs) < best.capacity else None

    async def _acquire(self, deadline: float) -> WorkerSlot:
        while True:
            worker = self._free_worker()
            if worker is not None:
                return worker
            if len(self.waiters) >= self.cfg.queue_size:
                raise Overloaded(f"all workers busy and {self.cfg.queue_size} requests queued")
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, deadline - time.monotonic())
            except TimeoutError:
                raise DeadlineExceeded("no CPU worker became free before the deadline") from None
            finally:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def dispatch(
        self, service: str, body: bytes, content_type: str, headers: dict[str, str], deadline: float
    ) -> Reply:
        arrived = time.monotonic()
        worker = await self._acquire(deadline)
        queued_ms = (time.monotonic() - arrived) * 1000
        job_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        worker.jobs[job_id] = future
        job = msg.Job(job_id, service, content_type, deadline, headers)
        try:
            worker.channel.send([msg.encode(job), body])
        except chan.ChannelClosed:
            worker.jobs.pop(job_id, None)
            raise Unavailable("the CPU worker for this request just went away; retry") from None
        try:
            reply: Reply = await asyncio.wait_for(
                asyncio.shield(future), deadline - time.monotonic()
            )
        except TimeoutError:
            raise DeadlineExceeded("the request did not finish before its deadline") from None
        reply.timings["front_queue_ms"] = queued_ms
        reply.timings["front_ms"] = (time.monotonic() - arrived) * 1000
        return reply

    def _finish(self, worker: WorkerSlot, job_id: int, reply: Reply | BaseException) -> None:
        future = worker.jobs.pop(job_id, None)
        if future is None:
            return
        if not future.done():
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        self._wake_one()

    async def on_worker(self, channel: chan.Channel) -> None:
        """One CPU worker's connection: its hello, then its replies, until it closes."""
        header, *_ = await channel.recv()
        hello = msg.front_decoder.decode(header)
        if not isinstance(hello, msg.WorkerHello):
            return
        worker = WorkerSlot(channel, hello.index, hello.pid, hello.capacity)
        self.workers[channel] = worker
        log.info("CPU worker %d (pid %d) joined", hello.index, hello.pid)
        for _ in range(hello.capacity):
            self._wake_one()
        try:
            while True:
                header, *frames = await channel.recv()
                reply = msg.front_decoder.decode(header)
                if isinstance(reply, msg.JobReply):
                    body = bytes(frames[0]) if frames else b""
                    self._finish(
                        worker,
                        reply.id,
                        Reply(reply.status, reply.content_type, body, reply.timings, reply.headers),
                    )
        finally:
            del self.workers[channel]
            if worker.jobs:
                log.warning(
                    "CPU worker %d (pid %d) is gone; failing its %d jobs",
                    worker.index,
                    worker.pid,
                    len(worker.jobs),
                )
            for job_id in list(worker.jobs):
                self._finish(
                    worker, job_id, Unavailable("the CPU worker handling this request died; retry")
                )

    async def watch_state(self) -> None:
        """Follow the supervisor's view of the engines (for readiness)."""
        async for state in server_states(self.run):
            self.state = state


def run_front(cfg: ServerConfig, run: RunDir, catalogue: dict) -> None:
    """Entry point of the front process (started by the supervisor)."""
    become_child("splitserve-front", run.supervisor_pid, cfg.log_level)
    dispatcher = SplitDispatcher(cfg, run)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await dispatcher.start()
        yield
        dispatcher.stop()

    app = create_app(dispatcher, cfg, catalogue, lifespan=lifespan)
    serve_app(app, cfg)
