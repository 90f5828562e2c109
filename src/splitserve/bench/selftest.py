"""``splitserve bench --selftest``: how many requests/s this client can drive at all.

A load generator must not be the bottleneck. This runs the closed loop against the
trivial server (``splitserve.bench.trivial``, one process on 127.0.0.1) and prints the
highest requests/s reached, the client's CPU per request and the server's CPU share.
When the trivial server used a whole core, the number is the server's ceiling, and the
client's ceiling on one free core is about 1000 / (client CPU ms per request).
"""

from __future__ import annotations

import argparse
import math
import os
import time

from splitserve.bench import report
from splitserve.bench.loadgen import Result, run_closed_loop
from splitserve.bench.servers import process_cpu_s, start_trivial, stop_server

DEFAULT_CONCURRENCY = (1, 4, 16, 64)
DEFAULT_DURATION_S = 2.0
DEFAULT_WARMUP_S = 0.5


def measure(
    concurrency: list[int],
    duration_s: float,
    warmup_s: float,
    max_requests: int,
    client: str = "raw",
    body_bytes: int = 16,
    progress: bool | None = None,
) -> tuple[list[Result], list[float | None]]:
    """Closed-loop levels against a fresh trivial server; the results and, per level, the
    server's CPU use (cores busy over the whole level, warm-up included)."""
    proc, port = start_trivial()
    url = f"http://127.0.0.1:{port}/selftest"
    results: list[Result] = []
    server_cores: list[float | None] = []
    try:
        for c in concurrency:
            bar = report.BarProgress(f"c={c}", warmup_s + duration_s, progress)
            cpu0, t0 = process_cpu_s(proc.pid), time.perf_counter()
            try:
                result = run_closed_loop(
                    url,
                    [bytes(body_bytes)],
                    "application/octet-stream",
                    c,
                    duration_s,
                    warmup_s,
                    max_requests,
                    client,
                    progress=bar,
                )
            finally:
                bar.close()
            cpu1, t1 = process_cpu_s(proc.pid), time.perf_counter()
            results.append(result)
            cores = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / (t1 - t0)
            server_cores.append(cores)
    finally:
        stop_server(proc)
    return results, server_cores


def summary(results: list[Result], server_cores: list[float | None]) -> str:
    """The ceiling in words: best req/s, the client's CPU per request, who limited it."""
    best = max(range(len(results)), key=lambda i: results[i].rps)
    r, cores = results[best], server_cores[best]
    cpu_ms = r.client_cpu_ms_per_req
    lines = [
        f"client ceiling ({r.client} client): {r.rps:.0f} req/s at {r.label}, "
        f"{cpu_ms:.3f} ms client CPU per request"
    ]
    if cpu_ms > 0 and not math.isnan(cpu_ms):
        client_cores = cpu_ms * r.rps / 1000.0
        lines.append(
            f"  -> about {1000.0 / cpu_ms:.0f} req/s per core the client has to itself; "
            f"it used {client_cores * 100:.0f}% of a core at that level"
        )
    if cores is not None:
        lines.append(
            f"  trivial server used {cores * 100:.0f}% of a core at that level"
            + (" (a core's worth: the server limited this number)" if cores > 0.9 else "")
        )
    lines.append(f"  machine: {os.cpu_count()} cores; client and server share them")
    return "\n".join(lines)


def selftest(args: argparse.Namespace) -> int:
    """Run the self-test with the command line's settings (or the self-test defaults)."""
    concurrency = list(args.concurrency or DEFAULT_CONCURRENCY)
    duration = DEFAULT_DURATION_S if args.duration is None else args.duration
    warmup = DEFAULT_WARMUP_S if args.warmup is None else args.warmup
    results, cores = measure(
        concurrency,
        duration,
        warmup,
        args.max_requests,
        args.client,
        args.body_bytes or 16,
        False if args.no_progress else None,
    )
    report.print_report(results, "self-test: trivial server on 127.0.0.1")
    print(summary(results, cores), flush=True)
    if args.json:
        settings = {"selftest": True, "concurrency": concurrency, "duration": duration}
        doc = report.document(results, results[0].url, settings)
        doc["server_cores"] = cores
        report.write_json(args.json, doc)
    if args.plot:
        report.plot(args.plot, results, "self-test: trivial server")
    return 0 if all(r.ok for r in results) else 1
