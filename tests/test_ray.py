"""splitserve.ray on a local two-node Ray cluster: the OCR demo answers as split mode does.

Both nodes run on this machine, on 127.0.0.1: a "CPU node" that hosts the CPU stage (and
Serve's controller and HTTP proxy) and an "accelerator node" (a custom resource standing
in for a GPU) that hosts the engine stage, so every ``infer`` crosses nodes through Ray's
object store. One cluster for the whole module: Ray takes many seconds to start.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from benchmarks.peers.run_peers import is_loopback, listening, process_group
from tests.conftest import Server, free_port

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is not installed: pip install -e '.[ray]' (a venv of its own; see docs/deploy.md)",
)

OCR = "examples.ocr.service:OCRService"
MAX_PIXELS = 3_000_000


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    from examples.ocr.make_images import blank_image, generate_documents

    paths = generate_documents(tmp_path_factory.mktemp("ray_docs"), 4, seed=11)
    return [p.read_bytes() for p in paths] + [blank_image()]


@pytest.fixture(scope="module")
def split_answers(documents: list[bytes]) -> list[Any]:
    """Plain split mode's answers, one request at a time."""
    server = Server([OCR], "--cpu-workers", "1", "--max-image-pixels", str(MAX_PIXELS))
    try:
        answers = []
        for body in documents:
            r = server.post("ocr", content=body)
            assert r.status_code == 200, r.text
            answers.append(r.json())
        return answers
    finally:
        server.stop()


class RayCluster:
    def __init__(self, cluster: Any, url: str) -> None:
        self.cluster = cluster
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=60)


@pytest.fixture(scope="module")
def ray_app() -> Iterator[RayCluster]:
    from splitserve.ray import Stage, build_app, local_ray_env

    local_ray_env()
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    common = {
        "node_ip_address": "127.0.0.1",
        "include_dashboard": False,
        "object_store_memory": 100 << 20,
    }
    # Ray's session folder (its sockets' paths must stay short), private to this module.
    temp = tempfile.mkdtemp(prefix="ray-test-")
    os.environ["RAY_TMPDIR"] = temp
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**common, "num_cpus": 2, "resources": {"cpu_node": 4}},
    )
    try:
        cluster.add_node(**common, num_cpus=1, resources={"accelerator": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        port = free_port()
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": "127.0.0.1", "port": port},
            logging_config={"log_level": "WARNING", "enable_access_log": False},
        )
        app = build_app(
            OCR,
            cpu=Stage(replicas=2, num_cpus=0.5, resources={"cpu_node": 1}, max_ongoing_requests=4),
            engines=Stage(replicas=1, num_cpus=0.5, resources={"accelerator": 1}),
            max_image_pixels=MAX_PIXELS,
            max_body_bytes=8 << 20,
            loopback_only=True,
        )
        serve.run(app, route_prefix="/")
        yield RayCluster(cluster, f"http://127.0.0.1:{port}")
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()
        del os.environ["RAY_TMPDIR"]
        shutil.rmtree(temp, ignore_errors=True)


def test_same_answers_as_split_mode(ray_app: RayCluster, documents, split_answers) -> None:
    for body, expected in zip(documents, split_answers, strict=True):
        r = ray_app.client.post("/v1/services/ocr", content=body)
        assert r.status_code == 200, r.text
        assert r.json() == expected
    assert split_answers[-1] == {"results": []}  # the blank page


def test_concurrent_requests_batch_and_read_the_same(
    ray_app: RayCluster, documents, split_answers
) -> None:
    from examples.ocr.compare import compare_ocr

    with ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(lambda b: ray_app.client.post("/v1/services/ocr", content=b), documents * 2)
        )
    for i, r in enumerate(replies):
        assert r.status_code == 200, r.text
        expected = split_answers[i % len(documents)]["results"]
        # Batched with other requests, the recogniser may pad (within 8 px): same texts.
        diff = compare_ocr(r.json(), [[e["box"], e["text"], e["score"]] for e in expected])
        assert diff["texts_equal"], diff
        assert "engine_batch_rows=" in r.headers["x-splitserve-timings"]


def test_stages_run_on_their_own_nodes(ray_app: RayCluster) -> None:
    import ray
    from ray import serve

    cpu_node = ray_app.client.get("/health/ready").json()["node_id"]
    engines = serve.get_deployment_handle("ocr-engines", app_name="default")
    x = np.zeros((1, 3, 64, 64), np.float32)
    reply = engines.infer.remote("det", {"x": x}, 10.0).result()
    assert reply.outputs is not None and not reply.error
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert "cpu_node" in nodes[cpu_node]
    assert "accelerator" in nodes[reply.node_id]


def test_bad_input_is_a_clear_4xx(ray_app: RayCluster) -> None:
    from ray import serve

    r = ray_app.client.post("/v1/services/ocr", content=b"this is not an image")
    assert r.status_code == 400 and "not a recognised image" in r.json()["error"]["message"]
    assert ray_app.client.post("/v1/services/nope", content=b"x").status_code == 404
    r = ray_app.client.post("/v1/services/ocr", content=b"\0" * (9 << 20))
    assert r.status_code == 413
    engines = serve.get_deployment_handle("ocr-engines", app_name="default")
    wrong = engines.infer.remote("det", {"x": np.zeros((1, 3, 64, 64), np.int64)}, 10.0)
    reply = wrong.result()
    assert reply.error_status == 400 and "float" in reply.error, reply
    unknown = engines.infer.remote("nope", {"x": np.zeros((1,), np.float32)}, 10.0).result()
    assert unknown.error_status == 404


def test_ray_listens_on_loopback_only(ray_app: RayCluster) -> None:
    pids = process_group(os.getpid())
    found = listening(p for p in pids if p != os.getpid())
    assert found, "Ray's servers were found"
    assert [s for s in found if not is_loopback(s)] == []


def test_build_app_refuses_engine_builds(tmp_path: Path) -> None:
    """The engine stage serves fp32 files only: a model that needs a build says so."""
    from splitserve.ray import EngineStage

    (tmp_path / "int8svc.py").write_text(
        "import splitserve\n"
        "class Int8(splitserve.Service):\n"
        "    model = splitserve.Model('m.onnx', precision='int8', calibration='cal')\n"
    )
    with pytest.raises(ValueError, match="splitserve build"):
        EngineStage(f"{tmp_path / 'int8svc.py'}:Int8", None, loopback_only=False)
