"""Overload: the OCR demo offered 10x its capacity, measured in one run.

One server, started as the README starts it (``splitserve serve
examples.ocr.service:OCRService``, default layout, 127.0.0.1, a free port), documents
from ``examples/ocr/make_images.py`` as request bodies:

1. unloaded: a few requests one at a time (warm-up; the unloaded latency);
2. capacity: closed loop, 8 clients, 30 s: answers 200 per second;
3. overload: open loop (Poisson arrivals) at 10x that for 40 s: answers per second by
   status, steady-state goodput (200 answers per second after the first 5 s) as a share
   of capacity, latency of the shed answers (503), 504 answers and whether they had
   waited in a queue (their ``X-Splitserve-Timings``, their message, ``/v1/stats``),
   and the server's memory (summed RSS of the supervisor and all its children, every
   second);
4. recovery: the instant the arrivals stop, the closed loop of step 2 again: how long
   until a request sent then is answered 200 within the latency of step 2 (p90);
5. compute in vain: engine busy seconds (``/v1/stats``) and server CPU seconds per
   answer 200, step 3 against step 2. More per success under overload means work done
   for requests that were already shed or answered 504.

The floors are issue 8's; the script reports them and exits 0 (``--check`` exits 1
when one fails). The client is bounded in time and in requests in flight, and reports
its own lag and CPU so that a reader can tell it was not the bottleneck.

    python benchmarks/overload.py [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import overload_kit as kit
from loadgen import free_port, machine, percentile, start_server, stop_server

from examples.ocr.make_images import generate_documents

OCR = "examples.ocr.service:OCRService"
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
MIB = 1 << 20
# A 504 counts as "waited in a queue" when queueing (front + engine) took at least this
# share of its time, or, without timings, when its message says it never got a worker.
QUEUE_SHARE = 0.5
QUEUE_WORDS = ("queue", "became free", "no cpu worker")


@dataclass
class Phase:
    """A measured window: its answers and the server's counters at both edges."""

    start: float
    end: float
    answers: list[kit.Answer] = field(default_factory=list)
    stats_before: dict[str, Any] | None = None
    stats_after: dict[str, Any] | None = None
    cpu_before: float = 0.0
    cpu_after: float = 0.0

    def ok_done_in_window(self) -> list[kit.Answer]:
        return [a for a in self.answers if a.status == 200 and self.start <= a.done <= self.end]

    def per_success(self) -> dict[str, float | None]:
        """Engine busy seconds and server CPU seconds per answer 200 in the window."""
        ok = len(self.ok_done_in_window())
        busy = kit.busy_s(self.stats_after) - kit.busy_s(self.stats_before)
        cpu = self.cpu_after - self.cpu_before
        return {
            "answers_200": ok,
            "engine_busy_s": round(busy, 3),
            "server_cpu_s": round(cpu, 3),
            "engine_busy_s_per_200": busy / ok if ok else None,
            "server_cpu_s_per_200": cpu / ok if ok else None,
        }


class Server:
    """The server under test: its process, URLs and a session for its endpoints."""

    def __init__(self, proc: Any, port: int, service: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        base = f"http://127.0.0.1:{port}"
        self.url = f"{base}/v1/services/{service}"
        self.stats_url = f"{base}/v1/stats"
        self.admin: Any = None  # a session for the endpoints, made inside the event loop

    async def edge(self, phase: Phase, which: str) -> None:
        """Snapshot the counters at one edge of ``phase`` (``before`` / ``after``)."""
        stats = await kit.fetch_json(self.admin, self.stats_url)
        cpu = kit.tree_cpu_s(self.pid)
        setattr(phase, f"stats_{which}", stats)
        setattr(phase, f"cpu_{which}", cpu)


class MemorySampler:
    """Summed RSS of the server's process tree, every ``interval_s``."""

    def __init__(self, pid: int, interval_s: float = 1.0) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []  # (perf_counter, bytes, processes)
        self.task: asyncio.Task[None] | None = None

    def sample(self) -> int:
        rss, count = kit.tree_rss_bytes(self.pid)
        self.samples.append((time.perf_counter(), rss, count))
        return rss

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def between(self, start: float, end: float) -> list[tuple[float, int, int]]:
        return [s for s in self.samples if start <= s[0] <= end]


async def open_loop(
    url: str,
    bodies: list[tuple[bytes, str]],
    rate: float,
    duration_s: float,
    max_inflight: int,
    timeout_s: float,
    seed: int,
) -> tuple[Phase, set[asyncio.Task[kit.Answer]], dict[str, Any], Any]:
    """Poisson arrivals at ``rate`` for ``duration_s``; at most ``max_inflight`` in
    flight (an arrival beyond that is dropped and counted).

    Returns once the arrivals end, with the requests still in flight (the caller awaits
    them, then closes the session), so the recovery loop can start at that instant.
    """
    rng = random.Random(seed)
    client = kit.session(max_inflight, timeout_s)
    phase = Phase(time.perf_counter(), 0.0)
    phase.end = phase.start + duration_s
    pending: set[asyncio.Task[kit.Answer]] = set()
    lags: list[float] = []
    dropped = 0
    index = 0
    cpu0 = _client_cpu_s()

    def finished(task: asyncio.Task[kit.Answer]) -> None:
        pending.discard(task)
        if not task.cancelled():
            phase.answers.append(task.result())

    next_t = phase.start + rng.expovariate(rate)
    while next_t < phase.end:
        delay = next_t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(time.perf_counter() - next_t)
        if len(pending) >= max_inflight:
            dropped += 1
        else:
            data, content_type = bodies[index % len(bodies)]
            index += 1
            task = asyncio.create_task(kit.send(client, url, data, content_type))
            pending.add(task)
            task.add_done_callback(finished)
        next_t += rng.expovariate(rate)
    lags.sort()
    client_info = {
        "sent": index,
        "dropped_at_max_inflight": dropped,
        "max_inflight": max_inflight,
        "lag_p99_ms": round(percentile(lags, 99) * 1000, 2) if lags else None,
        "lag_max_ms": round(lags[-1] * 1000, 2) if lags else None,
        "cpu_s_during_arrivals": round(_client_cpu_s() - cpu0, 3),
    }
    return phase, pending, client_info, client


def _client_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _quantiles_ms(values: list[float]) -> dict[str, float | None]:
    values = sorted(values)
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 2),
        "p99": round(percentile(values, 99), 2),
        "max": round(values[-1], 2),
    }


def classify_504(answer: kit.Answer) -> str:
    """``queue``: it waited in a queue for most of its time; ``not_queue``; ``unknown``."""
    t = answer.timings
    if t:
        queued = t.get("front_queue_ms", 0.0) + t.get("engine_queue_ms", 0.0)
        return "queue" if queued >= QUEUE_SHARE * answer.latency_ms else "not_queue"
    message = answer.error.lower()
    if any(word in message for word in QUEUE_WORDS):
        return "queue"
    return "unknown"


def per_second(answers: list[kit.Answer], origin: float, seconds: int) -> list[dict[str, Any]]:
    """Answers by completion second (from ``origin``) and by status, and arrivals."""
    rows: list[dict[str, Any]] = []
    done = [Counter() for _ in range(seconds)]
    arrived = [0] * seconds
    for a in answers:
        k = int(a.done - origin)
        if 0 <= k < seconds:
            done[k][str(a.status)] += 1
        s = int(a.sent - origin)
        if 0 <= s < seconds:
            arrived[s] += 1
    for k in range(seconds):
        rows.append({"t": k, "sent": arrived[k], **dict(sorted(done[k].items()))})
    return rows


def unloaded(server: Server, bodies: list[tuple[bytes, str]], count: int, timeout_s: float):
    """``count`` requests one at a time (the first ones warm the server up)."""
    return kit.closed_loop(
        server.url, bodies, 1, time.perf_counter() + 120.0, timeout_s, max_requests=count
    )


async def measure(args: argparse.Namespace, server: Server, bodies: list[tuple[bytes, str]]):
    results: dict[str, Any] = {}
    memory = MemorySampler(server.pid)
    memory.start()

    # 1. unloaded latency
    first = await unloaded(server, bodies, args.unloaded_requests, args.client_timeout)
    bad = [a for a in first if a.status != 200]
    if bad:
        raise RuntimeError(f"the unloaded requests failed: {bad[0]}")
    lat = [a.latency_ms for a in first[min(2, len(first) - 1) :]]  # past the first two
    results["unloaded"] = {"requests": len(first), "p50_ms": round(statistics.median(lat), 1)}

    # 2. capacity
    t0 = time.perf_counter()
    cap = Phase(t0 + args.capacity_warmup, t0 + args.capacity_warmup + args.capacity_duration)

    async def capacity_edges() -> None:
        await asyncio.sleep(max(0.0, cap.start - time.perf_counter()))
        await server.edge(cap, "before")
        await asyncio.sleep(max(0.0, cap.end - time.perf_counter()))
        await server.edge(cap, "after")

    edges = asyncio.create_task(capacity_edges())
    cap.answers = await kit.closed_loop(
        server.url, bodies, args.clients, cap.end, args.client_timeout, args.max_requests
    )
    await edges
    ok = cap.ok_done_in_window()
    capacity = len(ok) / (cap.end - cap.start)
    if capacity <= 0:
        raise RuntimeError(
            f"no answer 200 in the capacity window: {Counter(a.status for a in cap.answers)}"
        )
    cap_latency = _quantiles_ms([a.latency_ms for a in ok])
    cap_latency["p90"] = round(percentile(sorted(a.latency_ms for a in ok), 90), 2)
    results["capacity"] = {
        "clients": args.clients,
        "duration_s": args.capacity_duration,
        "rps_200": round(capacity, 3),
        "statuses": dict(Counter(str(a.status) for a in cap.answers)),
        "latency_ms": cap_latency,
        "server": kit.stats_delta(cap.stats_before, cap.stats_after),
        "per_success": cap.per_success(),
    }
    normal_ms = cap_latency["p90"]

    # 3. overload
    rate = args.factor * capacity
    max_inflight = args.max_inflight or min(4096, max(64, math.ceil(rate * args.client_timeout)))
    stats_before = await kit.fetch_json(server.admin, server.stats_url)
    cpu_before = kit.tree_cpu_s(server.pid)
    rss_start = memory.sample()
    over, pending, client_info, over_client = await open_loop(
        server.url,
        bodies,
        rate,
        args.overload_duration,
        max_inflight,
        args.client_timeout,
        args.seed,
    )
    over.stats_before, over.cpu_before = stats_before, cpu_before
    arrivals_end = time.perf_counter()
    await server.edge(over, "after")

    # 4. recovery, at once, while the overload's last requests are still in flight
    probes: list[kit.Answer] = []

    def recovered() -> bool:
        return time.perf_counter() - arrivals_end >= args.recovery_min and any(
            _normal(a, normal_ms, arrivals_end) for a in probes
        )

    await kit.closed_loop(
        server.url,
        bodies,
        args.clients,
        arrivals_end + args.recovery_max,
        args.client_timeout,
        args.max_requests,
        stop=recovered,
        answers=probes,
    )
    recovery_end = time.perf_counter()
    if pending:
        await asyncio.gather(*list(pending), return_exceptions=True)
    await over_client.close()
    tail_end = time.perf_counter()
    stats_end = await kit.fetch_json(server.admin, server.stats_url)
    # Work for requests already answered goes on after the last answer (until the
    # server cancels it): the aftermath lasts until the engines are idle.
    after = Phase(over.start, 0.0, over.answers + probes, over.stats_before)
    after.cpu_before = over.cpu_before
    after.stats_after = await wait_idle(server, args.idle_max)
    after.end = time.perf_counter()
    after.cpu_after = kit.tree_cpu_s(server.pid)
    memory.stop()

    # the numbers of 3
    steady_from = over.start + args.overload_warmup
    steady_ok = [a for a in over.answers if a.status == 200 and steady_from <= a.done <= over.end]
    goodput = len(steady_ok) / (over.end - steady_from)
    blocks = {}
    for lo in range(0, math.ceil(args.overload_duration), 10):
        hi = min(lo + 10.0, args.overload_duration)
        n = sum(
            over.start + lo <= a.done < over.start + hi for a in over.answers if a.status == 200
        )
        blocks[f"{lo}-{hi:g}s"] = round(100 * n / (hi - lo) / capacity, 1)
    shed = [a.latency_ms for a in over.answers if a.status == 503]
    timeouts = [a for a in over.answers if a.status == 504]
    kinds = Counter(classify_504(a) for a in timeouts)
    admitted_ok = [a for a in over.answers if a.status == 200]
    front_queue = [a.timings.get("front_queue_ms", 0.0) for a in admitted_ok]
    mem = memory.between(over.start, tail_end)
    rss_max = max([rss_start, *(s[1] for s in mem)])
    results["overload"] = {
        "factor": args.factor,
        "rate": round(rate, 3),
        "duration_s": args.overload_duration,
        "steady_from_s": args.overload_warmup,
        "statuses": dict(sorted(Counter(str(a.status) for a in over.answers).items())),
        "goodput_rps": round(goodput, 3),
        "goodput_pct_of_capacity": round(100 * goodput / capacity, 1),
        "goodput_pct_by_10s": blocks,
        "latency_ms_200": _quantiles_ms([a.latency_ms for a in admitted_ok]),
        "front_queue_ms_200": _quantiles_ms(front_queue),
        "shed_503_ms": _quantiles_ms(shed),
        "answers_504": len(timeouts),
        "answers_504_by_cause": dict(kinds),
        "answers_504_messages": dict(Counter(a.error for a in timeouts).most_common(5)),
        "other_errors": dict(
            Counter(a.error for a in over.answers if a.status not in (200, 503, 504))
        ),
        "server_during_arrivals": kit.stats_delta(over.stats_before, over.stats_after),
        "server_with_tail": kit.stats_delta(over.stats_before, stats_end),
        "per_success": over.per_success(),
        "per_success_with_aftermath": after.per_success(),
        "aftermath_s": round(after.end - over.start, 1),
        "engine_busy_s_after_last_answer": round(
            kit.busy_s(after.stats_after) - kit.busy_s(stats_end), 3
        ),
        "client": client_info,
        "tail_s": round(tail_end - arrivals_end, 2),
        "memory": {
            "rss_start_mib": round(rss_start / MIB, 1),
            "rss_max_mib": round(rss_max / MIB, 1),
            "growth_mib": round((rss_max - rss_start) / MIB, 1),
            "bound_mib": round(args.memory_bound * rss_start / MIB, 1),
            "processes": max((s[2] for s in mem), default=0),
            "samples_mib": [(round(t - over.start, 1), round(b / MIB, 1)) for t, b, _ in mem],
        },
    }
    seconds = math.ceil(tail_end - over.start)
    timeline = per_second(over.answers, over.start, seconds)
    probe_rows = per_second(probes, over.start, seconds)
    for row, probe in zip(timeline, probe_rows, strict=True):
        row.update({f"recovery_{k}": n for k, n in probe.items() if k not in ("t", "sent")})
        row.setdefault("recovery_200", 0)
    results["per_second"] = timeline

    # the numbers of 4
    first_normal = min(
        (a for a in probes if _normal(a, normal_ms, arrivals_end)),
        key=lambda a: a.sent,
        default=None,
    )
    window = recovery_end - arrivals_end
    results["recovery"] = {
        "goodput_back_s": goodput_back_s(timeline, args.overload_duration, capacity),
        "normal_latency_ms": normal_ms,
        "recovered_s": round(first_normal.sent - arrivals_end, 3) if first_normal else None,
        "probes": len(probes),
        "statuses": dict(sorted(Counter(str(a.status) for a in probes).items())),
        "rps_200": round(sum(a.status == 200 for a in probes) / window, 3) if window else None,
        "window_s": round(window, 2),
    }

    # the numbers of 5
    base = results["capacity"]["per_success"]
    results["vain"] = {
        f"{key}_ratio_{span}": (now[key] / base[key] if now[key] and base[key] else None)
        for span, now in (
            ("arrivals", results["overload"]["per_success"]),
            ("aftermath", results["overload"]["per_success_with_aftermath"]),
        )
        for key in ("engine_busy_s_per_200", "server_cpu_s_per_200")
    }
    return results


async def wait_idle(server: Server, max_s: float, quiet_s: float = 3.0) -> dict[str, Any] | None:
    """``/v1/stats`` once the engines' busy time has stopped growing for ``quiet_s``
    (engines report once a second), or after ``max_s``."""
    deadline = time.perf_counter() + max_s
    stats = await kit.fetch_json(server.admin, server.stats_url)
    quiet_since = time.perf_counter()
    while time.perf_counter() < deadline:
        await asyncio.sleep(1.0)
        now = await kit.fetch_json(server.admin, server.stats_url)
        if kit.busy_s(now) - kit.busy_s(stats) > 0.05:
            quiet_since = time.perf_counter()
        stats = now
        if time.perf_counter() - quiet_since >= quiet_s:
            break
    return stats


def goodput_back_s(
    timeline: list[dict[str, Any]], end_s: float, capacity: float, window_s: int = 10
) -> int | None:
    """Whole seconds after the arrivals end until the server's answers 200 (to anyone)
    over the next ``window_s`` seconds reach 90% of capacity; None if they never do."""
    ok = [row.get("200", 0) + row.get("recovery_200", 0) for row in timeline]
    first = math.ceil(end_s)
    for delay in range(len(ok) - first - window_s + 1):
        if sum(ok[first + delay : first + delay + window_s]) >= 0.9 * capacity * window_s:
            return delay
    return None


def _normal(answer: kit.Answer, normal_ms: float, since: float) -> bool:
    return answer.status == 200 and answer.sent >= since and answer.latency_ms <= normal_ms


def floors(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Issue 8's floors against the measured numbers."""
    over, rec = results["overload"], results["recovery"]
    mem = over["memory"]
    queued_504 = over["answers_504_by_cause"].get("queue", 0) + over["answers_504_by_cause"].get(
        "unknown", 0
    )
    shed_p50 = over["shed_503_ms"]["p50"]
    recovered = rec["recovered_s"]
    vain = results["vain"]["engine_busy_s_per_200_ratio_aftermath"]
    rows = [
        (
            "steady-state goodput, % of capacity",
            over["goodput_pct_of_capacity"],
            ">= 90",
            over["goodput_pct_of_capacity"] >= 90,
        ),
        (
            "shed answers (503), p50 ms",
            shed_p50,
            "<= 20 (and some shed)",
            shed_p50 is not None and shed_p50 <= 20,
        ),
        ("504 after waiting in a queue (or cause unknown)", queued_504, "0", queued_504 == 0),
        (
            "server RSS max / at start, MiB",
            f"{mem['rss_max_mib']:.0f} / {mem['rss_start_mib']:.0f}",
            f"<= {mem['bound_mib']:.0f} ({args.memory_bound:g}x start)",
            mem["rss_max_mib"] <= mem["bound_mib"],
        ),
        (
            "recovery: answers 200 back at 90% of capacity (10 s window), s",
            rec["goodput_back_s"],
            "<= 1",
            rec["goodput_back_s"] is not None and rec["goodput_back_s"] <= 1,
        ),
        (
            "recovery: a new request answered 200 within normal latency, s",
            recovered,
            "<= 1",
            recovered is not None and recovered <= 1.0,
        ),
        (
            "goodput in the last 10 s of overload, % of capacity",
            list(over["goodput_pct_by_10s"].values())[-1],
            ">= 90 (not a floor: few answers)",
            None,
        ),
        (
            "engine busy per 200, overload and aftermath / capacity",
            None if vain is None else round(vain, 2),
            "~1 (not a floor)",
            None,
        ),
    ]
    return [{"metric": m, "value": v, "floor": f, "ok": ok} for m, v, f, ok in rows]


def warnings(results: dict[str, Any], load_at_start: tuple[float, ...]) -> list[str]:
    """Reasons not to trust this run's numbers."""
    found = []
    cap, client = results["capacity"], results["overload"]["client"]
    failed = {s: n for s, n in cap["statuses"].items() if s != "200"}
    if failed:
        found.append(
            f"the capacity loop got answers other than 200 ({failed}): the server could not "
            "serve its clients within the deadline, so 'capacity' is not the server's"
        )
    if cap["latency_ms"]["n"] < 10:
        found.append(f"only {cap['latency_ms']['n']} answers 200 measured the capacity")
    if client["lag_p99_ms"] is not None and client["lag_p99_ms"] > 100:
        found.append(f"the client fell behind its arrivals (lag p99 {client['lag_p99_ms']} ms)")
    cores = os.cpu_count() or 1
    if load_at_start[0] > cores:
        found.append(
            f"load average {load_at_start[0]:.1f} at the start on {cores} cores: other work "
            "shared the machine"
        )
    return found


def markdown(results: dict[str, Any]) -> str:
    cap, over, rec = results["capacity"], results["overload"], results["recovery"]
    warned = [f"WARNING: {w}" for w in results.get("warnings", [])]
    lines = [
        *warned,
        *([""] if warned else []),
        f"Capacity (closed loop, {cap['clients']} clients, {cap['duration_s']:g} s): "
        f"{cap['rps_200']:.2f} answers 200/s, p50 {cap['latency_ms']['p50']:.0f} ms. "
        f"Overload: {over['factor']:g}x = {over['rate']:.2f} req/s offered for "
        f"{over['duration_s']:g} s; answers by status {over['statuses']}.",
        "",
        "| floor | measured | target | |",
        "| --- | --- | --- | --- |",
    ]
    for row in results["floors"]:
        mark = {True: "pass", False: "**FAIL**", None: ""}[row["ok"]]
        lines.append(f"| {row['metric']} | {row['value']} | {row['floor']} | {mark} |")
    lines += [
        "",
        f"504 answers: {over['answers_504']} ({over['answers_504_by_cause']}); recovery "
        f"probes {rec['statuses']}. Goodput by 10 s, % of capacity: "
        f"{over['goodput_pct_by_10s']}. Engine busy s per 200: capacity "
        f"{_fmt(cap['per_success']['engine_busy_s_per_200'])}, overload "
        f"{_fmt(over['per_success']['engine_busy_s_per_200'])}, overload and aftermath "
        f"({over['aftermath_s']:g} s, until the engines were idle) "
        f"{_fmt(over['per_success_with_aftermath']['engine_busy_s_per_200'])}; server CPU s "
        f"per 200: {_fmt(cap['per_success']['server_cpu_s_per_200'])}, "
        f"{_fmt(over['per_success']['server_cpu_s_per_200'])}, "
        f"{_fmt(over['per_success_with_aftermath']['server_cpu_s_per_200'])}; engine busy "
        f"after the last answer {over['engine_busy_s_after_last_answer']} s. Client: lag p99 "
        f"{over['client']['lag_p99_ms']} ms, {over['client']['dropped_at_max_inflight']} "
        "arrivals dropped at its in-flight bound.",
        "",
        "Answers per second (by completion; `sent`: overload arrivals; `recovery`: the "
        "closed loop started when the arrivals ended):",
        "",
    ]
    columns = _status_columns(results)
    names = [c.replace("recovery_", "recovery ") for c in columns]
    lines.append("| s | sent | " + " | ".join(names) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for row in results["per_second"]:
        cells = " | ".join(str(row.get(c, 0)) for c in columns)
        lines.append(f"| {row['t']} | {row['sent']} | {cells} |")
    return "\n".join(lines) + "\n"


def _status_columns(results: dict[str, Any]) -> list[str]:
    """Status columns of the per-second table: the overload's, then the recovery's."""
    keys = {k for row in results["per_second"] for k in row} - {"t", "sent"}
    return sorted(keys, key=lambda k: (k.startswith("recovery_"), k))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--service", default=OCR, help="module:Class to serve (the OCR demo)")
    parser.add_argument("--server-args", default="", help="extra `splitserve serve` arguments")
    parser.add_argument("--images", type=int, default=10, help="documents to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unloaded-requests", type=int, default=6)
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--capacity-warmup", type=float, default=5.0)
    parser.add_argument("--capacity-duration", type=float, default=30.0)
    parser.add_argument("--factor", type=float, default=10.0, help="offered load / capacity")
    parser.add_argument("--overload-duration", type=float, default=40.0)
    parser.add_argument(
        "--overload-warmup",
        type=float,
        default=5.0,
        help="seconds of overload before the steady state",
    )
    parser.add_argument(
        "--recovery-min", type=float, default=10.0, help="least seconds of the recovery loop"
    )
    parser.add_argument("--recovery-max", type=float, default=60.0)
    parser.add_argument(
        "--idle-max", type=float, default=60.0, help="longest wait for idle engines at the end"
    )
    parser.add_argument(
        "--memory-bound",
        type=float,
        default=1.25,
        help="bound on the server's RSS, as a multiple of it at the overload's start",
    )
    parser.add_argument(
        "--client-timeout",
        type=float,
        default=35.0,
        help="seconds per request (the server's own deadline is 30 s)",
    )
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=0,
        help="open-loop bound (default: rate x client timeout)",
    )
    parser.add_argument("--max-requests", type=int, default=20000, help="per closed loop")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 when a floor fails")
    args = parser.parse_args(argv)

    started = time.time()
    load_at_start = os.getloadavg()
    image_dir = Path(tempfile.mkdtemp(prefix="overload-images-"))
    paths = generate_documents(image_dir, args.images, seed=args.seed, truth=False)
    bodies = [(p.read_bytes(), CONTENT_TYPES[p.suffix]) for p in paths]
    serve_args = [args.service, *shlex.split(args.server_args)]
    port = free_port()
    proc = start_server(serve_args, port)
    try:
        server = Server(proc, port, _one_service(port))
        results = asyncio.run(_measure_and_close(args, server, bodies))
    finally:
        stop_server(proc)
        for p in paths:
            p.unlink(missing_ok=True)
        image_dir.rmdir()
    results["floors"] = floors(results, args)
    results["warnings"] = warnings(results, load_at_start)
    results["settings"] = {
        "command": f"splitserve serve {' '.join(serve_args)} --host 127.0.0.1 --port {port}",
        "arguments": vars(args) | {"json": str(args.json), "markdown": str(args.markdown)},
        "loadavg_at_start": load_at_start,
        "wall_s": round(time.time() - started, 1),
    }
    results["machine"] = machine()
    text = markdown(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    failed = [row["metric"] for row in results["floors"] if row["ok"] is False]
    return 1 if args.check and failed else 0


async def _measure_and_close(args: argparse.Namespace, server: Server, bodies) -> dict[str, Any]:
    server.admin = kit.session(4, 10.0)
    try:
        return await measure(args, server, bodies)
    finally:
        await server.admin.close()


def _one_service(port: int) -> str:
    names = kit.service_names(port)
    if len(names) != 1:
        raise RuntimeError(f"expected one service, the server serves {names}")
    return names[0]


if __name__ == "__main__":
    sys.exit(main())
