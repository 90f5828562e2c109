"""The CPU worker process: runs the services' Python code, never a model.

One asyncio loop per process. A job's pre/post-processing runs on the loop; while the
job awaits an engine, the loop runs other jobs' CPU work (the front caps how many jobs a
worker holds). Inference calls go to the engine processes over Unix sockets; tensors
above the inline threshold go through this process's shared-memory pool.
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

import numpy as np

from splitserve.config import ServerConfig
from splitserve.errors import DeadlineExceeded, NotFound, ServiceError, Unavailable
from splitserve.layout import load_services
from splitserve.replies import error_reply
from splitserve.runtime import channel as chan
from splitserve.runtime import messages as msg
from splitserve.runtime.control import report_ready
from splitserve.runtime.invoke import invoke_service
from splitserve.runtime.process import become_child, on_exit, run_loop
from splitserve.runtime.rundir import RunDir
from splitserve.runtime.shm import ShmAttachments, ShmPool
from splitserve.runtime.transport import pack_tensors, unpack_tensors
from splitserve.service import Request, Service, Tensors
from splitserve.spec import ModelKey

log = logging.getLogger("splitserve.worker")


class EngineLink:
    """The connection to one engine process and the calls waiting on it."""

    def __init__(self, index: int, path: str) -> None:
        self.index = index
        self.path = path
        self.channel: chan.Channel | None = None
        self.connected = asyncio.Event()
        # request id -> (future of the reply, this worker's segments the request uses)
        self.pending: dict[int, tuple[asyncio.Future, list[str]]] = {}
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
        self.front: chan.Channel | None = None
        self.tasks: set[asyncio.Task] = set()

    def setup(self) -> None:
        for service in self.services.values():
            service.setup()
        if "cv2" in sys.modules:  # numerics stay single-threaded: the cores are shared
            sys.modules["cv2"].setNumThreads(1)

    def make_infer(self, service: str, deadline: float, timings: dict[str, float]):
        """The ``infer`` callable a service's ``handle`` receives for one job."""

        async def infer(model: str, inputs: Mapping[str, np.ndarray]) -> Tensors:
            return await self.call_engine(str(ModelKey(service, model)), inputs, deadline, timings)

        return infer

    async def call_engine(
        self,
        key: str,
        inputs: Mapping[str, np.ndarray],
        deadline: float,
        timings: dict[str, float],
    ) -> Tensors:
        """Run ``inputs`` through model ``key`` on the least busy engine hosting it.

        ``timings`` accumulates, over a job's calls, the wall time awaiting engines and
        the engines' own queue and compute times (answered in X-Splitserve-Timings).
        """
        started = time.monotonic()
        routes = self.routes.get(key)
        if not routes:
            service, model = ModelKey.parse(key)
            raise NotFound(f"service {service!r} declares no model {model!r}")
        links = [link for link in routes if link.channel is not None]
        if not links:  # every replica is restarting: wait for one, within the deadline
            waits = [asyncio.ensure_future(link.connected.wait()) for link in routes]
            _, pending = await asyncio.wait(
                waits, timeout=deadline - time.monotonic(), return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in pending:
                waiter.cancel()
            links = [link for link in routes if link.channel is not None]
            if not links:
                raise Unavailable(f"no engine process hosting {key} came up in time; retry")
        link = min(links, key=lambda link: len(link.pending))
        assert link.channel is not None
        request_id = next(self._ids)
        frames: list = []
        refs, segments = pack_tensors(inputs, frames, self.pool)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        # The entry stays until the engine answers (it always does, or its connection
        # closes): only then are the input segments free again, even after a timeout.
        link.pending[request_id] = (future, segments)
        try:
            link.channel.send(
                [msg.encode(msg.InferRequest(request_id, key, deadline, refs)), *frames]
            )
        except chan.ChannelClosed:  # the engine died before its link noticed
            link.pending.pop(request_id, None)
            for segment in segments:
                self.pool.release(segment)
            raise Unavailable(f"engine process {link.index} died; retry") from None
        try:
            reply, reply_frames = await asyncio.wait_for(future, deadline - time.monotonic())
        except TimeoutError:
            raise DeadlineExceeded(
                f"no answer from the engine for {key} before the deadline"
            ) from None
        if reply.error:
            raise ServiceError(f"{key}: {reply.error}", status=reply.error_status or 500)
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

    def _release_outputs(self, link: EngineLink, reply: msg.InferReply) -> None:
        shared = [t.segment for t in reply.tensors if t.segment]
        if shared and link.channel is not None:
            link.peer_prefixes.update(s.rpartition("-")[0] for s in shared)
            with contextlib.suppress(chan.ChannelClosed):
                link.channel.send([msg.encode(msg.Release(shared))])

    async def engine_link(self, link: EngineLink) -> None:
        """Keep a connection to one engine: read its replies, reconnect when it restarts."""
        while True:
            link.channel = await chan.connect(link.path, timeout=float("inf"))
            link.channel.send([msg.encode(msg.EngineHello(self.cfg.worker_concurrency))])
            link.connected.set()
            try:
                while True:
                    header, *frames = await link.channel.recv()
                    reply = msg.engine_decoder.decode(header)
                    if isinstance(reply, msg.InferReply):
                        self._on_reply(link, reply, frames)
            except chan.ChannelClosed:
                log.warning(
                    "engine %d closed its connection; failing %d calls",
                    link.index,
                    len(link.pending),
                )
            finally:
                link.channel = None
                link.connected.clear()
                for future, segments in link.pending.values():
                    for segment in segments:
                        self.pool.release(segment)
                    if not future.done():
                        future.set_exception(
                            Unavailable(f"engine process {link.index} died; retry")
                        )
                link.pending.clear()
                for prefix in link.peer_prefixes:
                    self.attachments.forget(prefix)
                link.peer_prefixes.clear()

    def _on_reply(self, link: EngineLink, reply: msg.InferReply, frames: list) -> None:
        entry = link.pending.pop(reply.id, None)
        if entry is None:
            return
        future, segments = entry
        for segment in segments:
            self.pool.release(segment)
        if not future.done():
            future.set_result((reply, frames))
        else:  # the caller gave up (deadline): give back the outputs unread
            self._release_outputs(link, reply)

    async def run_job(self, job: msg.Job, body: bytes) -> None:
        started = time.monotonic()
        timings: dict[str, float] = {}
        service = self.services.get(job.service)
        if service is None:
            reply = error_reply(NotFound(f"no service named {job.service!r}"))
        else:
            request = Request(body, job.content_type, job.headers, self.cfg.max_image_pixels)
            reply = await invoke_service(
                service, request, self.make_infer(job.service, job.deadline, timings)
            )
        timings["worker_ms"] = (time.monotonic() - started) * 1000
        reply.timings.update(timings)
        header = msg.JobReply(
            job.id, reply.status, reply.content_type, reply.timings, reply.headers
        )
        if self.front is not None:
            with contextlib.suppress(chan.ChannelClosed):
                self.front.send([msg.encode(header), reply.body])

    async def main(self) -> None:
        for link in self.links:
            self._spawn(self.engine_link(link))
        for link in self.links:  # ready means able to reach every engine
            await link.connected.wait()
        self.front = await chan.connect(self.run.socket_path("front"), timeout=float("inf"))
        hello = msg.WorkerHello(self.index, os.getpid(), self.cfg.worker_concurrency)
        self.front.send([msg.encode(hello)])
        report_ready(self.run, "worker", self.index)
        while True:  # the front going away ends this worker (the supervisor restarts all)
            header, *frames = await self.front.recv()
            job = msg.front_decoder.decode(header)
            if isinstance(job, msg.Job):
                self._spawn(self.run_job(job, bytes(frames[0]) if frames else b""))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


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
