"""Protocol v2 driven by Triton's own clients (tritonclient.http and tritonclient.grpc), as
their documentation shows, against the small test services, in split and threaded mode:
readiness, metadata, configuration, inference with JSON, binary and raw gRPC tensors,
outputs by name, timeouts and errors; on a service model and on a bare engine model."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import TEST_SERVICES, Server, free_port


@pytest.fixture(scope="module", params=["split", "threaded"])
def server(request) -> Iterator[Server]:
    grpc_port = free_port()
    args = ["--grpc-port", str(grpc_port), "--max-body-bytes", str(8 << 20)]
    if request.param == "threaded":
        args += ["--mode", "threaded"]
    server = Server(TEST_SERVICES, *args)
    server.grpc_url = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
    # Engine models are ready once an engine reported their signature (split: ~at once).
    deadline = time.monotonic() + 30
    while server.client.get("/v2/models/echo.model/ready").status_code != 200:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    yield server
    server.stop()


@pytest.fixture
def http(server: Server) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture
def grpc(server: Server) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(url=server.grpc_url)  # type: ignore[attr-defined]
    yield client
    client.close()


def echo_request(module, values: list[float], binary: bool = True):
    """A BYTES input holding one JSON request body for the echo service."""
    body = np.array([json.dumps({"values": values}).encode()], dtype=np.object_)
    inp = module.InferInput("request", [1], "BYTES")
    if module is httpclient:
        inp.set_data_from_numpy(body, binary_data=binary)
    else:
        inp.set_data_from_numpy(body)
    return inp


JSON_BODIES = {"content_type": "application/json"}


# --- HTTP ---------------------------------------------------------------------------


def test_http_health_and_server_metadata(http) -> None:
    assert http.is_server_live()
    assert http.is_server_ready()
    meta = http.get_server_metadata()
    assert meta["name"] == "splitserve"
    assert "binary_tensor_data" in meta["extensions"]


def test_http_model_metadata_and_config(http) -> None:
    meta = http.get_model_metadata("echo")
    assert meta["inputs"] == [{"name": "request", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "response", "datatype": "BYTES", "shape": [-1]}]
    bare = http.get_model_metadata("echo.model", model_version="1")
    assert bare["platform"] == "onnxruntime_onnx"
    assert bare["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}]
    assert bare["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}]
    config = http.get_model_config("echo.model")
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    assert http.is_model_ready("echo") and http.is_model_ready("pipeline.second")


@pytest.mark.parametrize("binary", [True, False])
def test_http_service_model(http, binary: bool) -> None:
    outputs = [httpclient.InferRequestedOutput("response", binary_data=binary)]
    result = http.infer(
        "echo",
        [echo_request(httpclient, [1.5, 2.5], binary)],
        outputs=outputs,
        request_id="req-7",
        parameters=JSON_BODIES,
    )
    assert result.get_response()["id"] == "req-7"
    assert json.loads(result.as_numpy("response")[0]) == {"values": [[1.5, 2.5]], "shape": [1, 2]}


def test_http_service_model_runs_each_element(http) -> None:
    """Each element of the BYTES input is one request; raw float32 bodies by default."""
    bodies = np.array(
        [np.float32([i, i + 1]).tobytes() for i in range(5)] + [b""], dtype=np.object_
    )
    inp = httpclient.InferInput("request", [5], "BYTES")
    inp.set_data_from_numpy(bodies[:5])
    answers = http.infer("echo", [inp]).as_numpy("response")
    assert [np.frombuffer(a, np.float32).tolist() for a in answers] == [
        [i, i + 1] for i in range(5)
    ]
    bad = httpclient.InferInput("request", [1], "BYTES")
    bad.set_data_from_numpy(bodies[5:])
    with pytest.raises(InferenceServerException) as err:
        http.infer("echo", [bad])
    assert err.value.status() == "400"
    assert "float32" in err.value.message()


@pytest.mark.parametrize("binary", [True, False])
def test_http_bare_engine_model(http, binary: bool) -> None:
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("y", binary_data=binary)]
    result = http.infer("echo.model", [inp], outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("y"), x)
    doc = result.get_response()["outputs"][0]
    assert ("parameters" in doc) is binary and ("data" in doc) is not binary


def test_http_default_outputs_are_binary(http) -> None:
    """tritonclient asks for binary outputs when none is named (binary_data_output)."""
    x = np.ones((2, 3), dtype=np.float32)
    inp = httpclient.InferInput("x", [2, 3], "FP32")
    inp.set_data_from_numpy(x)
    result = http.infer("pipeline.first", [inp])
    np.testing.assert_array_equal(result.as_numpy("y"), x)
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 24


def test_http_errors(http, server: Server) -> None:
    x = np.ones((1, 2), dtype=np.float32)
    with pytest.raises(InferenceServerException) as err:
        http.get_model_metadata("no_such_model")
    assert err.value.status() == "404"
    inp = httpclient.InferInput("x", [1, 2], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as err:
        http.infer("echo.model", [inp], model_version="2")
    assert err.value.status() == "404"
    wrong = httpclient.InferInput("x", [1, 2], "INT32")
    wrong.set_data_from_numpy(x.astype(np.int32))
    with pytest.raises(InferenceServerException) as err:
        http.infer("echo.model", [wrong])
    assert err.value.status() == "400" and "FP32" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        http.infer("echo.model", [inp], outputs=[httpclient.InferRequestedOutput("z")])
    assert err.value.status() == "400" and "'z'" in err.value.message()
    # the service's own error passes through, status and message
    inp = httpclient.InferInput("request", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b'{"other": 1}'], dtype=np.object_))
    with pytest.raises(InferenceServerException) as err:
        http.infer("echo", [inp], parameters=JSON_BODIES)
    assert err.value.status() == "422" and "values" in err.value.message()
    # malformed requests, by hand: clear 400s with {"error": "..."}
    for body, headers in [
        (b"not json", {}),
        (b'{"inputs": []}', {}),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1]}]}', {}),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],'
            b' "parameters": {"binary_data_size": 8}}]}',
            {"Inference-Header-Content-Length": "80"},
        ),
        (b'{"inputs": [{"name": "x", "datatype": "NOPE", "shape": [1], "data": [1]}]}', {}),
        (b'[{"name": "x"}]', {}),
        (b'{"inputs": [{"name": "x", "shape": [1], "data": [1]}]}', {}),
        (b'{"inputs": [{"name": 7, "datatype": "FP32", "shape": [1], "data": [1]}]}', {}),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [true], "data": [1]}]}', {}),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],'
            b' "parameters": [1]}',
            {},
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],'
            b' "parameters": {"binary_data_size": true}}]}\0\0\0\0',
            {"Inference-Header-Content-Length": "103"},
        ),
    ]:
        r = server.client.post("/v2/models/echo.model/infer", content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_http_timeout_parameter(http) -> None:
    """``timeout`` (µs) shortens the deadline: a 300 ms service call with 50 ms fails 504."""
    body = np.array([json.dumps({"values": [1], "sleep_ms": 300}).encode()], dtype=np.object_)
    inp = httpclient.InferInput("request", [1], "BYTES")
    inp.set_data_from_numpy(body)
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as err:
        http.infer("echo", [inp], timeout=50_000, parameters=JSON_BODIES)
    assert err.value.status() == "504"
    assert time.monotonic() - started < 0.29
    result = http.infer("echo", [inp], timeout=5_000_000, parameters=JSON_BODIES)
    assert json.loads(result.as_numpy("response")[0])["values"] == [[1.0]]


def test_http_statistics_count_requests(http) -> None:
    def counts() -> tuple[int, int]:
        stats = http.get_inference_statistics("echo")["model_stats"][0]
        return stats["inference_stats"]["success"]["count"], stats["inference_count"]

    before = counts()
    bodies = np.array([np.float32([1]).tobytes()] * 3, dtype=np.object_)
    inp = httpclient.InferInput("request", [3], "BYTES")
    inp.set_data_from_numpy(bodies)
    http.infer("echo", [inp])
    after = counts()
    assert after[0] == before[0] + 1 and after[1] == before[1] + 3


def test_http_nested_json_and_dtypes(server: Server) -> None:
    """JSON data may be nested (row-major), as the protocol allows."""
    request = {
        "id": "n1",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}],
        "outputs": [{"name": "y"}],
    }
    r = server.client.post("/v2/models/echo.model/infer", json=request)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "n1" and doc["model_name"] == "echo.model"
    assert doc["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}
    ]


# --- gRPC ---------------------------------------------------------------------------


def test_grpc_health_metadata_config(grpc) -> None:
    assert grpc.is_server_live() and grpc.is_server_ready()
    assert grpc.get_server_metadata().name == "splitserve"
    assert grpc.is_model_ready("echo.model")
    meta = grpc.get_model_metadata("echo.model", as_json=True)
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "-1"]}]
    config = grpc.get_model_config("echo.model").config
    assert config.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("x", 11, [-1])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 20000


def test_grpc_service_model(grpc) -> None:
    result = grpc.infer(
        "echo",
        [echo_request(grpcclient, [4.0])],
        outputs=[grpcclient.InferRequestedOutput("response")],
        request_id="g-1",
        parameters=JSON_BODIES,
    )
    assert result.get_response().id == "g-1"
    assert json.loads(result.as_numpy("response")[0]) == {"values": [[4.0]], "shape": [1, 1]}


@pytest.mark.parametrize(
    "dtype,datatype", [(np.float32, "FP32"), (np.float16, "FP16"), (np.uint8, "UINT8")]
)
def test_grpc_bare_engine_model_raw_tensors(grpc, dtype, datatype) -> None:
    """Raw contents; the identity model is FP32, so other datatypes are refused (400)."""
    x = (np.arange(12) % 7).astype(dtype).reshape(3, 4)
    inp = grpcclient.InferInput("x", [3, 4], datatype)
    inp.set_data_from_numpy(x)
    if datatype != "FP32":
        with pytest.raises(InferenceServerException) as err:
            grpc.infer("echo.model", [inp])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert datatype in err.value.message()
        return
    result = grpc.infer("echo.model", [inp], outputs=[grpcclient.InferRequestedOutput("y")])
    np.testing.assert_array_equal(result.as_numpy("y"), x)


def test_grpc_errors_and_timeout(grpc) -> None:
    with pytest.raises(InferenceServerException) as err:
        grpc.get_model_metadata("no_such_model")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    body = np.array([json.dumps({"values": [1], "sleep_ms": 300}).encode()], dtype=np.object_)
    inp = grpcclient.InferInput("request", [1], "BYTES")
    inp.set_data_from_numpy(body)
    with pytest.raises(InferenceServerException) as err:
        grpc.infer("echo", [inp], timeout=50_000, parameters=JSON_BODIES)
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"


def test_grpc_statistics(grpc) -> None:
    x = np.ones((2, 2), dtype=np.float32)
    inp = grpcclient.InferInput("x", [2, 2], "FP32")
    inp.set_data_from_numpy(x)
    grpc.infer("padded.model", [inp])
    stats = grpc.get_inference_statistics("padded.model").model_stats[0]
    assert stats.name == "padded.model" and stats.inference_stats.success.count >= 1


def test_grpc_typed_contents(grpc) -> None:
    """Typed InferTensorContents instead of raw (built with tritonclient's own messages)."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="echo.model", id="typed")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    tensor.contents.fp32_contents.extend([1, 2, 3, 4])
    response = grpc._client_stub.ModelInfer(request)
    assert response.id == "typed"
    y = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    assert y.tolist() == [1, 2, 3, 4] and list(response.outputs[0].shape) == [2, 2]
    service = service_pb2.ModelInferRequest(model_name="echo")
    service.parameters["content_type"].string_param = "application/json"
    body = service.inputs.add(name="request", datatype="BYTES", shape=[1])
    body.contents.bytes_contents.append(b'{"values": [7]}')
    answer = grpc._client_stub.ModelInfer(service).raw_output_contents[0]
    assert json.loads(answer[4:]) == {"values": [[7.0]], "shape": [1, 1]}  # 4-byte length


GOOD_TOKEN = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def token_server() -> Iterator[Server]:
    grpc_port = free_port()
    token = ["--auth-token", "s3cret"]
    server = Server(TEST_SERVICES, "--grpc-port", str(grpc_port), *token, headers=GOOD_TOKEN)
    server.grpc_url = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_bearer_token_on_both_protocols(token_server: Server) -> None:
    good = GOOD_TOKEN
    http = httpclient.InferenceServerClient(url=token_server.url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(url=token_server.grpc_url)  # type: ignore[attr-defined]
    try:
        assert http.is_server_live()  # liveness stays open, as on /health/live
        assert http.get_server_metadata(headers=good)["name"] == "splitserve"
        with pytest.raises(InferenceServerException) as err:
            http.get_model_metadata("echo")
        assert err.value.status() == "401"
        lower = {"authorization": good["Authorization"]}  # gRPC metadata keys are lowercase
        assert grpc.get_model_metadata("echo", headers=lower).name == "echo"
        with pytest.raises(InferenceServerException) as err:
            grpc.get_model_metadata("echo", headers={"authorization": "Bearer wrong"})
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException):
            grpc.is_server_ready()
    finally:
        http.close()
        grpc.close()
