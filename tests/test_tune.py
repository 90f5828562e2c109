"""`splitserve tune` on a real service: trials served and measured, a config written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

from tests.conftest import ROOT, Server


def test_tune_measures_candidates_and_writes_a_config_serve_reads(tmp_path) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"values": [1.0, 2.0, 3.0]}))
    out = tmp_path / "splitserve.toml"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "splitserve.cli",
            "tune",
            "tests.services:Echo",
            "--body-file",
            str(body),
            "--content-type",
            "application/json",
            "--concurrency",
            "4",
            "--duration",
            "1",
            "--warmup",
            "0.3",
            "--budget",
            "50",
            "--output",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if re.match(r"[* ] *\d+ ", line)]
    assert len(lines) >= 3, run.stdout  # the reference, the default layout, a neighbour
    assert "threaded mode (reference)" in run.stdout
    assert sum(line.startswith("*") for line in lines) == 1  # the best is marked
    assert "x threaded mode's requests/s" in run.stdout
    written = tomllib.loads(out.read_text())
    assert written["services"] == ["tests.services:Echo"]
    assert written["mode"] == "split"
    assert {
        "engine_replicas",
        "engine_threads",
        "cpu_workers",
        "worker_concurrency",
        "fronts",
    } <= set(written)
    server = Server([], "--config", str(out))  # serve reads what tune wrote
    try:
        r = server.post("echo", json={"values": [4.0]})
        assert r.status_code == 200 and r.json()["values"] == [[4.0]]
    finally:
        server.stop()


def test_fronts_are_searched_where_cores_allow_and_never_beyond_a_workers_slots() -> None:
    from splitserve.tune import Candidate, neighbours, setting_values

    eight = Candidate().with_setting("worker_concurrency", 8).with_setting("fronts", 1)
    assert setting_values("fronts", eight, cores=2) == [1]  # one core's HTTP work is enough
    assert setting_values("fronts", eight, cores=16) == [1, 2, 4]
    four_fronts = eight.with_setting("fronts", 4)
    tried = list(neighbours(four_fronts, cores=16, declared={}))
    assert eight in tried  # fewer fronts
    assert all(c.get("fronts") <= c.get("worker_concurrency") for c in tried)
    assert four_fronts.with_setting("worker_concurrency", 2) not in tried
