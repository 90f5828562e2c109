"""Serve one service under several server configurations and load each the same way.

Shared by the OCR and the simulated-accelerator comparisons: each configuration is
started, checked, loaded in a closed loop at each concurrency and stopped before the
next one starts (they never share the cores); rounds interleave the configurations so
that drift of a shared machine hits them alike; the summary takes medians over rounds.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import free_port, run_closed_loop, start_server, stop_server


def run_configs(
    service: str | None,
    route: str | dict[str, str],
    configs: dict[str, list[str]],
    bodies: list[bytes],
    content_type: str,
    concurrencies: list[int],
    *,
    rounds: int,
    duration_s: float,
    warmup_s: float,
    check: Callable[[str], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per (round, configuration, concurrency); ``check(url)`` runs first.

    ``service=None``: each configuration's arguments name their own service first, and
    ``route`` maps configuration names to their service routes.
    """
    rows: list[dict[str, Any]] = []
    for round_no in range(rounds):
        for name, args in configs.items():
            port = free_port()
            proc = start_server([service, *args] if service else list(args), port)
            path = route if isinstance(route, str) else route[name]
            url = f"http://127.0.0.1:{port}/v1/services/{path}"
            try:
                checked = check(url) if check else {}
                for concurrency in concurrencies:
                    result = run_closed_loop(
                        url, bodies, content_type, concurrency, duration_s, warmup_s, 1_000_000
                    )
                    rows.append({"config": name, "round": round_no, **checked, **result.to_dict()})
                    print(
                        f"round {round_no} {name:44s} c={concurrency:<3d} "
                        f"{result.rps:8.2f} req/s  p50 {result.p50_ms:8.1f} ms"
                        f"  p99 {result.p99_ms:8.1f} ms  errors {result.errors}",
                        flush=True,
                    )
            finally:
                stop_server(proc)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration and concurrency: medians over rounds (errors summed)."""
    keys = list(dict.fromkeys((r["config"], r["concurrency"]) for r in rows))
    out = []
    for name, concurrency in keys:
        runs = [r for r in rows if (r["config"], r["concurrency"]) == (name, concurrency)]
        out.append(
            {
                "config": name,
                "concurrency": concurrency,
                "rounds": len(runs),
                "rps": statistics.median(r["rps"] for r in runs),
                "rps_all": [round(r["rps"], 3) for r in runs],
                "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                "errors": sum(sum(r["errors"].values()) for r in runs),
            }
        )
    return out


def print_summary(summary: list[dict[str, Any]], baseline_prefix: str = "threaded") -> None:
    """A markdown table, then for each concurrency the best split / best baseline ratio."""
    print(
        "| configuration | concurrency | requests/s (median) | per round | p50 ms | p99 ms "
        "| errors |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in summary:
        print(
            f"| {r['config']} | {r['concurrency']} | {r['rps']:.2f} | {r['rps_all']} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |"
        )
    for concurrency in dict.fromkeys(r["concurrency"] for r in summary):
        at = [r for r in summary if r["concurrency"] == concurrency]
        base = max((r["rps"] for r in at if r["config"].startswith(baseline_prefix)), default=0)
        split = max((r["rps"] for r in at if r["config"].startswith("split")), default=0)
        if base and split:
            print(
                f"concurrency {concurrency}: best split / best {baseline_prefix} = "
                f"{split / base:.3f}"
            )
