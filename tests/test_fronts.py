"""Several fronts on one port (``--fronts``, SO_REUSEPORT): both serve, the counters that
any one of them answers cover the server, one killed is replaced, SIGTERM drains all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import tritonclient.grpc as grpcclient

from splitserve.runtime.cpu_worker import front_share
from tests.conftest import ROOT, Server, alive, children_of, free_port, process_name
from tests.test_metrics import scrape, value
from tests.test_supervision import wait_until

ECHO = {"model": "echo", "version": "1"}


def test_every_front_gets_a_share_of_every_worker_and_the_shares_add_up() -> None:
    for capacity in range(1, 9):
        for fronts in range(1, capacity + 1):
            totals = [0] * fronts
            for worker in range(5):
                shares = [front_share(capacity, fronts, worker, k) for k in range(fronts)]
                assert sum(shares) == capacity and min(shares) >= 1, (capacity, fronts)
                totals = [t + s for t, s in zip(totals, shares, strict=True)]
            assert max(totals) - min(totals) <= 1 or fronts == 1, (capacity, fronts, totals)


def fronts_of(server: Server) -> dict[str, int]:
    """Live front processes by pid (their names are cut to 15 characters)."""
    return {
        pid: process_name(pid)
        for pid in children_of(server.pid)
        if process_name(pid).startswith("splitserve-fron") and alive(pid)
    }


def post_anew(server: Server, **kwargs) -> httpx.Response:
    """One request on a connection of its own: the kernel picks a front for each."""
    headers = {"Connection": "close"}
    return httpx.post(f"{server.url}/v1/services/echo", headers=headers, timeout=30, **kwargs)


def totals_reach(server: Server, name: str, expected: float, **labels: str) -> dict:
    """The scrape once ``name`` reached ``expected`` (a front reports every second)."""
    found: dict = {}

    def reached() -> bool:
        found.update(scrape(server))
        return value(found, name, **labels) >= expected

    assert wait_until(reached, 10), (name, labels, value(found, name, **labels))
    return found


@pytest.fixture
def two_fronts() -> Iterator[Server]:
    server = Server(
        ["tests.services:Echo"],
        "--fronts",
        "2",
        "--cpu-workers",
        "2",
        "--grpc-port",
        str(free_port()),
    )
    yield server
    server.stop()


def test_two_fronts_share_the_port_and_answer_for_the_whole_server(two_fronts: Server) -> None:
    server = two_fronts
    assert len(fronts_of(server)) == 2
    n = 40
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: post_anew(server, json={"values": [i]}), range(n)))
    assert [r.status_code for r in answers] == [200] * n
    # whichever front answers the scrape, it counts both: each front's own requests
    # at once, the other's from its next report
    after = totals_reach(server, "nv_inference_request_success_total", n, **ECHO)
    per_front = [value(after, "splitserve_front_requests_total", front=str(k)) for k in (0, 1)]
    assert min(per_front) > 0, per_front  # the kernel spread the connections
    assert value(after, "splitserve_requests_total", status="200") == n
    assert value(after, "splitserve_restarts_total", role="front") == 0  # gRPC port shared

    def v1_stats_count_all() -> bool:  # whichever front answers, once it has the reports
        stats = httpx.get(f"{server.url}/v1/stats", headers={"Connection": "close"}).json()
        return stats["requests"]["by_status"].get("200") == n  # (scrapes are not counted)

    assert wait_until(v1_stats_count_all, 10)
    grpc_port = int(server.proc.args[server.proc.args.index("--grpc-port") + 1])
    with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
        assert client.is_server_ready()

    # a second server cannot join the port, SO_REUSEPORT or not
    cmd = [sys.executable, "-m", "splitserve.cli", "serve", "tests.services:Echo"]
    out = subprocess.run(
        [*cmd, "--fronts", "2", "--port", str(server.port)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode != 0 and "cannot listen" in out.stderr, out.stderr

    # kill -9 one front: the other serves on; the dead one is replaced, and the counts it
    # had reported (every second: wait for its next report) are kept
    time.sleep(2.5)
    victim = min(fronts_of(server))
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: not alive(victim), 5)  # its socket left the port's group
    for i in range(20):
        r = post_anew(server, json={"values": [i]})
        assert r.status_code == 200, r.text
    assert wait_until(lambda: len(fronts_of(server)) == 2 and victim not in fronts_of(server))
    after_kill = totals_reach(server, "splitserve_restarts_total", 1, role="front")
    after_kill = totals_reach(server, "nv_inference_request_success_total", n + 20, **ECHO)
    assert value(after_kill, "splitserve_requests_total", status="200") == n + 20
    for k in (0, 1):  # neither front's count went down
        front_count = value(after_kill, "splitserve_front_requests_total", front=str(k))
        assert front_count >= per_front[k]
    # and the new front serves once it is up: connections keep coming, all answered,
    # until both fronts' counts grew (it listens once it has started: a second or two)
    sent = n + 20
    grown = [0, 0]
    deadline = time.monotonic() + 30
    while min(grown) == 0 and time.monotonic() < deadline:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: post_anew(server, json={"values": [i]}), range(n)))
        assert [r.status_code for r in answers] == [200] * n
        sent += n
        final = totals_reach(server, "nv_inference_request_success_total", sent, **ECHO)
        grown = [
            value(final, "splitserve_front_requests_total", front=str(k))
            - value(after_kill, "splitserve_front_requests_total", front=str(k))
            for k in (0, 1)
        ]
    assert min(grown) > 0, grown


def send_raw(server: Server, doc: bytes) -> socket.socket:
    """A request written on a connection of its own, its answer left to read."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = (
        "POST /v1/services/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n"
        f"Content-Length: {len(doc)}\r\n\r\n"
    )
    sock.sendall(head.encode() + doc)
    return sock


def status_of(sock: socket.socket) -> int:
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]) if data else 0


def test_sigterm_drains_every_front() -> None:
    server = Server(["tests.services:Echo"], "--fronts", "2", "--cpu-workers", "2")
    fronts = fronts_of(server)
    assert len(fronts) == 2
    try:
        # sent before the signal, on 10 connections (spread over both fronts, all but
        # surely): every one is answered
        slow = [send_raw(server, b'{"values": [1], "sleep_ms": 200}') for _ in range(10)]
        time.sleep(0.5)  # read and admitted by their fronts (the workers take ~1 s)
        server.proc.send_signal(signal.SIGTERM)
        assert [status_of(sock) for sock in slow] == [200] * 10
        assert server.proc.wait(30) == 0
        log = server.log()
        for k in (0, 1):
            assert f"[splitserve-front-{k}] draining" in log, log
        assert wait_until(lambda: not [p for p in fronts if alive(p)], 10)
    finally:
        server.stop()
