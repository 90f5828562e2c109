"""Both modes over real HTTP: results, batching, padding, pipelines and bad input."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.conftest import Server


@pytest.fixture(params=["split", "threaded"])
def server(request, split_server: Server, threaded_server: Server) -> Server:
    return split_server if request.param == "split" else threaded_server


def timings(response: httpx.Response) -> dict[str, float]:
    raw = response.headers.get("x-splitserve-timings", "")
    return {k: float(v) for k, v in (item.split("=") for item in raw.split(",") if item)}


def test_health_and_catalogue(server: Server) -> None:
    assert server.client.get("/health/live").json() == {"status": "live"}
    assert server.client.get("/health/ready").json() == {"status": "ready"}
    services = server.client.get("/v1/services").json()["services"]
    assert set(services) == {"echo", "fixed_one", "padded", "pipeline"}
    assert services["pipeline"]["models"]["second"]["backend"] == "onnxruntime"


def test_json_and_raw_round_trips(server: Server) -> None:
    r = server.post("echo", json={"values": [1.5, -2, 3]})
    assert r.status_code == 200, r.text
    assert r.json() == {"values": [[1.5, -2.0, 3.0]], "shape": [1, 3]}
    # 4 MB raw: above the inline threshold, so it crosses through shared memory both ways
    x = np.random.default_rng(1).standard_normal(1 << 20).astype(np.float32)
    r = server.post(
        "echo", content=x.tobytes(), headers={"content-type": "application/octet-stream"}
    )
    assert r.status_code == 200, r.text
    assert np.array_equal(np.frombuffer(r.content, dtype=np.float32), x)


def test_rows_beyond_a_fixed_batch_of_one(server: Server) -> None:
    r = server.post("fixed_one", json={"values": [1, 2, 3, 4], "rows": 5})
    assert r.status_code == 200, r.text
    assert r.json()["values"] == [[1.0, 2.0, 3.0, 4.0]] * 5


def test_a_request_larger_than_max_batch_is_split_and_reassembled(server: Server) -> None:
    r = server.post("echo", json={"values": [7, 8], "rows": 19})  # max_batch_size is 8
    assert r.status_code == 200, r.text
    assert r.json()["values"] == [[7.0, 8.0]] * 19


def test_concurrent_requests_share_batches(split_server: Server) -> None:
    def call(i: int) -> httpx.Response:
        return split_server.post("echo", json={"values": [i, i + 0.5]})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(call, range(48)))
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert r.json()["values"] == [[float(i), i + 0.5]]
    assert max(timings(r)["engine_batch_rows"] for r in responses) > 1


def test_variable_length_rows_are_padded_into_one_batch(split_server: Server) -> None:
    lengths = [3, 9, 5, 12, 1, 7, 2, 10]

    def call(n: int) -> httpx.Response:
        return split_server.post("padded", json={"values": list(range(1, n + 1))})

    with ThreadPoolExecutor(len(lengths)) as pool:
        responses = list(pool.map(call, lengths))
    batched = False
    for n, r in zip(lengths, responses, strict=True):
        assert r.status_code == 200, r.text
        row = r.json()["values"][0]
        assert row[:n] == [float(v) for v in range(1, n + 1)]
        assert all(v == 0.0 for v in row[n:])  # padding, when the batch had longer rows
        batched |= timings(r)["engine_batch_rows"] > 1
    assert batched


def test_pipeline_of_two_models(server: Server) -> None:
    r = server.post("pipeline", json={"values": [1, 2, 3]})
    assert r.status_code == 200, r.text
    assert r.json() == {"values": [2.0, 4.0, 6.0]}
    if server.mode == "split":
        assert timings(r)["infer_calls"] == 2


BAD_REQUESTS = [
    ("nope", {"json": {"values": [1]}}, 404, "no service named 'nope'"),
    (
        "echo",
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        400,
        "not valid JSON",
    ),
    ("echo", {"json": {"value": [1]}}, 422, "lacks the field 'values'"),
    ("echo", {"json": {"values": "abc"}}, 422, "wrong type str"),
    ("echo", {"json": [1, 2]}, 422, "must be an object"),
    ("echo", {"content": b"\0" * (9 << 20)}, 413, "above the limit"),
    ("echo", {"content": b"\0\0\0"}, 400, "must be float32"),
]


@pytest.mark.parametrize(("service", "kwargs", "status", "message"), BAD_REQUESTS)
def test_bad_input_gets_a_clear_4xx(server: Server, service, kwargs, status, message) -> None:
    r = server.post(service, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"], error


def test_bad_and_good_requests_together(server: Server) -> None:
    def call(i: int) -> tuple[int, httpx.Response]:
        service, kwargs, status, _ = BAD_REQUESTS[i % len(BAD_REQUESTS)]
        if i % 2:
            return 200, server.post("echo", json={"values": [i]})
        return status, server.post(service, **kwargs)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(40)))
    for i, (status, r) in enumerate(results):
        assert r.status_code == status, (i, r.text)
        if status == 200:
            assert r.json()["values"] == [[float(i)]]


def test_stats_count_requests_batches_and_engine_time(server: Server) -> None:
    before = server.client.get("/v1/stats").json()
    for i in range(5):
        assert server.post("echo", json={"values": [i], "rows": 3}).status_code == 200
    assert server.post("echo", json={"value": 1}).status_code == 422

    def grown() -> dict | None:
        stats = server.client.get("/v1/stats").json()
        model = stats["models"].get("echo/model", {"rows": 0})
        return (
            stats
            if model["rows"] - before["models"].get("echo/model", {"rows": 0})["rows"] >= 15
            else None
        )

    deadline = time.monotonic() + 10  # engines report once a second
    while (after := grown()) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after is not None, server.client.get("/v1/stats").json()
    assert after["mode"] == server.mode
    assert after["requests"]["total"] - before["requests"]["total"] == 6
    assert after["requests"]["by_status"]["422"] >= 1
    model = after["models"]["echo/model"]
    assert model["backend"] == "onnxruntime" and model["simulated"] is False
    assert model["batches"] >= 1 and model["busy_s"] > 0
    assert sum(int(k) * v for k, v in model["batch_sizes"].items()) == model["rows"]
    assert after["stages_ms"]["worker"]["count"] >= 6
    assert after["engines"]["0"]["busy_s"] > 0


@pytest.mark.parametrize(
    ("method", "path", "status", "kind"),
    [
        ("GET", "/no/such/path", 404, "not_found"),
        ("POST", "/v1/services/", 404, "not_found"),
        ("GET", "/v1/services/echo", 405, "method_not_allowed"),
    ],
)
def test_routing_errors_are_json_too(split_server: Server, method, path, status, kind) -> None:
    r = split_server.client.request(method, path, follow_redirects=False)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind
    if status == 405:
        assert "POST" in r.headers["allow"]
