"""The supervisor: starts the fronts, the CPU workers and the engines, and keeps them up.

It gets the settings and the layout (each engine's resolved model specs, the workers'
routes, the fronts' catalogue), owns the run directory (the sockets), listens for
``ChildReady``, ``EngineStats`` and ``FrontStats`` on a PULL socket, and publishes
``ServerState`` on a PUB socket on every change and every ``STATE_INTERVAL_S`` (so a
late subscriber catches up); the fronts follow it for readiness, engine statistics and
each other's counters. A child that dies is restarted after a short back-off and its
shared-memory segments are removed; its peers notice the death themselves, when its
connection closes. A front that dies leaves its last counts here, added to what the
fronts report from then on, so the server's totals never go down.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

import zmq

from splitserve.config import ServerConfig
from splitserve.layout import Layout
from splitserve.runtime import messages as msg
from splitserve.runtime.cpu_worker import run_cpu_worker
from splitserve.runtime.engine_worker import run_engine_process
from splitserve.runtime.front import run_front
from splitserve.runtime.process import configure_logging
from splitserve.runtime.rundir import RunDir
from splitserve.runtime.shm import remove_segments
from splitserve.stats import summed

log = logging.getLogger("splitserve.supervisor")

STATE_INTERVAL_S = 0.5
# Waits before restarting a child, by how many times in a row it died before it was ready
# (a child that had served restarts after the first).
RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
# Beyond the drain timeout, the time the front gets to close its connections and exit.
DRAIN_MARGIN_S = 5.0
# Numeric libraries in CPU workers stay single-threaded: the engines get the cores.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Child:
    role: str
    index: int
    target: Callable
    args: tuple
    env: dict[str, str]
    process: BaseProcess | None = None
    ready_pid: int = 0
    restarts: int = 0
    failed_starts: int = 0  # deaths in a row before becoming ready (the back-off's step)
    restart_at: float = 0.0


class Supervisor:
    def __init__(self, cfg: ServerConfig, layout: Layout) -> None:
        self.cfg = cfg
        self.run_dir = run = RunDir(tempfile.mkdtemp(prefix="splitserve-"), os.getpid())
        os.chmod(run.path, 0o700)  # the sockets inside: this user only (docs/security.md)
        self.mp = multiprocessing.get_context("spawn")
        self.children = [
            Child("engine", j, run_engine_process, (cfg, run, j, models), {})
            for j, models in enumerate(layout.engines)
        ]
        self.children += [
            Child("worker", i, run_cpu_worker, (cfg, run, i, layout.routes), WORKER_ENV)
            for i in range(cfg.cpu_workers)
        ]
        self._fronts = [
            Child("front", k, run_front, (cfg, run, k, layout.catalogue), WORKER_ENV)
            for k in range(cfg.front_count)
        ]
        self.children += self._fronts
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.PULL)
        self.control.bind(run.control_endpoint("control"))
        self.state_pub = self.ctx.socket(zmq.PUB)
        self.state_pub.bind(run.control_endpoint("state"))
        self._stopping = False
        self._drain_until = 0.0  # set by the first SIGTERM/SIGINT
        self.engine_stats: dict[int, msg.EngineStats] = {}
        self.front_stats: dict[int, msg.FrontStats] = {}  # each running front's latest
        self.retired_front_stats: dict[int, msg.FrontStats] = {}  # of those that died

    def _start(self, child: Child) -> None:
        saved = {k: os.environ.get(k) for k in child.env}
        os.environ.update(child.env)
        try:
            child.process = self.mp.Process(
                target=child.target, args=child.args, name=f"splitserve-{child.role}-{child.index}"
            )
            child.process.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.ready_pid = 0

    def _publish(self) -> None:
        state = msg.ServerState(
            engines={c.index: c.ready_pid for c in self.children if c.role == "engine"},
            workers={c.index: c.ready_pid for c in self.children if c.role == "worker"},
            engine_stats=list(self.engine_stats.values()),
            restarts={
                role: sum(c.restarts for c in self.children if c.role == role)
                for role in ("engine", "worker", "front")
            },
            fronts={c.index: c.ready_pid for c in self._fronts},
            front_stats=[*self.front_stats.values(), *self.retired_front_stats.values()],
        )
        self.state_pub.send(msg.encode(state))

    def run(self) -> int:
        """Run until SIGINT/SIGTERM; returns the exit code."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info(
            "serving %s in split mode on http://%s:%d (%d fronts, %d CPU workers, "
            "%d engine processes)",
            ", ".join(self.cfg.services),
            self.cfg.host,
            self.cfg.port,
            len(self._fronts),
            self.cfg.cpu_workers,
            sum(c.role == "engine" for c in self.children),
        )
        for child in self.children:
            self._start(child)
        last_publish = 0.0
        try:
            while not self._stopping:
                changed = self._receive(timeout_ms=100)
                changed |= self._reap()
                now = time.monotonic()
                if changed or now - last_publish >= STATE_INTERVAL_S:
                    self._publish()
                    last_publish = now
                if self._drain_until and (not self._live_fronts() or now > self._drain_until):
                    break
        finally:
            self.shutdown()
        return 0

    def _on_signal(self, *_: object) -> None:
        """First signal: drain (every front stops admitting and answers what it holds,
        the rest keep serving them); a second one, or no front running: stop now."""
        fronts = self._live_fronts()
        if self._drain_until or not fronts:
            self._stopping = True
            return
        log.info("draining (at most %.0fs), then stopping", self.cfg.drain_timeout_s)
        self._drain_until = time.monotonic() + self.cfg.drain_timeout_s + DRAIN_MARGIN_S
        for front in fronts:
            with contextlib.suppress(ProcessLookupError):
                os.kill(front.pid, signal.SIGTERM)

    def _live_fronts(self) -> list[BaseProcess]:
        return [c.process for c in self._fronts if c.process is not None and c.process.is_alive()]

    def _receive(self, timeout_ms: int) -> bool:
        changed = False
        if self.control.poll(timeout_ms):
            while True:
                try:
                    raw = self.control.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                ready = msg.control_decoder.decode(raw)
                if isinstance(ready, msg.EngineStats):
                    self.engine_stats[ready.index] = ready
                    continue
                if isinstance(ready, msg.FrontStats):
                    self._on_front_stats(ready)
                    continue
                if not isinstance(ready, msg.ChildReady):
                    continue
                for child in self.children:
                    if (
                        (child.role, child.index) == (ready.role, ready.index)
                        and child.process is not None
                        and child.process.pid == ready.pid
                    ):
                        child.ready_pid = ready.pid
                        changed = True
                        log.info("%s %d ready (pid %d)", child.role, child.index, ready.pid)
        return changed

    def _on_front_stats(self, stats: msg.FrontStats) -> None:
        """Keep a running front's latest counts (a late report of a dead one is dropped:
        its last report is retired already)."""
        if 0 <= stats.index < len(self._fronts):
            proc = self._fronts[stats.index].process
            if proc is not None and proc.pid == stats.pid:
                self.front_stats[stats.index] = stats

    def _retire_front_stats(self, index: int) -> None:
        """A front died: its last counts join those of its predecessors (pid 0)."""
        last = self.front_stats.pop(index, None)
        if last is None:
            return
        for model in last.models.values():
            model.pending = 0  # its requests in flight died with it
        retired = self.retired_front_stats.get(index)
        self.retired_front_stats[index] = summed(
            [last] if retired is None else [retired, last], index
        )

    def _reap(self) -> bool:
        """Notice dead children, clean up after them, restart them after a back-off."""
        changed = False
        now = time.monotonic()
        for child in self.children:
            proc = child.process
            if self._drain_until and child.role == "front":
                continue  # it exits by itself once drained; nothing restarts it
            if proc is not None and not proc.is_alive():
                log.error(
                    "%s %d (pid %s) exited with code %s; restarting",
                    child.role,
                    child.index,
                    proc.pid,
                    proc.exitcode,
                )
                if proc.pid:
                    remove_segments(self.run_dir.supervisor_pid, proc.pid)
                if child.role == "front":
                    self._retire_front_stats(child.index)
                child.process = None
                # A child that dies before it was ever ready is crash-looping: back off
                # further each time. One that served and then died starts over at once.
                child.failed_starts = 0 if child.ready_pid else child.failed_starts + 1
                child.ready_pid = 0
                backoff = RESTART_BACKOFF_S[min(child.failed_starts, len(RESTART_BACKOFF_S) - 1)]
                child.restart_at = now + backoff
                child.restarts += 1
                changed = True
            elif proc is None and now >= child.restart_at:
                self._start(child)
        return changed

    def shutdown(self) -> None:
        # The front first (no new work), the engines last (workers' calls end cleanly).
        procs = [c.process for c in reversed(self.children) if c.process is not None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, AttributeError):
                proc.terminate()
        deadline = time.monotonic() + 5.0
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        remove_segments(self.run_dir.supervisor_pid)
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.run_dir.path, ignore_errors=True)
        log.info("stopped")


def serve_split(cfg: ServerConfig, layout: Layout) -> int:
    """Serve ``layout`` (engines already built: see ``splitserve.cli``) until stopped."""
    configure_logging(cfg.log_level)
    return Supervisor(cfg, layout).run()
