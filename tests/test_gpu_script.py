"""benchmarks/gpu/run.py --dry-run: the GPU experiment's script, end to end, on the CPU.

It starts real servers (threaded and split) of examples/vision on the SIMULATED
accelerator; this checks that it finishes in time, labels everything SIMULATED, and
writes the table's fields, so the script is known to work before a GPU run is spent on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.py"
TABLE_FIELDS = {
    "config",
    "mode",
    "concurrency",
    "rps",
    "p50_ms",
    "p99_ms",
    "gpu_util_pct",
    "device_busy_pct",
    "mean_batch",
    "ratio_split_threaded",
    "ratio_gpu_limit",
    "errors",
}


def test_dry_run_writes_a_simulated_table(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "SIMULATED accelerator (dry run)" in out
    assert '"latency_ms": [' in out

    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["simulated"] is True and report["label"] == "SIMULATED"
    assert report["gpu"]["name"] == "SIMULATED"
    assert report["skipped"] == [] and report["failed"] == []
    modes = {row["mode"] for row in report["table"]}
    assert modes == {"threaded", "split"}
    for row in report["table"]:
        assert set(row) >= TABLE_FIELDS, TABLE_FIELDS - set(row)
        assert row["rps"] > 0 and row["errors"] == 0
        assert row["p50_ms"] <= row["p99_ms"]
        assert row["gpu_util_pct"] is None  # no NVML on a dry run: never a made-up figure
        assert 0 < row["device_busy_pct"] <= 100
        assert row["ratio_gpu_limit"] > 0
        # every table line printed says SIMULATED
        assert f"| SIMULATED {row['config']} |" in out

    # engine only: the simulated device's own model, recovered by the least-squares fit
    sizes = [r["batch"] for r in report["engine_only"]]
    assert sizes == sorted(sizes) and len(sizes) >= 4
    a, b = report["engine_info"]["options"]["latency_ms"]
    fit = report["latency_model"]
    assert abs(fit["b_ms"] - b) < 0.25 * b + 0.02
    assert abs(fit["a_ms"] - a) < 0.5 * a + 0.5
    assert report["gpu_limit_rps"] > 0
    assert (tmp_path / "gpu_bench.md").read_text().startswith("SIMULATED")
    assert report["elapsed_s"] < 120


def test_engine_precision_script_dry_run(tmp_path: Path) -> None:
    """benchmarks/gpu/engines.py --dry-run: every configuration at batch 1, 8, 32, and the
    low-precision engine checked against fp32 (on the CPU: bf16 eager)."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/gpu/engines.py"),
            "--dry-run",
            "--seconds",
            "0.2",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "gpu_engines.json").read_text())
    assert report["dry_run"] and not report["failed"]
    names = [c["info"]["config"] for c in report["configs"]]
    assert names == ["fp32 eager", "bf16 eager"]
    for config in report["configs"]:
        assert [r["batch"] for r in config["rows"]] == [1, 8, 32]
        assert all(r["images_per_s"] > 0 for r in config["rows"])
    check = report["configs"][1]["check"]
    assert check["top1_agree_vs_fp32"] >= 0.75 and check["relative_l2_vs_fp32"] < 0.05
    assert "DRY RUN" in (tmp_path / "gpu_engines.md").read_text()
