"""The overload and chaos benchmarks, run in tiny configurations (seconds each), so that
they keep working: real servers, real kills, their JSON read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(out: Path, name: str, *args: str, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_overload_tiny(tmp_path: Path) -> None:
    """Capacity, a 4 s overload at 10x and recovery on the OCR demo (one closed-loop
    client; an 8 s deadline, so that what was queued drains in seconds)."""
    results = run_script(
        tmp_path / "overload.json",
        "overload.py",
        *("--clients", "1", "--images", "2", "--unloaded-requests", "2"),
        *("--capacity-warmup", "1", "--capacity-duration", "6"),
        *("--overload-duration", "4", "--overload-warmup", "1"),
        *("--recovery-min", "1", "--recovery-max", "3", "--idle-max", "3"),
        *("--server-args", "--request-timeout 8", "--client-timeout", "12"),
        timeout=120,
    )
    capacity, over = results["capacity"], results["overload"]
    assert capacity["rps_200"] > 0
    assert abs(over["rate"] - 10 * capacity["rps_200"]) < 0.01
    # Every request sent in the overload got an answer, each counted once per second.
    answered = sum(over["statuses"].values())
    assert answered == over["client"]["sent"] > 0
    counted = sum(
        n for row in results["per_second"] for k, n in row.items() if k.lstrip("-").isdigit()
    )
    assert counted == answered
    assert sum(row["sent"] for row in results["per_second"]) == answered
    assert over["answers_504"] == over["statuses"].get("504", 0)
    assert sum(over["answers_504_by_cause"].values()) == over["answers_504"]
    memory = over["memory"]
    assert memory["rss_start_mib"] > 100 and memory["processes"] >= 5  # supervisor + 4
    assert memory["rss_max_mib"] >= memory["rss_start_mib"]
    assert results["capacity"]["per_success"]["engine_busy_s"] > 0
    assert results["recovery"]["probes"] > 0
    assert len(results["floors"]) == 8 and all("metric" in row for row in results["floors"])


def test_chaos_three_kills(tmp_path: Path) -> None:
    """Three kill -9 of the no-op server's children under load: each is replaced and the
    server is ready again; after SIGTERM nothing of the run is left."""
    results = run_script(
        tmp_path / "chaos.json", "chaos.py", "--kills", "3", "--interval", "1.5", timeout=90
    )
    summary, kills = results["summary"], results["kills"]
    assert summary["kills"] == len(kills) == 3
    for kill in kills:
        assert kill["kind"] in ("worker", "engine")
        assert kill["replacement_pid"] not in (None, kill["pid"])
        assert kill["ready_s"] is not None and kill["restart_s"] is not None
    assert summary["requests"] > 0 and summary["statuses"].get("200", 0) > 0
    assert summary["exit_code"] == 0
    assert summary["leaked_processes"] == {}
    assert summary["segments_left"] == []
