"""The server's own cost: the no-op service in split mode (1 and 2 CPU workers) and in
threaded mode, under the same closed-loop load.

The body is 16 bytes (four float32 values, ``application/octet-stream``); the no-op
service runs them through an identity ONNX model and answers them. For each server:

- the round trip at concurrency 1 (p50/p90/p99), with the aiohttp client and with the
  minimal raw client of ``loadgen`` (which shows what the client itself adds);
- requests/s at concurrency 1, 4, 16 and 64 (the max is the throughput);
- the time spent in each hop, from the ``X-Splitserve-Timings`` header, as per-request
  medians: ``outside`` = client latency - ``front_ms`` (uvicorn's HTTP parsing and
  answering, loopback TCP and the client; ``worker_ms`` stands in for ``front_ms`` in
  threaded mode); ``front<->worker`` = front_ms - worker_ms (two Unix-socket messages,
  the worker's dispatch and, above concurrency 1, the wait for a free worker: the
  header's front_queue_ms is stamped after the send to the worker, so it is not
  subtracted); ``service`` = worker_ms - infer_wait_ms (the service's pre- and
  post-processing); ``worker<->engine`` = infer_wait_ms - engine_queue_ms -
  engine_compute_ms (two messages, the engine's decode/reply and its thread hand-offs);
- the CPU time each server process spends per request (from /proc), which shows where
  the cores go at saturation.

All servers are started first (127.0.0.1, free ports) and measured in interleaved
rounds, so that the machine's noise hits every configuration alike; the numbers quoted
are medians over the rounds. The servers are stopped by pid (SIGINT) at the end.

``--fronts 1 2`` measures every split configuration once per number of fronts
(``split-2w-1f``, ``split-2w-2f``: ``--fronts`` processes sharing the port), side by side
with the rest; without it the servers choose (``--fronts auto``).

Run: ``python benchmarks/noop.py [--quick] [--fronts N ...] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import (
    REPO_ROOT,
    Result,
    finish_report,
    free_port,
    machine,
    run_closed_loop,
    start_server,
    stop_server,
)

SERVICE = "examples.noop.service:Noop"
MODEL = REPO_ROOT / "examples" / "noop" / "identity.onnx"
BODY = np.arange(4, dtype=np.float32).tobytes()  # 16 bytes
CONTENT_TYPE = "application/octet-stream"
CONFIGS: dict[str, list[str]] = {
    "split-1w": [SERVICE, "--mode", "split", "--cpu-workers", "1"],
    "split-2w": [SERVICE, "--mode", "split", "--cpu-workers", "2"],
    "threaded": [SERVICE, "--mode", "threaded"],
}
CONCURRENCY = (1, 4, 16, 64)
FLOOR_P50_MS = 1.0
# Split against threaded, side by side: max throughput at least threaded's, and p50 at
# concurrency 1 at most this many times threaded's.
FLOOR_P50_VS_THREADED = 1.5
MAX_REQUESTS = 200_000  # per measured point (each point is also bounded in time)
HOPS = (
    "latency",
    "outside",
    "front_queue_ms",
    "front_ms",
    "front<->worker",
    "worker_ms",
    "service",
    "infer_wait_ms",
    "worker<->engine",
    "engine_queue_ms",
    "engine_compute_ms",
)


def server_configs(names: list[str], fronts: list[str] | None) -> dict[str, list[str]]:
    """The servers to measure, by name: each of ``names``; a split one once per number
    of ``fronts`` when given (named ``<config>-<N>f``)."""
    servers: dict[str, list[str]] = {}
    for name in names:
        if not fronts or not name.startswith("split"):
            servers[name] = CONFIGS[name]
            continue
        for n in fronts:
            servers[f"{name}-{n}f"] = [*CONFIGS[name], "--fronts", n]
    return servers


def hop_values(latency: float, t: dict[str, float]) -> dict[str, float]:
    """The hops of one request (ms); missing fields give no value."""
    out = {"latency": latency}
    for key in ("front_queue_ms", "front_ms", "worker_ms", "infer_wait_ms"):
        if key in t:
            out[key] = t[key]
    for key in ("engine_queue_ms", "engine_compute_ms"):
        if key in t:
            out[key] = t[key]
    served = t.get("front_ms", t.get("worker_ms"))
    if served is not None:
        out["outside"] = latency - served
    if {"front_ms", "worker_ms"} <= t.keys():
        # Not minus front_queue_ms: the front stamps that after its send to the worker, so
        # it includes the send and any preemption by the woken worker (it overlaps
        # worker_ms at concurrency 1). At concurrency 1 no request waits for a worker.
        out["front<->worker"] = t["front_ms"] - t["worker_ms"]
    if {"worker_ms", "infer_wait_ms"} <= t.keys():
        out["service"] = t["worker_ms"] - t["infer_wait_ms"]
    if {"infer_wait_ms", "engine_queue_ms", "engine_compute_ms"} <= t.keys():
        out["worker<->engine"] = t["infer_wait_ms"] - t["engine_queue_ms"] - t["engine_compute_ms"]
    return out


def hop_medians(result: Result) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for latency, timings in result.parsed_samples():
        for k, v in hop_values(latency, timings).items():
            values.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in values.items()}


# --- CPU per process, from /proc -----------------------------------------------------

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> tuple[str, float] | None:
    """(name, user+system CPU seconds) of one process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return name, (int(fields[11]) + int(fields[12])) * _TICK_S


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        kids: list[int] = []
        for task in tasks:
            text = (task / "children").read_text().split()
            kids.extend(int(k) for k in text)
        return kids
    except OSError:
        return []


# Process names (15 characters at most) of a split server's children, by role.
_ROLES = {"splitserve-fron": "front", "splitserve-cpu-": "worker", "splitserve-engi": "engine"}


def server_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per process of a server (the supervisor and its direct children).

    Keys: ``main`` (the supervisor, or the whole threaded-mode server), ``front1``...,
    ``worker1``..., ``engine1``..., ``other`` (multiprocessing's resource tracker).
    """
    out: dict[str, float] = {}
    counts: dict[str, int] = {}
    for p in sorted(_children(pid)):
        got = _proc_cpu(p)
        if got is not None:
            role = _ROLES.get(got[0], "other")
            counts[role] = counts.get(role, 0) + 1
            label = f"{role}{counts[role]}" if role != "other" else role
            out[label] = out.get(label, 0.0) + got[1]
    got = _proc_cpu(pid)
    if got is not None:
        out["main"] = got[1]
    return out


# --- the benchmark --------------------------------------------------------------------


@dataclass
class Point:
    config: str
    client: str
    concurrency: int
    results: list[dict[str, Any]] = field(default_factory=list)  # one per round


def ensure_model() -> None:
    if not MODEL.exists():
        subprocess.run(
            [sys.executable, str(REPO_ROOT / "examples" / "noop" / "make_model.py")],
            cwd=REPO_ROOT,
            check=True,
            timeout=120,
        )


def check_answer(port: int) -> None:
    """One request by hand: the no-op must echo the body."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/services/noop",
        data=BODY,
        headers={"Content-Type": CONTENT_TYPE},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read()
    if body != BODY:
        raise RuntimeError(f"no-op answered {body!r}, expected {BODY!r}")


def measure(
    config: str, port: int, pid: int, client: str, concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    before = server_cpu(pid)
    result = run_closed_loop(
        f"http://127.0.0.1:{port}/v1/services/noop",
        [BODY],
        CONTENT_TYPE,
        concurrency,
        args.duration,
        args.warmup,
        MAX_REQUESTS,
        client,
    )
    after = server_cpu(pid)
    total = result.requests + result.warmup_requests
    cpu_us = {k: (after[k] - before[k]) * 1e6 / total for k in after if k in before and total}
    row = result.to_dict()
    row["hops_ms"] = hop_medians(result)
    row["server_cpu_us_per_req"] = cpu_us
    return row


def median_of(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if not math.isnan(r[key])]
    return statistics.median(values) if values else float("nan")


def summarise(points: list[Point]) -> list[dict[str, Any]]:
    out = []
    for p in points:
        rows = p.results
        hops: dict[str, float] = {}
        for hop in HOPS:
            values = [r["hops_ms"][hop] for r in rows if hop in r["hops_ms"]]
            if values:
                hops[hop] = statistics.median(values)
        cpu: dict[str, float] = {}
        for name in rows[0]["server_cpu_us_per_req"]:
            values = [r["server_cpu_us_per_req"].get(name, math.nan) for r in rows]
            cpu[name] = statistics.median(values)
        errors: dict[str, int] = {}
        for r in rows:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        out.append(
            {
                "config": p.config,
                "client": p.client,
                "concurrency": p.concurrency,
                "rounds": len(rows),
                "rps": median_of(rows, "rps"),
                "rps_min": min(r["rps"] for r in rows),
                "rps_max": max(r["rps"] for r in rows),
                "p50_ms": median_of(rows, "p50_ms"),
                "p50_ms_min": min(r["p50_ms"] for r in rows),
                "p50_ms_max": max(r["p50_ms"] for r in rows),
                "p90_ms": median_of(rows, "p90_ms"),
                "p99_ms": median_of(rows, "p99_ms"),
                "max_ms": max(r["max_ms"] for r in rows),
                "requests": sum(r["requests"] for r in rows),
                "errors": errors,
                "client_cpu_ms_per_req": median_of(rows, "client_cpu_ms_per_req"),
                "hops_ms": hops,
                "engine_batch_rows": median_of(
                    [{"v": r["timings_ms"].get("engine_batch_rows", math.nan)} for r in rows], "v"
                ),
                "server_cpu_us_per_req": cpu,
            }
        )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    ensure_model()
    plan = [("aiohttp", c) for c in args.concurrency]
    if args.raw_client:
        plan.append(("raw", 1))
    servers: dict[str, tuple[int, Any]] = {}
    names = list(args.servers)
    points = [Point(cfg, client, c) for cfg in names for client, c in plan]
    try:
        for cfg in names:
            port = free_port()
            started = time.monotonic()
            proc = start_server(args.servers[cfg], port)
            servers[cfg] = (port, proc)
            check_answer(port)
            print(
                f"{cfg}: ready in {time.monotonic() - started:.1f}s on 127.0.0.1:{port} "
                f"(pid {proc.pid}, log {getattr(proc, 'log_path', None)})",
                flush=True,
            )
        for r in range(args.rounds):
            # Rotate the configurations' order each round (side by side, no fixed first).
            order = names[r % len(names) :] + names[: r % len(names)]
            for cfg in order:
                port, proc = servers[cfg]
                for point in points:
                    if point.config != cfg:
                        continue
                    row = measure(cfg, port, proc.pid, point.client, point.concurrency, args)
                    point.results.append(row)
                    print(
                        f"  round {r + 1}/{args.rounds} {cfg:<12} {point.client:<7} "
                        f"c={point.concurrency:<3} {row['rps']:8.0f} req/s  "
                        f"p50 {row['p50_ms']:6.3f} ms  p99 {row['p99_ms']:7.3f} ms  "
                        f"errors {row['errors'] or 0}",
                        flush=True,
                    )
    finally:
        for cfg, (_, proc) in servers.items():
            code = stop_server(proc)
            print(f"{cfg}: stopped (pid {proc.pid}, exit code {code})", flush=True)
    summary = summarise(points)
    floors = []
    for row in summary:
        if row["config"].startswith("split") and row["concurrency"] == 1:
            floors.append(
                {
                    "config": row["config"],
                    "client": row["client"],
                    "p50_ms": row["p50_ms"],
                    "required_ms": FLOOR_P50_MS,
                    "pass": row["p50_ms"] <= FLOOR_P50_MS,
                    "headroom_ms": FLOOR_P50_MS - row["p50_ms"],
                }
            )
    throughput = {
        cfg: max(
            (row for row in summary if row["config"] == cfg and row["client"] == "aiohttp"),
            key=lambda row: row["rps"],
        )
        for cfg in names
    }
    return {
        "summary": summary,
        "floors": floors,
        "versus_threaded": versus_threaded(summary, throughput),
        "max_rps": {
            cfg: {"rps": row["rps"], "concurrency": row["concurrency"]}
            for cfg, row in throughput.items()
        },
        "points": [
            {
                "config": p.config,
                "client": p.client,
                "concurrency": p.concurrency,
                "rounds": p.results,
            }
            for p in points
        ],
    }


def versus_threaded(
    summary: list[dict[str, Any]], throughput: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each split configuration against threaded mode (when both ran): the floors."""
    if "threaded" not in throughput:
        return []

    def p50_c1(cfg: str) -> float:
        rows = [r for r in summary if r["config"] == cfg and r["client"] == "aiohttp"]
        return next((r["p50_ms"] for r in rows if r["concurrency"] == 1), math.nan)

    out = []
    for cfg, row in throughput.items():
        if cfg == "threaded":
            continue
        rps_ratio = row["rps"] / throughput["threaded"]["rps"]
        p50_ratio = p50_c1(cfg) / p50_c1("threaded")
        out.append(
            {
                "config": cfg,
                "max_rps_ratio": rps_ratio,
                "p50_c1_ratio": p50_ratio,
                "pass": rps_ratio >= 1 and p50_ratio <= FLOOR_P50_VS_THREADED,
            }
        )
    return out


def _fmt(value: float | None, width: int = 7, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}.{digits}f}"


def print_report(results: dict[str, Any]) -> None:
    summary = results["summary"]
    print("\nRound trip at concurrency 1 (ms; medians over rounds)")
    print(
        f"{'config':<12} {'client':<8} {'p50':>7} {'p90':>7} {'p99':>7} {'p50 range':>15} "
        f"{'req/s':>7} {'client CPU/req':>15}"
    )
    for row in summary:
        if row["concurrency"] != 1:
            continue
        p50_range = f"{row['p50_ms_min']:.3f}-{row['p50_ms_max']:.3f}"
        print(
            f"{row['config']:<12} {row['client']:<8} {_fmt(row['p50_ms'])} "
            f"{_fmt(row['p90_ms'])} {_fmt(row['p99_ms'])} {p50_range:>15} "
            f"{row['rps']:>7.0f} {_fmt(row['client_cpu_ms_per_req'], 12)} ms"
        )
    print("\nThroughput (aiohttp client; req/s median [min-max] over rounds; latency ms)")
    print(
        f"{'config':<12} {'conc':>4} {'req/s':>7} {'range':>13} {'p50':>7} {'p90':>7} "
        f"{'p99':>7} {'max':>8} {'errors':>8}"
    )
    for row in summary:
        if row["client"] != "aiohttp":
            continue
        rng = f"{row['rps_min']:.0f}-{row['rps_max']:.0f}"
        errors = sum(row["errors"].values())
        print(
            f"{row['config']:<12} {row['concurrency']:>4} {row['rps']:>7.0f} {rng:>13} "
            f"{_fmt(row['p50_ms'])} {_fmt(row['p90_ms'])} {_fmt(row['p99_ms'])} "
            f"{_fmt(row['max_ms'], 8)} {errors:>8}"
        )
    print("\nWhere the time goes (per-request medians, ms; medians over rounds)")
    short = {
        "latency": "client",
        "outside": "outside",
        "front_queue_ms": "f.queue",
        "front_ms": "front",
        "front<->worker": "f<->w",
        "worker_ms": "worker",
        "service": "service",
        "infer_wait_ms": "infer",
        "worker<->engine": "w<->e",
        "engine_queue_ms": "e.queue",
        "engine_compute_ms": "e.comp",
    }
    print(
        f"{'config':<12} {'client':<8} {'conc':>4} "
        + " ".join(f"{v:>7}" for v in short.values())
        + f" {'rows':>5}"
    )
    for row in summary:
        print(
            f"{row['config']:<12} {row['client']:<8} {row['concurrency']:>4} "
            + " ".join(_fmt(row["hops_ms"].get(k)) for k in short)
            + f" {_fmt(row['engine_batch_rows'], 5, 1)}"
        )
    print(
        "  outside = client - front (threaded: client - worker); f<->w = front - worker; "
        "service = worker - infer;\n  w<->e = infer - e.queue - e.comp; "
        "rows = the engine's batch size (median)"
    )
    print("\nCPU per request (us, per server process and the client; medians over rounds)")
    for row in summary:
        if row["client"] != "aiohttp":
            continue
        cpu = row["server_cpu_us_per_req"]
        parts = "  ".join(f"{k}={v:.0f}" for k, v in cpu.items() if not math.isnan(v))
        total = sum(v for v in cpu.values() if not math.isnan(v))
        client = row["client_cpu_ms_per_req"] * 1000
        print(
            f"{row['config']:<12} c={row['concurrency']:<3} server={total:>4.0f}  {parts}  "
            f"(client={client:.0f})"
        )
    print(
        "\nMax throughput: "
        + ", ".join(
            f"{cfg} {v['rps']:.0f} req/s (c={v['concurrency']})"
            for cfg, v in results["max_rps"].items()
        )
    )
    for floor in results["versus_threaded"]:
        verdict = "PASS" if floor["pass"] else "FAIL"
        print(
            f"Floor: {floor['config']} / threaded: max req/s x{floor['max_rps_ratio']:.2f} "
            f"(>= 1), p50 at c=1 x{floor['p50_c1_ratio']:.2f} (<= {FLOOR_P50_VS_THREADED}): "
            f"{verdict}"
        )
    for floor in results["floors"]:
        verdict = "PASS" if floor["pass"] else "FAIL"
        print(
            f"Floor: {floor['config']} ({floor['client']} client) p50 at c=1 "
            f"{floor['p50_ms']:.3f} ms vs <= {floor['required_ms']} ms: {verdict} "
            f"(headroom {floor['headroom_ms']:+.3f} ms)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="well under a minute")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each point")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=list(CONCURRENCY), help="closed-loop clients"
    )
    parser.add_argument(
        "--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="servers"
    )
    parser.add_argument(
        "--no-raw-client",
        dest="raw_client",
        action="store_false",
        help="skip the concurrency-1 point with the raw client",
    )
    parser.add_argument(
        "--fronts",
        nargs="+",
        metavar="N",
        help="run each split configuration with each of these --fronts (e.g. 1 2)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    args.servers = server_configs(args.configs, args.fronts)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 0.5, 0.2
        args.concurrency = [1, 16]
    started = time.monotonic()
    load_before = os.getloadavg()
    results = run(args)
    results["machine"] = machine()
    results["settings"] = {
        "quick": args.quick,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "concurrency": args.concurrency,
        "configs": args.servers,
        "body_bytes": len(BODY),
        "loadavg_at_start": load_before,
        "wall_s": time.monotonic() - started,
    }
    print_report(results)
    finish_report(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
