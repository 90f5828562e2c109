"""Overload and failure: deadline-aware shedding, cancellation, engine faults, drain, auth."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import Server, alive, shm_segments
from tests.test_supervision import wait_until


def engine_rows(server: Server, key: str) -> int:
    model = server.client.get("/v1/stats").json()["models"].get(key)
    return model["rows"] if model else 0


@pytest.fixture(scope="module")
def misbehave() -> Server:
    server = Server(["tests.services:Misbehave"], "--cpu-workers", "1", "--worker-concurrency", "1")
    yield server
    server.stop()


def test_an_engine_fault_fails_its_request_clearly_and_the_model_goes_on(misbehave) -> None:
    r = misbehave.post("misbehave", json={"scalar": True})
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "engine_error"
    assert "batch axis" in r.json()["error"]["message"]
    for _ in range(3):  # the same model thread still answers
        r = misbehave.post("misbehave", json={"scalar": True})
        assert r.json()["error"]["type"] == "engine_error"
    assert misbehave.post("misbehave", json={}).json() == {"ok": True}
    assert misbehave.client.get("/health/ready").status_code == 200


def test_an_engine_side_shape_error_is_a_400_of_its_own_kind(misbehave) -> None:
    r = misbehave.post("misbehave", json={"rank3": True})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "bad_request"
    assert "misbehave/identity" in r.json()["error"]["message"]


def test_a_request_past_its_own_deadline_is_cancelled_before_inference(misbehave) -> None:
    time.sleep(1.2)  # engine counters reach the front every second
    before = engine_rows(misbehave, "misbehave/identity")
    started = time.monotonic()
    r = misbehave.post("misbehave", json={"wait_s": 1.5}, headers={"X-Request-Timeout": "0.3"})
    assert r.status_code == 504, r.text
    assert time.monotonic() - started < 1.0
    time.sleep(2.5)  # the job would have reached the engine by now if it still ran
    assert engine_rows(misbehave, "misbehave/identity") == before
    # its slot (the worker's only one) is free again
    assert misbehave.post("misbehave", json={}).status_code == 200


def test_a_client_that_disconnects_cancels_its_job(misbehave) -> None:
    time.sleep(1.2)
    before = engine_rows(misbehave, "misbehave/identity")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{misbehave.url}/v1/services/misbehave", json={"wait_s": 1.5}, timeout=0.3)
    time.sleep(2.5)
    assert engine_rows(misbehave, "misbehave/identity") == before
    r = misbehave.post("misbehave", json={})
    assert r.status_code == 200
    assert (
        float(
            dict(kv.split("=") for kv in r.headers["x-splitserve-timings"].split(","))[
                "front_queue_ms"
            ]
        )
        < 200
    )  # the cancelled job did not keep the slot


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_a_bad_timeout_header_is_a_400(misbehave, value: str) -> None:
    r = misbehave.post("misbehave", json={}, headers={"X-Request-Timeout": value})
    assert r.status_code == 400, r.text
    assert "x-request-timeout" in r.json()["error"]["message"]


def test_overload_is_shed_at_once_once_the_service_time_is_known() -> None:
    server = Server(
        ["tests.services:Echo"],
        "--cpu-workers",
        "1",
        "--worker-concurrency",
        "1",
        "--request-timeout",
        "3",
    )
    try:
        for _ in range(3):  # teach the front this service's time: ~0.5 s a job
            assert server.post("echo", json={"values": [1], "sleep_ms": 500}).status_code == 200

        def slow(_: int) -> tuple[int, float, str]:
            started = time.monotonic()
            r = server.post("echo", json={"values": [1], "sleep_ms": 500})
            return r.status_code, time.monotonic() - started, r.headers.get("retry-after", "")

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(slow, range(12)))
        codes = sorted(code for code, _, _ in results)
        assert 504 not in codes, codes  # nothing admitted waits out its deadline
        assert 2 <= codes.count(200) <= 6, codes  # about 1 s of queue: ~2-3 served
        shed = [(took, retry) for code, took, retry in results if code == 503]
        assert len(shed) >= 6, codes
        assert sorted(took for took, _ in shed)[len(shed) // 2] < 0.3  # refused at once
        assert all(int(retry) >= 1 for _, retry in shed)
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("mode", ["split", "threaded"])
def test_sigterm_drains_admitted_requests_then_stops(mode: str) -> None:
    args = ["--drain-timeout", "10"]
    if mode == "threaded":
        args += ["--mode", "threaded", "--threads", "4"]
    else:
        args += ["--cpu-workers", "2", "--worker-concurrency", "2"]
    server = Server(["tests.services:Echo"], *args)
    children = list(server.children().values())

    def slow(_: int) -> int:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            r = client.post("/v1/services/echo", json={"values": [1], "sleep_ms": 1500})
            return r.status_code

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(slow, i) for i in range(4)]
        time.sleep(0.5)  # all four admitted and running
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert server.client.get("/health/ready").status_code == 503
        assert server.client.get("/health/live").status_code == 200
        refused = server.post("echo", json={"values": [2]})
        assert refused.status_code == 503 and "shutting down" in refused.text
        assert [f.result() for f in futures] == [200] * 4
    assert server.proc.wait(20) == 0
    assert wait_until(lambda: not any(alive(pid) for pid in children))
    assert shm_segments(server.pid) == []
    server.stop()


def test_bearer_token_guards_everything_but_liveness() -> None:
    good = {"Authorization": "Bearer s3cret"}
    server = Server(
        ["tests.services:Echo"], "--cpu-workers", "1", "--auth-token", "s3cret", headers=good
    )
    try:
        assert server.post("echo", json={"values": [1]}).status_code == 200
        with httpx.Client(base_url=server.url, timeout=10) as anonymous:
            assert anonymous.get("/health/live").status_code == 200
            r = anonymous.post("/v1/services/echo", json={"values": [1]})
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["error"]["type"] == "unauthorized"
            wrong = {"Authorization": "Bearer s3cre"}
            assert anonymous.post("/v1/services/echo", headers=wrong).status_code == 401
            assert anonymous.get("/v1/stats").status_code == 401
            assert anonymous.get("/health/ready").status_code == 401
    finally:
        server.stop()


def test_sockets_and_shared_memory_are_private_to_the_server_user() -> None:
    import glob
    import os
    import stat
    import tempfile

    pattern = os.path.join(tempfile.gettempdir(), "splitserve-*")
    before = set(glob.glob(pattern))
    server = Server(["tests.services:Echo"], "--cpu-workers", "1")
    try:
        values = [0.5] * 40_000  # 160 KB: through shared memory both ways
        assert server.post("echo", json={"values": values}).status_code == 200
        run_dirs = [d for d in set(glob.glob(pattern)) - before if os.path.isdir(d)]
        assert run_dirs
        for d in run_dirs:
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        segments = shm_segments(server.pid)
        assert segments
        for name in segments:
            assert stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode) == 0o600
    finally:
        server.stop()
