"""The OCR demo over protocol v2 with tritonclient, HTTP and gRPC, in both modes: the
service model answers what ``/v1`` answers, and its detector is callable bare."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from examples.ocr.make_images import generate_documents
from tests.conftest import Server, free_port

OCR = "examples.ocr.service:OCRService"


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return generate_documents(tmp_path_factory.mktemp("v2_ocr"), 1, seed=3)[0].read_bytes()


@pytest.fixture(scope="module", params=["split", "threaded"])
def ocr_server(request) -> Iterator[Server]:
    grpc_port = free_port()
    args = ["--grpc-port", str(grpc_port)]
    args += ["--cpu-workers", "1"] if request.param == "split" else ["--mode", "threaded"]
    server = Server([OCR], *args)
    server.grpc_url = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while server.client.get("/v2/models/ocr.det/ready").status_code != 200:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    yield server
    server.stop()


def texts(result: dict) -> list[str]:
    return [line["text"] for line in result["results"]]


def test_ocr_over_http(ocr_server: Server, page: bytes) -> None:
    expected = ocr_server.post("ocr", content=page).json()
    assert texts(expected)
    client = httpclient.InferenceServerClient(url=ocr_server.url.removeprefix("http://"))
    try:
        assert client.is_model_ready("ocr")
        inp = httpclient.InferInput("request", [1], "BYTES")
        inp.set_data_from_numpy(np.array([page], dtype=np.object_))
        result = client.infer("ocr", [inp])
        assert texts(json.loads(result.as_numpy("response")[0])) == texts(expected)
        meta = client.get_model_metadata("ocr.det")
        assert meta["inputs"][0]["datatype"] == "FP32" and len(meta["inputs"][0]["shape"]) == 4
    finally:
        client.close()


def test_ocr_over_grpc(ocr_server: Server, page: bytes) -> None:
    expected = ocr_server.post("ocr", content=page).json()
    client = grpcclient.InferenceServerClient(url=ocr_server.grpc_url)  # type: ignore[attr-defined]
    try:
        inp = grpcclient.InferInput("request", [1], "BYTES")
        inp.set_data_from_numpy(np.array([page], dtype=np.object_))
        result = client.infer("ocr", [inp])
        assert texts(json.loads(result.as_numpy("response")[0])) == texts(expected)
        # the detector, bare: a client that pre-processes itself sends the tensor
        meta = client.get_model_metadata("ocr.det", as_json=True)
        name, out_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
        x = np.zeros((1, 3, 64, 96), dtype=np.float32)
        det = grpcclient.InferInput(name, list(x.shape), "FP32")
        det.set_data_from_numpy(x)
        probabilities = client.infer("ocr.det", [det]).as_numpy(out_name)
        assert probabilities.shape[0] == 1 and probabilities.shape[-2:] == (64, 96)
    finally:
        client.close()
