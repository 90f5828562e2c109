"""The OCR demo served in both modes equals RapidOCR, and survives bad images."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from examples.ocr.compare import compare_ocr
from examples.ocr.make_images import blank_image, generate_documents
from tests.conftest import Server, children_of, process_name

OCR = "examples.ocr.service:OCRService"
MAX_PIXELS = 3_000_000


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    paths = generate_documents(tmp_path_factory.mktemp("ocr_server"), 6, seed=7)
    return [p.read_bytes() for p in paths] + [blank_image()]


@pytest.fixture(scope="module")
def references(documents: list[bytes]) -> list[Any]:
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()
    return [engine(data) for data in documents]


@pytest.fixture(scope="module", params=["split", "threaded"])
def ocr_server(request) -> Iterator[Server]:
    args = ["--max-image-pixels", str(MAX_PIXELS)]
    if request.param == "split":
        args += ["--cpu-workers", "2"]
    else:
        args += ["--mode", "threaded", "--threads", "4"]
    server = Server([OCR], *args)
    yield server
    server.stop()


def test_same_answers_as_rapidocr(ocr_server: Server, documents, references) -> None:
    with ThreadPoolExecutor(4) as pool:  # concurrent, so the engines batch across requests
        responses = list(pool.map(lambda d: ocr_server.post("ocr", content=d), documents * 2))
    worst_score = 0.0
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        diff = compare_ocr(r.json(), references[i % len(documents)])
        assert diff["texts_equal"], diff
        assert diff["max_box_diff"] <= 1.0, diff
        assert diff["max_score_diff"] <= 0.01, diff
        worst_score = max(worst_score, diff["max_score_diff"])
    assert responses[len(documents) - 1].json() == {"results": []}  # the blank page
    print(f"largest score difference from RapidOCR: {worst_score:.5f}")


def test_json_body_with_base64_image(ocr_server: Server, documents, references) -> None:
    r = ocr_server.post("ocr", json={"image": base64.b64encode(documents[0]).decode()})
    assert r.status_code == 200, r.text
    assert compare_ocr(r.json(), references[0])["texts_equal"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl command")
def test_the_readmes_curl_command(ocr_server: Server, documents, references, tmp_path) -> None:
    """`curl --data-binary @page.jpg` labels the image a form; the bytes say what it is."""
    page = tmp_path / "doc_0000.jpg"
    page.write_bytes(documents[0])
    url = f"{ocr_server.url}/v1/services/ocr"
    run = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "--data-binary", f"@{page}", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    body, _, status = run.stdout.rpartition("\n")
    assert status == "200", run.stdout
    assert compare_ocr(json.loads(body), references[0])["texts_equal"]


def _jpeg(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 200, 200)).save(out, "JPEG")
    return out.getvalue()


def bad_requests(documents: list[bytes]) -> list[tuple[dict, int, str]]:
    jpeg = _jpeg((640, 480))
    return [
        ({"content": b"this is not an image"}, 400, "not a recognised image"),
        ({"content": jpeg[: len(jpeg) // 2]}, 400, "could not be decoded"),
        ({"content": b""}, 400, "empty body"),
        ({"content": _jpeg((2000, 2000))}, 413, "above the limit of 3000000"),
        ({"json": {"img": "abc"}}, 422, "lacks the field 'image'"),
        ({"json": {"image": "%%%"}}, 422, "not valid base64"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "not an image"),
    ]


def test_bad_images_get_clear_errors_while_good_ones_pass(
    ocr_server: Server, documents, references
) -> None:
    bad = bad_requests(documents)

    def call(i: int) -> tuple[int, str, httpx.Response]:
        if i % 2:
            return 200, "", ocr_server.post("ocr", content=documents[0])
        kwargs, status, message = bad[(i // 2) % len(bad)]
        return status, message, ocr_server.post("ocr", **kwargs)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(2 * len(bad))))
    for status, message, r in results:
        assert r.status_code == status, r.text
        if status == 200:
            assert compare_ocr(r.json(), references[0])["texts_equal"]
        else:
            assert message in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("ocr_server", ["split"], indirect=True)
def test_workers_stay_light(ocr_server: Server) -> None:
    """CPU workers never load a model nor import an inference runtime."""

    workers = [
        p for p in children_of(ocr_server.pid) if process_name(p).startswith("splitserve-cpu")
    ]
    assert workers
    for pid in workers:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "onnxruntime" not in maps and "torch" not in maps
        assert ".onnx" not in maps


@pytest.mark.parametrize("ocr_server", ["split"], indirect=True)
def test_engines_never_import_the_service_module(ocr_server: Server) -> None:
    """Engines get resolved model specs: the OCR service's OpenCV never reaches them."""
    children = {p: process_name(p) for p in children_of(ocr_server.pid)}
    engines = [p for p, name in children.items() if name.startswith("splitserve-engi")]
    workers = [p for p, name in children.items() if name.startswith("splitserve-cpu")]
    assert engines and workers
    # where the service module is imported, its OpenCV shows in the maps
    assert "cv2" in Path(f"/proc/{workers[0]}/maps").read_text()
    for pid in engines:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "onnxruntime" in maps  # the engine's own runtime: the check sees libraries
        assert "cv2" not in maps and "opencv" not in maps
