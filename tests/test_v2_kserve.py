"""A KServe transformer (the kserve package's ``Model`` with ``predictor_host`` pointing at
splitserve) in front of splitserve, end to end, over protocol v2 REST and gRPC, in split
and threaded mode.

kserve pins protobuf below what splitserve's generated gRPC code needs, so it lives in
its own virtual environment: ``make kserve-venv`` (run by ``make test``) creates
``.venv-kserve``; ``SPLITSERVE_KSERVE_PYTHON`` may name another interpreter with kserve.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, TEST_SERVICES, Server, free_port

KSERVE_PYTHON = Path(
    os.environ.get("SPLITSERVE_KSERVE_PYTHON", ROOT / ".venv-kserve" / "bin" / "python")
)
pytestmark = pytest.mark.skipif(
    not KSERVE_PYTHON.exists(), reason=f"no kserve environment at {KSERVE_PYTHON}: make kserve-venv"
)


@pytest.fixture(scope="module", params=["split", "threaded"])
def server(request) -> Iterator[Server]:
    grpc_port = free_port()
    args = ["--grpc-port", str(grpc_port)]
    if request.param == "threaded":
        args += ["--mode", "threaded"]
    server = Server(TEST_SERVICES, *args)
    server.grpc_port = grpc_port  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while server.client.get("/v2/models/echo.model/ready").status_code != 200:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    yield server
    server.stop()


def start_transformer(predictor: str, protocol: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # kserve's own packages
    proc = subprocess.Popen(
        [
            str(KSERVE_PYTHON),
            str(ROOT / "tests" / "v2_kserve_transformer.py"),
            "--model_name",
            "echo.model",
            "--predictor_host",
            predictor,
            "--predictor_protocol",
            protocol,
            "--http_port",
            str(port),
            "--enable_grpc",
            "false",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"transformer exited: {proc.stderr.read().decode()[-3000:]}")
        try:
            if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("transformer not ready")


@pytest.mark.parametrize("protocol", ["v2", "grpc-v2"])
def test_kserve_transformer_in_front(server: Server, protocol: str) -> None:
    port = server.port if protocol == "v2" else server.grpc_port  # type: ignore[attr-defined]
    proc, url = start_transformer(f"127.0.0.1:{port}", protocol)
    try:
        before = server.client.get("/v2/models/echo.model/stats").json()["model_stats"][0]
        request = {
            "id": "k-1",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}],
        }
        r = httpx.post(f"{url}/v2/models/echo.model/infer", json=request, timeout=30)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["id"] == "k-1"
        # x * 2 in the transformer, identity in splitserve's engine, + 1 in the transformer
        assert doc["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0]
        after = server.client.get("/v2/models/echo.model/stats").json()["model_stats"][0]
        success = after["inference_stats"]["success"]["count"]
        assert success == before["inference_stats"]["success"]["count"] + 1
        # a predictor error reaches the transformer's client as an error
        bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}
        r = httpx.post(f"{url}/v2/models/echo.model/infer", json=bad, timeout=30)
        assert r.status_code >= 400
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
