"""The peer benchmark runs: Flask on gunicorn (gthread and sync) serves the OCR service,
answers as RapidOCR does, listens on 127.0.0.1 only, takes a short load without errors
and leaves no process behind.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

MISSING = [m for m in ("flask", "gunicorn") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"the peers extra is not installed ({', '.join(MISSING)} missing): "
    "pip install -e '.[peers]'",
)


def test_quick_run_of_flask_and_gunicorn(tmp_path: Path) -> None:
    from benchmarks.peers import run_peers

    code = run_peers.main(["--quick", "--only", "flask", "gunicorn", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "peers.json").read_text())
    assert code == 0, json.dumps(out["starts"], indent=2)
    assert out["versions"]["flask"] and out["versions"]["gunicorn"]
    assert out["versions"]["onnxruntime"]
    starts = {s["peer"]: s for s in out["starts"]}
    assert set(starts) == {"flask", "gunicorn"}
    for name, processes in (("flask", 1), ("gunicorn", 2)):
        start = starts[name]
        assert "error" not in start, start.get("error")
        assert start["check"]["equivalent"], start["check"]
        # Every model-loading process reported in, with the requested (default) threads.
        assert len(start["processes"]) == processes
        assert all(p["engine_threads"] is None for p in start["processes"])
        assert start["listening"] and start["listening_beyond_loopback"] == [], start
        assert start["stop"]["left_running"] == [], start["stop"]
    rows = {r["peer"]: r for r in out["rows"]}
    assert set(rows) == {"flask", "gunicorn"}
    for row in rows.values():
        assert row["ok"] > 0 and row["errors"] == {}, row
        assert "worker_ms" in row["timings_ms"]  # the service's time came back in the header
    assert (tmp_path / "peers.md").read_text().count("| Flask + gunicorn") == 2
    assert (tmp_path / "peers.png").stat().st_size > 0
