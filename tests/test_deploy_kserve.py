"""The KServe transformer of the split layout, run locally with the kserve package.

The transformer (deploy/kserve/transformer.py) runs in its own process on 127.0.0.1, in
front of a splitserve server serving the OCR demo; its answers must equal split mode's.
The transformer runs on an interpreter with kserve (its own venv), the predictor on this
one. The end-to-end test needs the predictor's OIP v2 engine models (``/v2/models/ocr.det``):
it skips, saying so, on a splitserve build without them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.peers.run_peers import is_loopback, listening
from tests.conftest import ROOT, Server, free_port


def kserve_python() -> str | None:
    """An interpreter with kserve: $SPLITSERVE_KSERVE_PYTHON, this one, or .venv-kserve's.

    kserve pins protobuf below 7, which splitserve's own gRPC code does not load on: the
    transformer gets an environment of its own, as it gets an image of its own.
    """
    check = "import importlib.util, sys; sys.exit(importlib.util.find_spec('kserve') is None)"
    for candidate in (
        os.environ.get("SPLITSERVE_KSERVE_PYTHON"),
        sys.executable,
        str(ROOT / ".venv-kserve" / "bin" / "python"),
    ):
        found = candidate and Path(candidate).exists()
        if found and subprocess.run([candidate, "-c", check], timeout=60).returncode == 0:
            return candidate
    return None


KSERVE_PYTHON = kserve_python()
pytestmark = pytest.mark.skipif(
    KSERVE_PYTHON is None,
    reason="no interpreter with kserve: `make kserve-venv` builds one at "
    ".venv-kserve or name it in SPLITSERVE_KSERVE_PYTHON (see docs/deploy.md)",
)

OCR = "examples.ocr.service:OCRService"


@pytest.fixture(scope="module")
def predictor() -> Iterator[Server]:
    server = Server([OCR], "--cpu-workers", "1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def transformer(predictor: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("kserve") / "transformer.log"
    assert KSERVE_PYTHON is not None
    command = [KSERVE_PYTHON, "-m", "deploy.kserve.transformer", "--service", OCR]
    command += ["--model_name", "ocr", "--protocol", "v2", "--http_port", str(port)]
    command += ["--predictor_host", f"127.0.0.1:{predictor.port}"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformer exited:\n{log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/models/ocr/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"transformer not ready:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield url
        assert [s for s in listening([proc.pid]) if not is_loopback(s)] == []
        assert listening([proc.pid]), "the transformer listens"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def v2_images(images: list[bytes]) -> dict:
    """An OIP v2 JSON request: one BYTES input, base64 images."""
    data = [base64.b64encode(i).decode() for i in images]
    return {"inputs": [{"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data}]}


def test_transformer_rejects_what_is_not_an_image_request(transformer: str) -> None:
    bad = v2_images([b""])
    bad["inputs"][0]["datatype"] = "FP32"
    bad["inputs"][0]["data"] = [1.0]
    r = httpx.post(f"{transformer}/v2/models/ocr/infer", json=bad, timeout=30)
    assert r.status_code == 400 and "BYTES" in r.text, r.text
    r = httpx.post(f"{transformer}/v2/models/ocr/infer", json=v2_images([b"not an image"]))
    assert r.status_code in (400, 500), r.text  # 400 once the predictor answers v2


def test_transformer_answers_as_split_mode(
    transformer: str, predictor: Server, tmp_path: Path
) -> None:
    if predictor.client.get("/v2/models/ocr.det").status_code == 404:
        pytest.skip("this splitserve build serves no OIP v2 engine models (/v2/models/ocr.det)")
    from examples.ocr.make_images import blank_image, generate_documents

    images = [p.read_bytes() for p in generate_documents(tmp_path, 2, seed=5)] + [blank_image()]
    expected = [predictor.post("ocr", content=body).json() for body in images]
    r = httpx.post(f"{transformer}/v2/models/ocr/infer", json=v2_images(images), timeout=120)
    assert r.status_code == 200, r.text
    (output,) = r.json()["outputs"]
    assert [json.loads(doc) for doc in output["data"]] == expected
    r = httpx.post(f"{transformer}/v2/models/ocr/infer", json=v2_images([b"not an image"]))
    assert r.status_code == 400 and "not a recognised image" in r.text, r.text
