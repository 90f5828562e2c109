"""The no-op service, split and threaded, on this tree and on an earlier revision, side by
side: what a change did to the server's own cost, on a machine whose speed varies.

Issue floors compare split with threaded "within 10% of today's ratios"; both modes
share the HTTP layer, so a change there moves both, and a ratio measured on another
day (or another machine) is not comparable. This script starts four servers at once on
127.0.0.1 (the baseline revision's split and threaded, this tree's split and threaded;
the baseline checked out with ``git worktree add --detach`` into a temporary folder)
and measures them in interleaved rounds, so the noise falls on all alike. Per server:
p50 at concurrency 1, requests/s at each concurrency (closed loop, aiohttp client, as
benchmarks/noop.py) and the server's CPU per request (every process of the server,
from /proc); then split over threaded per tree, and this tree over the baseline.

    python benchmarks/noop_revisions.py --baseline REV [--rounds 4] [--duration 3]
        [--concurrency 1 16 64] [--split-args "--cpu-workers 2"] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import REPO_ROOT, free_port, machine, run_closed_loop
from noop import BODY, CONTENT_TYPE, SERVICE, server_cpu

from splitserve.bench.servers import start_server, stop_server


def checkout(revision: str, into: Path) -> Path:
    """``revision`` as a work tree of its own, with the no-op's model generated in it."""
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(into), revision],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [sys.executable, "examples/noop/make_model.py"], cwd=into, check=True, capture_output=True
    )
    return into


def serve(tree: Path, args: list[str]) -> tuple[subprocess.Popen, int]:
    """``splitserve serve`` of ``tree``'s own code (its src/ first on the path)."""
    port = free_port()
    env_path = f"{tree / 'src'}{os.pathsep}{tree}"
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env_path
    try:
        proc = start_server([SERVICE, *args], port, cwd=tree)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    return proc, port


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per point")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--split-args", default="--cpu-workers 2", help="split's layout flags")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if 1 not in args.concurrency:
        parser.error("--concurrency must include 1 (the p50 compared)")
    started, load_before = time.monotonic(), os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="splitserve-baseline-"))
    base_tree = checkout(args.baseline, scratch / "tree")
    split = ["--mode", "split", *shlex.split(args.split_args)]
    servers = {
        ("baseline", "split"): (base_tree, split),
        ("baseline", "threaded"): (base_tree, ["--mode", "threaded"]),
        ("this tree", "split"): (REPO_ROOT, split),
        ("this tree", "threaded"): (REPO_ROOT, ["--mode", "threaded"]),
    }
    running: dict[tuple[str, str], tuple[subprocess.Popen, int]] = {}
    rps: dict[tuple[str, str, int], list[float]] = {}
    p50: dict[tuple[str, str, int], list[float]] = {}
    cpu: dict[tuple[str, str, int], list[float]] = {}
    try:
        for key, (tree, flags) in servers.items():
            running[key] = serve(tree, flags)
        for r in range(args.rounds):
            for c in args.concurrency:
                for key, (proc, port) in running.items():
                    before = sum(server_cpu(proc.pid).values())
                    result = run_closed_loop(
                        f"http://127.0.0.1:{port}/v1/services/noop",
                        [BODY],
                        CONTENT_TYPE,
                        c,
                        args.duration,
                        args.warmup,
                        10**6,
                    )
                    spent = sum(server_cpu(proc.pid).values()) - before
                    sent = result.requests + result.warmup_requests
                    point = (*key, c)
                    rps.setdefault(point, []).append(result.rps)
                    p50.setdefault(point, []).append(result.p50_ms)
                    cpu.setdefault(point, []).append(spent * 1e6 / max(1, sent))
                    print(
                        f"round {r + 1}/{args.rounds} {key[0]:>9} {key[1]:<8} c={c:<3} "
                        f"{result.rps:7.0f} req/s  p50 {result.p50_ms:6.3f} ms",
                        flush=True,
                    )
    finally:
        for proc, _ in running.values():
            stop_server(proc)
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(base_tree)],
            cwd=REPO_ROOT,
            capture_output=True,
        )
        shutil.rmtree(scratch, ignore_errors=True)

    summary: dict[str, Any] = {}
    print("\ntree       mode      p50 c=1 ms   max req/s (c)   server CPU us/req at max")
    for tree, mode in servers:
        best = max(args.concurrency, key=lambda c: median(rps[(tree, mode, c)]))
        row = {
            "p50_c1_ms": median(p50[(tree, mode, 1)]),
            "max_rps": median(rps[(tree, mode, best)]),
            "max_at": best,
            "cpu_us_per_req_at_max": median(cpu[(tree, mode, best)]),
            "rps": {c: median(rps[(tree, mode, c)]) for c in args.concurrency},
        }
        summary[f"{tree}/{mode}"] = row
        print(
            f"{tree:<10} {mode:<9} {row['p50_c1_ms']:10.3f}   {row['max_rps']:7.0f} ({best:>2})"
            f"   {row['cpu_us_per_req_at_max']:8.0f}"
        )
    ratios = {}
    for tree in ("baseline", "this tree"):
        s, t = summary[f"{tree}/split"], summary[f"{tree}/threaded"]
        ratios[tree] = {
            "split_p50_over_threaded": s["p50_c1_ms"] / t["p50_c1_ms"],
            "split_max_over_threaded": s["max_rps"] / t["max_rps"],
        }
        print(
            f"{tree}: split/threaded p50 at c=1 x{ratios[tree]['split_p50_over_threaded']:.2f}, "
            f"max req/s x{ratios[tree]['split_max_over_threaded']:.2f}"
        )
    for mode in ("split", "threaded"):
        b, n = summary[f"baseline/{mode}"], summary[f"this tree/{mode}"]
        print(
            f"{mode}: this tree / baseline: p50 at c=1 x{n['p50_c1_ms'] / b['p50_c1_ms']:.2f}, "
            f"max req/s x{n['max_rps'] / b['max_rps']:.2f}, CPU per request "
            f"x{n['cpu_us_per_req_at_max'] / b['cpu_us_per_req_at_max']:.2f}"
        )
    m = machine()
    print(
        f"Machine: {m['nproc']} cores, {m['cpu']}; load average {load_before[0]:.2f} at start, "
        f"{m['loadavg_1_5_15'][0]:.2f} at end; {m['date']}; {time.monotonic() - started:.0f} s"
    )
    if args.json:
        out = {"baseline": args.baseline, "summary": summary, "ratios": ratios, "machine": m}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
