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
    server = Server(["tests.services:Echo"], "--cpu-workers", "2", "--crash-retries", "0")
    try:
        _both_workers_joined(server)
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


def _both_workers_joined(server: Server) -> None:
    """Ready means one CPU worker reached the front; these tests need both."""
    assert wait_until(lambda: server.log().count(") joined") >= 2, 30), server.log()


def _live(server: Server, kind: str) -> set[int]:
    return {p for p in children_of(server.pid) if kind in _name(p) and alive(p)}


def test_requests_on_a_killed_worker_are_sent_again_and_answered() -> None:
    server = Server(["tests.services:Echo"], "--cpu-workers", "2")
    try:
        _both_workers_joined(server)
        workers = _live(server, "cpu")
        with ThreadPoolExecutor(6) as pool:
            futures = [
                pool.submit(server.post, "echo", json={"values": [i], "sleep_ms": 400})
                for i in range(6)
            ]
            time.sleep(0.2)  # every request is in a worker's hands now (3 each)
            os.kill(min(workers), signal.SIGKILL)
            results = [f.result() for f in futures]
        # inference has no side effects: the dead worker's requests went to the other
        assert [r.status_code for r in results] == [200] * 6, [r.text for r in results]
        assert [r.json()["values"] for r in results] == [[[float(i)]] for i in range(6)]
        assert "died under job" in server.log(), server.log()
    finally:
        assert server.stop() == 0
    assert shm_segments(server.pid) == []


def test_a_request_that_kills_workers_costs_two_crashes_then_answers_503() -> None:
    server = Server(["tests.services:Echo"], "--cpu-workers", "2")
    try:
        workers = _live(server, "cpu")
        crash = server.post("echo", json={"values": [1], "crash": True})
        assert crash.status_code == 503, crash.text
        assert "CPU worker" in crash.json()["error"]["message"]
        # sent once more after the first crash (--crash-retries 1), then given up
        assert wait_until(
            lambda: len(_live(server, "cpu")) == 2 and not workers & _live(server, "cpu")
        )
        assert server.log().count("died under job") == 1, server.log()
        server.wait_ready(30)
        assert server.post("echo", json={"values": [2]}).status_code == 200
    finally:
        assert server.stop() == 0


def test_calls_on_a_killed_engine_are_sent_again_and_answered() -> None:
    server = Server(["tests.services:SlowEngine"], "--cpu-workers", "1")
    try:
        (engine,) = _live(server, "engi")
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(server.post, "slowengine", content=b"\0" * 16) for _ in range(4)]
            time.sleep(0.2)  # the calls are in the engine's batch now (400 ms)
            os.kill(engine, signal.SIGKILL)
            results = [f.result() for f in futures]
        assert [r.status_code for r in results] == [200] * 4, (
            [r.text for r in results],
            server.log(),
        )
        assert "died under a call" in server.log(), server.log()
        assert _live(server, "engi") and engine not in _live(server, "engi")
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
