"""Chaos: under steady load, kill -9 a random child of the server (CPU worker or
engine), again and again; then stop the server and look for what it left behind.

The server (``--service``, the no-op example by default, so that a run is quick) runs
in split mode on 127.0.0.1; a few closed-loop clients keep it busy. Each kill picks a
random ``splitserve-cpu*`` / ``splitserve-engi*`` process among the supervisor's
children (/proc; the kernel keeps 15 characters of a process name), sends it SIGKILL,
and waits until a replacement of the same kind runs, the supervisor logged it ready
and ``GET /health/ready`` answers 200. Per kill it reports:

- failed requests that were on the killed child: sent before it was gone (SIGKILL takes
  a few ms), answered after the kill, their error naming the killed child's kind ("CPU
  worker" / "engine"): the only ones allowed to fail;
- lost requests: any other failure (sent after the child was gone, or failed for
  another reason);
- time until the replacement is ready (the supervisor's log) and the server ready;
- shared-memory segments of the killed process still in /dev/shm after that.

At the end the server gets SIGTERM (its supervisor, by pid) and is waited for; then
every process that carried this run's environment marker and still lives is leaked,
and so is every ``/dev/shm/splitserve-<supervisor pid>-*`` segment. Floors (issue 8):
0 leaked processes or segments, every restart ready in < 5 s, no request lost.

    python benchmarks/chaos.py [--kills 100] [--service module:Class] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import overload_kit as kit
from loadgen import free_port, machine, start_server

NOOP = "examples.noop.service:Noop"
# Process names as /proc/PID/comm shows them (cut to 15 characters by the kernel).
KINDS = {"splitserve-cpu": "worker", "splitserve-engi": "engine"}
# What a failure caused by a dead child says, per kind of child.
KIND_WORDS = {"worker": "cpu worker", "engine": "engine"}
BODY = bytes(range(64))  # 16 float32 values: a valid body for the no-op and echo services
RESTART_FLOOR_S = 5.0
FAILURES_KEPT = 5  # per kill, in the JSON


@dataclass
class Kill:
    """One kill and what followed it (times in seconds from the kill)."""

    index: int
    at_s: float  # since the load started
    name: str
    kind: str
    pid: int
    replacement_pid: int | None = None
    restart_s: float | None = None  # the supervisor logged the replacement ready
    ready_s: float | None = None  # replacement running and /health/ready 200
    saw_not_ready: bool = False
    segments_left: int = 0  # of the killed pid, once the server was ready again
    # CPU workers and engines that died without being killed, from this kill to the next
    collateral: dict[str, str] = field(default_factory=dict)  # pid -> name
    failed_in_flight: int = 0  # in flight at the kill, error naming the killed kind
    lost: int = 0
    # of those: sent after the child was gone, yet failed naming its kind (handed to the
    # dead child before the server noticed its death)
    lost_to_dead: int = 0
    lost_errors: dict[str, int] = field(default_factory=dict)
    # the first failures charged to this kill: (sent, answered) in s from the kill, error
    failures: list[tuple[float, float, str]] = field(default_factory=list)
    killed_at: float = 0.0  # perf_counter of the kill
    died_s: float | None = None  # until the killed process was gone (a zombie, or reaped)

    @property
    def recovered_s(self) -> float | None:
        """When the replacement counts as ready: the later of the two signals."""
        times = [t for t in (self.restart_s, self.ready_s) if t is not None]
        return max(times) if times and self.ready_s is not None else None


def kind_of(name: str) -> str | None:
    return next((kind for prefix, kind in KINDS.items() if name.startswith(prefix)), None)


def ensure_models(service: str) -> None:
    """The no-op's and the test services' ONNX files are generated, not committed."""
    if service.startswith("examples.noop"):
        from examples.noop.make_model import DEFAULT_PATH, make_identity_model

        if not DEFAULT_PATH.exists():
            make_identity_model(DEFAULT_PATH)
    elif service.startswith("tests.services"):
        from tests.services import make_models

        make_models()


class Chaos:
    def __init__(self, args: argparse.Namespace, proc: subprocess.Popen, port: int) -> None:
        self.args = args
        self.proc = proc
        self.pid = proc.pid
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = Path(proc.log_path)  # type: ignore[attr-defined]
        self.rng = random.Random(args.seed)
        self.kills: list[Kill] = []
        self.answers: list[kit.Answer] = []
        self.seen: dict[int, str] = {}  # every child pid seen in this run -> its name
        self.stopping = False
        self.admin: Any = None

    def children(self) -> dict[int, str]:
        found = kit.named_children(self.pid)
        self.seen.update(found)
        return found

    def note_collateral(self, killed: set[int]) -> None:
        """Charge to the last kill every CPU worker or engine seen before that died
        although nobody killed it (a crash the kills set off)."""
        if not self.kills:
            return
        for pid, name in self.seen.items():
            if kind_of(name) and pid not in killed and not kit.alive(pid):
                self.kills[-1].collateral.setdefault(str(pid), name)

    async def ready(self) -> bool:
        try:
            async with self.admin.get(f"{self.base}/health/ready") as resp:
                await resp.read()
                return resp.status == 200
        except (OSError, TimeoutError, kit.aiohttp.ClientError):
            return False

    def logged_ready(self, pid: int) -> bool:
        """The supervisor's log says the process ``pid`` is ready."""
        try:
            return f"ready (pid {pid})" in self.log_path.read_text(errors="replace")
        except OSError:
            return False

    async def kill_one(self, index: int, t0: float) -> Kill:
        self.note_collateral({k.pid for k in self.kills})
        candidates = {p: n for p, n in self.children().items() if kind_of(n)}
        if not candidates:
            raise RuntimeError(f"no CPU worker or engine among {self.children()}")
        pid = self.rng.choice(sorted(candidates))
        name = candidates[pid]
        killed_at = time.perf_counter()
        kill = Kill(index, round(killed_at - t0, 3), name, kind_of(name) or "", pid)
        kill.killed_at = killed_at
        os.kill(pid, signal.SIGKILL)
        while kit.alive(pid) and time.perf_counter() - killed_at < 2.0:
            await asyncio.sleep(0.001)
        if not kit.alive(pid):
            kill.died_s = round(time.perf_counter() - killed_at, 4)
        deadline = killed_at + self.args.ready_timeout
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.025)
            now = time.perf_counter() - killed_at
            if kill.replacement_pid is None:
                new = [p for p, n in self.children().items() if n == name and p not in candidates]
                if new:
                    kill.replacement_pid = new[0]
            pid_new = kill.replacement_pid
            if pid_new and kill.restart_s is None and self.logged_ready(pid_new):
                kill.restart_s = round(now, 3)
            is_ready = await self.ready()
            kill.saw_not_ready |= not is_ready
            if is_ready and kill.replacement_pid and kill.ready_s is None:
                kill.ready_s = round(time.perf_counter() - killed_at, 3)
            if kill.ready_s is not None and kill.restart_s is not None:
                break
        kill.segments_left = len(kit.shm_segments(self.pid, pid))
        return kill

    async def run(self) -> dict[str, Any]:
        args = self.args
        self.admin = kit.session(4, 5.0)
        url = f"{self.base}/v1/services/{args.service_name}"
        t0 = time.perf_counter()
        load = asyncio.create_task(
            kit.closed_loop(
                url,
                [(BODY, "application/octet-stream")],
                args.clients,
                t0 + 24 * 3600.0,
                args.client_timeout,
                10**9,
                stop=lambda: self.stopping,
                pause_after_error_s=0.05,
                answers=self.answers,
                think_s=args.think,
            )
        )
        try:
            await asyncio.sleep(args.warmup)
            for index in range(args.kills):
                kill = await self.kill_one(index, t0)
                self.kills.append(kill)
                print(_kill_line(kill), flush=True)
                next_at = kill.killed_at + args.interval
                await asyncio.sleep(max(args.settle, next_at - time.perf_counter()))
            await asyncio.sleep(args.settle)
            self.note_collateral({k.pid for k in self.kills})
        finally:
            self.stopping = True
            await load
            self.children()
            await self.admin.close()
        self.attribute_failures()
        return {"load_s": round(time.perf_counter() - t0, 1)}

    def attribute_failures(self) -> None:
        """Each failed request to a kill: on the killed child (sent before that child was
        gone, answered after the kill, its error naming the killed kind), or lost (charged
        to the kill it overlapped, else to the last kill before it was sent, else to none).

        A child takes a few ms to die after SIGKILL (its memory is unmapped, then its
        sockets close): a request sent meanwhile may still be handed to it.
        """
        self.unattributed_lost: dict[str, int] = {}
        for answer in self.answers:
            if answer.status == 200:
                continue
            hit = next(
                (
                    k
                    for k in self.kills
                    if answer.sent <= k.killed_at + (k.died_s or 0.0) and answer.done >= k.killed_at
                ),
                None,
            )
            words = KIND_WORDS.get(hit.kind, "") if hit else ""
            if hit is not None and words and words in answer.error.lower():
                hit.failed_in_flight += 1
                continue
            before = [k for k in self.kills if k.killed_at <= answer.sent]
            owner = hit or (before[-1] if before else None)
            label = f"{answer.status} {answer.error}"[:120]
            if owner is None:
                self.unattributed_lost[label] = self.unattributed_lost.get(label, 0) + 1
                continue
            owner.lost += 1
            owner.lost_errors[label] = owner.lost_errors.get(label, 0) + 1
            if KIND_WORDS.get(owner.kind, "?") in answer.error.lower():
                owner.lost_to_dead += 1
            if len(owner.failures) < FAILURES_KEPT:
                sent, done = answer.sent - owner.killed_at, answer.done - owner.killed_at
                owner.failures.append((round(sent, 3), round(done, 3), label))

    def stop_server(self) -> dict[str, Any]:
        """SIGTERM to the supervisor, wait; then what is left of this run."""
        started = time.perf_counter()
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(self.args.stop_timeout)
        except subprocess.TimeoutExpired:
            code = None
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)
        stop_s = time.perf_counter() - started
        time.sleep(1.0)  # children the supervisor did not wait for get a moment to go
        leaked = kit.marked_processes(self.args.marker)
        leaked.update(
            {p: n for p, n in self.seen.items() if kit.alive(p) and n.startswith("splitserve-")}
        )
        return {
            "exit_code": code,
            "stopped_in_s": round(stop_s, 2),
            "needed_sigkill": code is None,
            "leaked_processes": {str(p): n for p, n in sorted(leaked.items())},
            "segments_left": kit.shm_segments(self.pid),
        }


def _kill_line(k: Kill) -> str:
    return (
        f"kill {k.index + 1:3d} at {k.at_s:7.1f} s: {k.name} (pid {k.pid}) -> "
        f"{k.replacement_pid}, restart {k.restart_s} s, ready {k.ready_s} s, "
        f"segments left {k.segments_left}"
    )


def summarise(chaos: Chaos, stop: dict[str, Any]) -> dict[str, Any]:
    kills = chaos.kills
    recovered = [k.recovered_s for k in kills]
    done = [r for r in recovered if r is not None]
    statuses: dict[str, int] = {}
    for a in chaos.answers:
        statuses[str(a.status)] = statuses.get(str(a.status), 0) + 1
    lost = sum(k.lost for k in kills) + sum(chaos.unattributed_lost.values())
    return {
        "kills": len(kills),
        "kills_by_kind": {
            kind: sum(k.kind == kind for k in kills) for kind in sorted(set(KINDS.values()))
        },
        "requests": len(chaos.answers),
        "statuses": dict(sorted(statuses.items())),
        "failed_in_flight": sum(k.failed_in_flight for k in kills),
        "lost": lost,
        "lost_to_dead_child": sum(k.lost_to_dead for k in kills),
        "lost_unattributed": chaos.unattributed_lost,
        "not_recovered": sum(r is None for r in recovered),
        "recovered_s_p50": round(statistics.median(done), 3) if done else None,
        "recovered_s_max": max(done) if done else None,
        "restarts_over_floor": sum(r is None or r >= RESTART_FLOOR_S for r in recovered),
        "killed_segments_left": sum(k.segments_left for k in kills),
        "collateral_deaths": sum(len(k.collateral) for k in kills),
        **stop,
    }


def floors(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [
        (
            "leaked processes",
            len(summary["leaked_processes"]),
            "0",
            not summary["leaked_processes"],
        ),
        (
            "shared-memory segments left",
            len(summary["segments_left"]),
            "0",
            not summary["segments_left"],
        ),
        (
            "restarts not ready within 5 s",
            f"{summary['restarts_over_floor']} of {summary['kills']}",
            "0",
            summary["restarts_over_floor"] == 0,
        ),
        ("slowest restart, s", summary["recovered_s_max"], "< 5", None),
        ("children that died unkilled", summary["collateral_deaths"], "0 (not a floor)", None),
        (
            "requests lost (not on the killed child); of them handed to it once dead",
            f"{summary['lost']}; {summary['lost_to_dead_child']}",
            "0",
            summary["lost"] == 0,
        ),
    ]
    return [{"metric": m, "value": v, "floor": f, "ok": ok} for m, v, f, ok in rows]


def markdown(results: dict[str, Any]) -> str:
    s = results["summary"]
    lines = [
        f"{s['kills']} kills ({s['kills_by_kind']}) under {results['settings']['clients']} "
        f"closed-loop clients; {s['requests']} requests, {s['statuses']}; failed in flight "
        f"on the killed child: {s['failed_in_flight']}; restart p50 {s['recovered_s_p50']} s. "
        f"SIGTERM: exit code {s['exit_code']} after {s['stopped_in_s']} s.",
        "",
        "| floor | measured | target | |",
        "| --- | --- | --- | --- |",
    ]
    for row in results["floors"]:
        mark = {True: "pass", False: "**FAIL**", None: ""}[row["ok"]]
        lines.append(f"| {row['metric']} | {row['value']} | {row['floor']} | {mark} |")
    lines += [
        "",
        "| kill | child | died ms | failed on it | lost | restart s | ready s | segments left |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k in results["kills"]:
        lines.append(
            f"| {k['index'] + 1} | {k['name']} | {_ms(k['died_s'])} | {k['failed_in_flight']} | "
            f"{k['lost']} | "
            f"{k['restart_s']} | {k['ready_s']} | {k['segments_left']} |"
        )
    return "\n".join(lines) + "\n"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--service", default=NOOP, help="module:Class to serve")
    parser.add_argument("--server-args", default="", help="extra `splitserve serve` arguments")
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument(
        "--interval",
        type=float,
        default=2.0,
        help="least seconds from one kill to the next (after recovery)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.5,
        help="least seconds between a recovery and the next kill",
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--think", type=float, default=0.01, help="pause after each answer, s")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--ready-timeout", type=float, default=30.0, help="per kill")
    parser.add_argument("--client-timeout", type=float, default=35.0)
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=60.0,
        help="seconds the supervisor may take to stop after SIGTERM",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-log", action="store_true", help="keep the server's log")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 when a floor fails")
    args = parser.parse_args(argv)

    started = time.time()
    load_at_start = os.getloadavg()
    ensure_models(args.service)
    args.marker = kit.new_run_marker()
    os.environ[kit.RUN_MARKER_VAR] = args.marker  # the server and its children inherit it
    port = free_port()
    serve_args = [args.service, *shlex.split(args.server_args)]
    proc = start_server(serve_args, port)
    del os.environ[kit.RUN_MARKER_VAR]
    chaos = Chaos(args, proc, port)
    try:
        args.service_name = kit.service_names(port)[0]
        run = asyncio.run(chaos.run())
    finally:
        stop = chaos.stop_server()
    results: dict[str, Any] = {
        "summary": summarise(chaos, stop),
        "kills": [asdict(k) for k in chaos.kills],
        "settings": {
            "command": f"splitserve serve {' '.join(serve_args)} --host 127.0.0.1 --port {port}",
            "clients": args.clients,
            "arguments": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
            "loadavg_at_start": load_at_start,
            "wall_s": round(time.time() - started, 1),
            **run,
        },
        "machine": machine(),
    }
    results["floors"] = floors(results["summary"])
    if stop.get("exit_code") == 0 and not args.keep_log:
        Path(proc.log_path).unlink(missing_ok=True)  # type: ignore[attr-defined]
    else:
        results["settings"]["server_log"] = str(proc.log_path)  # type: ignore[attr-defined]
    text = markdown(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    failed = [row["metric"] for row in results["floors"] if row["ok"] is False]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
