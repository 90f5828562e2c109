"""The simulated accelerator: its latency model, one device per server, its labels."""

from __future__ import annotations

import multiprocessing
import resource
import time
from pathlib import Path

import numpy as np
import pytest

from splitserve.engines.simulated import SimulatedEngine
from tests.conftest import Server

OPTIONS = {
    "inputs": {"x": {"shape": [None, 8], "dtype": "float32"}},
    "outputs": {"y": {"shape": [None, 3], "dtype": "float16"}},
    "latency_ms": [20.0, 5.0],
}


def test_latency_model_outputs_and_no_cpu(tmp_path: Path) -> None:
    engine = SimulatedEngine(OPTIONS, tmp_path)
    assert engine.simulated and engine.latency_s(4) == pytest.approx(0.040)
    batch = {"x": np.zeros((4, 8), dtype=np.float32)}
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    out = engine.run_batch(batch)
    elapsed = time.monotonic() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    assert out["y"].shape == (4, 3) and out["y"].dtype == np.float16
    assert 0.040 <= elapsed < 0.2
    assert (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime) < 0.02


def _run_once(device_dir: str, queue) -> None:
    engine = SimulatedEngine(OPTIONS, Path(device_dir))
    engine.run_batch({"x": np.zeros((4, 8), dtype=np.float32)})
    queue.put(time.monotonic())


def test_engine_processes_share_one_device(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run_once, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    ends = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    # three 40 ms runs on one device finish one after the other, not together
    assert ends[2] - ends[0] >= 0.075


@pytest.mark.parametrize(
    "options",
    [
        {**OPTIONS, "inputs": {}},
        {**OPTIONS, "outputs": {"y": {"shape": [3], "dtype": "float32"}}},
        {**OPTIONS, "outputs": {"y": {"shape": [None, None], "dtype": "float32"}}},
        {**OPTIONS, "latency_ms": [-1, 0]},
    ],
)
def test_bad_declarations_are_refused(options, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SimulatedEngine(options, tmp_path)


@pytest.mark.parametrize("mode", ["split", "threaded"])
def test_served_answers_and_stats_say_simulated(mode: str) -> None:
    from examples.simulated.service import photo

    args = ["--mode", "threaded"] if mode == "threaded" else ["--cpu-workers", "2"]
    server = Server(["examples.simulated.service:SimulatedDetector"], *args)
    try:
        r = server.post("simdet", content=photo(3), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        assert r.json()["simulated_accelerator"] is True
        assert r.json()["detections"]
        assert "simulated_accelerator=1" in r.headers["x-splitserve-timings"]
        assert (
            server.client.get("/v1/services").json()["services"]["simdet"]["models"]["model"][
                "backend"
            ]
            == "simulated"
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            models = server.client.get("/v1/stats").json()["models"]
            if models.get("simdet/model", {}).get("batches"):
                break
            time.sleep(0.2)
        assert models["simdet/model"]["simulated"] is True
    finally:
        server.stop()


def test_the_benchmark_script_runs(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "sim.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/simulated.py",
            "--quick",
            "--configs",
            "threaded, 8 threads",
            "split, 2 CPU workers",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SIMULATED" in proc.stdout
    result = json.loads(out.read_text())
    assert result["simulated_accelerator"] is True
    assert {r["config"] for r in result["summary"]} == {
        "threaded, 8 threads",
        "split, 2 CPU workers",
    }
    assert all(r["rps"] > 0 and r["errors"] == 0 for r in result["summary"])


def test_in_process_call_refuses_a_running_event_loop() -> None:
    import asyncio

    from examples.simulated.service import SimulatedDetector, photo
    from splitserve.runtime.inprocess import InProcessService

    service = InProcessService(SimulatedDetector)
    assert service.call(photo(1), "image/jpeg").status == 200

    async def from_a_handler() -> None:
        service.call(photo(1), "image/jpeg")

    with pytest.raises(RuntimeError, match="worker thread"):
        asyncio.run(from_a_handler())
