"""Prometheus ``/metrics``: scraped and parsed with prometheus_client's own parser; the
counters move with real requests (front, engines and supervisor), in both modes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEST_SERVICES, Server


@pytest.fixture(scope="module", params=["split", "threaded"])
def server(request) -> Iterator[Server]:
    args = ["--mode", "threaded"] if request.param == "threaded" else []
    server = Server(TEST_SERVICES, *args)
    yield server
    server.stop()


def scrape(server: Server) -> dict[tuple[str, tuple], float]:
    r = server.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    # Triton's names exactly as Triton writes them (no _total on its counters)
    assert "\n# TYPE nv_inference_request_success counter\n" in r.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(r.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def infer_bare(server: Server, rows: int) -> None:
    x = np.ones((rows, 4), dtype=np.float32)
    request = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [rows, 4], "data": x.ravel().tolist()}
        ]
    }
    r = server.client.post("/v2/models/echo.model/infer", json=request)
    assert r.status_code == 200, r.text


def test_counters_move_with_requests(server: Server) -> None:
    echo = {"model": "echo", "version": "1"}
    bare = {"model": "echo.model", "version": "1"}
    before = scrape(server)
    for _ in range(3):
        assert server.post("echo", json={"values": [1, 2]}).status_code == 200
    assert server.post("echo", json={"wrong": 1}).status_code == 422
    for _ in range(2):
        infer_bare(server, rows=3)
    # engine counters reach the front with the next state broadcast (split: ~1 s)
    deadline = time.monotonic() + 10
    while True:
        after = scrape(server)
        executed = value(after, "nv_inference_exec_count_total", **bare)
        if executed - value(before, "nv_inference_exec_count_total", **bare) >= 5:
            break  # 3 echo requests (1 row each) + 2 bare requests: at least 5 rows' batches
        if time.monotonic() > deadline:
            pytest.fail(f"engine counters did not move: {executed}")
        time.sleep(0.2)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("nv_inference_request_success_total", **echo) == 3
    assert delta("nv_inference_request_failure_total", reason="OTHER", **echo) == 1
    assert delta("nv_inference_request_success_total", **bare) == 2
    assert delta("nv_inference_count_total", **bare) == 3 + 2 * 3  # rows through the engine
    assert delta("nv_inference_request_duration_us_total", **echo) > 0
    assert delta("nv_inference_compute_infer_duration_us_total", **bare) > 0
    assert value(after, "nv_inference_pending_request_count", **echo) == 0
    assert delta("splitserve_batch_size_count", model="echo.model") >= 3
    assert delta("splitserve_stage_duration_ms_count", stage="worker") == 4 + 2
    assert value(after, "splitserve_stage_duration_ms_bucket", stage="worker", le="+Inf") >= 6
    assert delta("splitserve_requests_total", status="200") == 5
    assert delta("splitserve_engine_busy_seconds_total", engine="0") > 0
    assert ("splitserve_shed_requests_total", ()) in after
    assert ("splitserve_cancelled_requests_total", ()) in after
    assert not any(name.startswith("nv_gpu") for name, _ in after)  # no GPU here
    if server.mode == "split":
        assert ("splitserve_restarts_total", (("role", "worker"),)) in after
        assert value(after, "splitserve_shared_memory_bytes", engine="0") >= 0


def test_scrape_is_cheap(server: Server) -> None:
    times = []
    for _ in range(21):
        started = time.perf_counter()
        scrape(server)
        times.append(time.perf_counter() - started)
    assert sorted(times)[10] < 0.05  # the median, well under the 100 ms of a 10 Hz scrape
