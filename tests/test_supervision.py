"""Crashes, overload, deadlines and shutdown: what happens to requests and processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import ROOT, Server, alive, children_of, process_name, shm_segments


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_process_layout_and_clean_shutdown() -> None:
    server = Server(["tests.services:Echo", "tests.services:Pipeline"], "--cpu-workers", "3")
    try:
        roles = Counter(_name(pid)[:14] for pid in children_of(server.pid))
        # 3 CPU workers; engine 0 hosts every model, engine 1 the second replica of
        # pipeline/second; one front (the remaining child is multiprocessing's tracker)
        assert roles["splitserve-cpu"] == 3, roles
        assert roles["splitserve-eng"] == 2, roles
        assert roles["splitserve-fro"] == 1, roles
        x = os.urandom(1 << 20)  # through shared memory
        assert server.post("echo", content=x).content == x
        pids = children_of(server.pid)
        assert shm_segments(server.pid), "large tensors should have used shared memory"
    finally:
        code = server.stop()
    assert code == 0, server.log()
    assert wait_until(lambda: not [p for p in pids if alive(p)], 10)
    assert shm_segments(server.pid) == []


def test_children_die_with_a_killed_supervisor() -> None:
    server = Server(["tests.services:Echo"], "--cpu-workers", "2")
    pids = children_of(server.pid)
    server.post("echo", content=os.urandom(1 << 20))
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)
    assert wait_until(lambda: not [p for p in pids if alive(p)], 15), server.log()
    # each child unlinks its own segments on the way out
    assert shm_segments(server.pid) == []
    server.stop()


def test_a_crashed_worker_fails_its_requests_clearly_and_is_replaced() -> None:
    server = Server(["tests.services:Echo"], "--cpu-workers", "2")
    try:
        workers = {pid for pid in children_of(server.pid) if "cpu" in _name(pid)}
        with ThreadPoolExecutor(8) as pool:
            good = [
                pool.submit(server.post, "echo", json={"values": [i], "sleep_ms": 50})
                for i in range(6)
            ]
            crash = server.post("echo", json={"values": [1], "crash": True})
            results = [f.result() for f in good]
        assert crash.status_code == 503, crash.text
        assert "CPU worker" in crash.json()["error"]["message"]
        assert crash.headers["retry-after"] == "1"
        # requests on the other worker (or the crashed one) got an answer, never a hang
        assert all(r.status_code in (200, 503) for r in results)
        assert any(r.status_code == 200 for r in results)

        def live_workers() -> set[int]:
            return {p for p in children_of(server.pid) if "cpu" in _name(p) and alive(p)}

        assert wait_until(lambda: len(live_workers()) == 2 and live_workers() != workers)
        server.wait_ready(30)
        for i in range(10):
            assert server.post("echo", json={"values": [i]}).status_code == 200
    finally:
        assert server.stop() == 0
    assert shm_segments(server.pid) == []


def test_a_crashed_engine_fails_waiting_calls_and_comes_back() -> None:
    server = Server(["tests.services:Echo"], "--cpu-workers", "2", "--engine-replicas", "1")
    try:
        (engine,) = [p for p in children_of(server.pid) if "engi" in _name(p)]
        os.kill(engine, signal.SIGKILL)
        r = server.post("echo", json={"values": [1]})
        # either it raced the restart and failed clearly, or the new engine answered
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert "engine" in r.json()["error"]["message"]
        server.wait_ready(60)
        assert wait_until(lambda: server.post("echo", json={"values": [2]}).status_code == 200)
        assert server.post("echo", json={"values": [3]}).json()["values"] == [[3.0]]
    finally:
        assert server.stop() == 0


def test_overload_answers_503_fast_and_deadlines_504() -> None:
    server = Server(
        ["tests.services:Echo"],
        "--cpu-workers",
        "1",
        "--worker-concurrency",
        "1",
        "--queue-size",
        "2",
        "--request-timeout",
        "2",
    )
    try:

        def slow(_: int) -> httpx.Response:
            return server.post("echo", json={"values": [1], "sleep_ms": 300})

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(slow, range(8)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(503) >= 4, codes
        assert codes.count(200) >= 1, codes
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers["retry-after"] == "1"
        assert "queued" in rejected.json()["error"]["message"]
        assert time.monotonic() - started < 10
        r = server.post("echo", json={"values": [1], "sleep_ms": 3000})
        assert r.status_code == 504, r.text
        assert server.post("echo", json={"values": [5]}).status_code in (200, 503)
        assert wait_until(lambda: server.post("echo", json={"values": [5]}).status_code == 200)
    finally:
        assert server.stop() == 0


def test_port_in_use_is_a_clear_error() -> None:
    server = Server(["tests.services:Echo"], "--cpu-workers", "1")
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "splitserve.cli",
                "serve",
                "tests.services:Echo",
                "--port",
                str(server.port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert out.returncode != 0
        assert f"cannot listen on 127.0.0.1:{server.port}" in out.stderr
    finally:
        server.stop()


def _name(pid: int) -> str:
    return process_name(pid)
