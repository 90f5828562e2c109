"""benchmarks/v2_overhead.py in a tiny configuration (seconds), so that it keeps working:
every point runs through the real app, servicer and worker code and answers 200."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_v2_overhead_tiny() -> None:
    script = ROOT / "benchmarks" / "v2_overhead.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--rounds", "1", "--calls", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for point in (
        "front/plain /v1 route",
        "front/v2 binary HTTP, noop.model",
        "front/gRPC ModelInfer, noop.model",
        "front/v2 binary HTTP, noop service",
        "worker/invoke_model (v2 engine model)",
    ):
        assert point in proc.stdout, proc.stdout
    assert "v2 binary minus plain" in proc.stdout
