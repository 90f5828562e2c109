"""The PyTorch backend on the CPU: same answers as the module itself and as ONNX Runtime,
clear refusals where CUDA is needed, and a real server whose engine runs torch.

torch is a test dependency (``pip install -e '.[torch,dev]'``): nothing here is skipped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from examples.vision.model import tiny_resnet
from splitserve.engines.base import create_engine
from splitserve.engines.torch import TorchEngine, batch_buckets, resolve_device
from splitserve.errors import BadRequest
from splitserve.layout import Declaration, resolve
from splitserve.service import Model, Service
from splitserve.spec import ModelKey
from tests.conftest import Server, children_of, process_name

TINY = "examples.vision.model:tiny_resnet"
IMAGE = {"images": {"shape": [None, 3, 32, 32], "dtype": "float32"}}
LOGITS = {"logits": {"shape": [None, 10], "dtype": "float32"}}
CPU = {"inputs": IMAGE, "outputs": LOGITS, "device": "cpu"}


class TwoHeads(nn.Module):
    """Two inputs (one integer), two named outputs, returned as a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.proj(x)
        return {"scores": y, "shifted": k + y.argmax(dim=1, keepdim=True)}


def two_heads() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return TwoHeads()


def not_a_module() -> object:
    return object()


def images(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 32, 32), dtype=np.float32)


def test_outputs_equal_the_modules_own() -> None:
    engine = TorchEngine(TINY, CPU)
    module = tiny_resnet().eval()
    for rows in (1, 3, 8):
        x = images(rows, seed=rows)
        got = engine.run_batch({"images": x})
        with torch.inference_mode():
            want = module(torch.from_numpy(x)).numpy()
        assert set(got) == {"logits"} and got["logits"].dtype == np.float32
        np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-6)
    assert engine.max_batch_size is None  # no graphs: no limit of its own
    assert engine.metadata()["device"] == "cpu"


def test_read_only_inputs_and_input_checks() -> None:
    """Inputs from shared memory are read-only; the base class checks shapes and dtypes."""
    engine = TorchEngine(TINY, CPU)
    x = images(2)
    x.flags.writeable = False
    assert engine.run_batch({"images": x})["logits"].shape == (2, 10)
    with pytest.raises(BadRequest, match="axis 2 must be 32"):
        engine.check_inputs({"images": np.zeros((1, 3, 16, 32), np.float32)})
    with pytest.raises(BadRequest, match="must be float32"):
        engine.check_inputs({"images": np.zeros((1, 3, 32, 32), np.float64)})


def test_several_inputs_and_named_outputs() -> None:
    options = {
        "device": "cpu",
        "inputs": {
            "x": {"shape": [None, 4], "dtype": "float32"},
            "k": {"shape": [None, 1], "dtype": "int64"},
        },
        "outputs": {
            "shifted": {"shape": [None, 1], "dtype": "int64"},
            "scores": {"shape": [None, 3], "dtype": "float32"},
        },
    }
    engine = TorchEngine("tests.test_torch_engine:two_heads", options)
    x = np.random.default_rng(2).standard_normal((5, 4), dtype=np.float32)
    k = np.arange(5, dtype=np.int64)[:, None]
    got = engine.run_batch({"x": x, "k": k})
    with torch.inference_mode():
        want = two_heads()(torch.from_numpy(x), torch.from_numpy(k))
    np.testing.assert_allclose(got["scores"], want["scores"].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(got["shifted"], want["shifted"].numpy())


def test_equal_to_onnx_runtime_in_fp32(tmp_path: Path) -> None:
    """The same network exported to ONNX gives the same logits on ONNX Runtime."""
    from splitserve.engines.onnxruntime import OnnxRuntimeEngine

    path = tmp_path / "tiny.onnx"
    torch.onnx.export(  # the torch.export-based exporter (needs onnxscript)
        tiny_resnet().eval(),
        (torch.from_numpy(images(2)),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
    )
    ort_engine = OnnxRuntimeEngine(path, threads=1)
    torch_engine = TorchEngine(TINY, CPU)
    x = images(4, seed=7)
    want = ort_engine.run_batch({"images": x})["logits"]
    got = torch_engine.run_batch({"images": x})["logits"]
    assert got.shape == want.shape == (4, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_exported_program_gives_the_modules_outputs(tmp_path: Path) -> None:
    """A ``.pt2`` file from torch.export serves without the model's Python code."""
    module = tiny_resnet().eval()
    path = tmp_path / "tiny.pt2"
    exported = torch.export.export(
        module,
        (torch.from_numpy(images(2)),),
        dynamic_shapes=({0: torch.export.Dim("batch", max=64)},),
    )
    torch.export.save(exported, str(path))
    engine = TorchEngine(str(path), CPU)
    x = images(3, seed=5)
    with torch.inference_mode():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        engine.run_batch({"images": x})["logits"], want, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu_is_close_and_answers_in_the_declared_dtype(dtype: str) -> None:
    fp32 = TorchEngine(TINY, CPU).run_batch({"images": images(2)})["logits"]
    half = TorchEngine(TINY, {**CPU, "dtype": dtype}).run_batch({"images": images(2)})["logits"]
    assert half.dtype == np.float32  # cast back on the device, as declared
    scale = float(np.abs(fp32).max())
    np.testing.assert_allclose(half, fp32, atol=0.05 * scale)


def test_compile_runs_the_same_network() -> None:
    """torch.compile through the 'eager' backend: the wiring, without a C compiler."""
    engine = TorchEngine(TINY, {**CPU, "compile": "eager"})
    x = images(3)
    want = TorchEngine(TINY, CPU).run_batch({"images": x})["logits"]
    np.testing.assert_allclose(
        engine.run_batch({"images": x})["logits"], want, rtol=1e-5, atol=1e-6
    )
    assert engine.metadata()["compiled"] == "true"


def test_a_factory_path_is_used_as_is() -> None:
    """A factory is imported by name; only a file path is resolved beside the service."""

    class Tiny(Service):
        model = Model(TINY, backend="torch", max_batch_size=4, options=CPU)

    assert Tiny.model is not None
    spec = resolve(Declaration(ModelKey("tiny", "model"), Tiny, Tiny.model), None, threads=1)
    assert spec.source == TINY and spec.threads == 1
    engine = create_engine(spec)
    assert isinstance(engine, TorchEngine)
    assert engine.run_batch(engine.warmup_batch(2))["logits"].shape == (2, 10)


def test_missing_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked for (or left to the default), CUDA must be there: never a silent CPU run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="'cuda' was asked for but CUDA is not available"):
        TorchEngine(TINY, {**CPU, "device": "cuda"})
    no_device = {k: v for k, v in CPU.items() if k != "device"}
    with pytest.raises(RuntimeError, match=r"CUDA is not available.*options\['device'\] = 'cpu'"):
        TorchEngine(TINY, no_device)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_cuda_graphs_on_cpu_are_refused() -> None:
    with pytest.raises(ValueError, match="cuda_graphs needs device 'cuda'"):
        TorchEngine(TINY, {**CPU, "cuda_graphs": True})


@pytest.mark.parametrize(
    ("target", "options", "error", "match"),
    [
        (TINY, {**CPU, "cuda_graph": True}, ValueError, "unknown options"),
        (TINY, {**CPU, "dtype": "int8"}, ValueError, "dtype must be one of"),
        (TINY, {**CPU, "device": "tpu"}, ValueError, "device must be"),
        (TINY, {"device": "cpu", "outputs": LOGITS}, ValueError, "needs options\\['inputs'\\]"),
        (TINY, {**CPU, "inputs": {"x": {"shape": [1, 3]}}}, ValueError, "batch\\) axis"),
        (
            TINY,
            {**CPU, "outputs": {"logits": {"shape": [None, 11]}}},
            ValueError,
            "declared with shape \\[None, 11\\]",
        ),
        (
            TINY,
            {**CPU, "outputs": {**LOGITS, "extra": {"shape": [None, 1]}}},
            RuntimeError,
            "2 are declared",
        ),
        ("examples/vision/model.py:tiny_resnet", CPU, ValueError, "package.module:function"),
        ("examples.vision.model:nope", CPU, ValueError, "no callable 'nope'"),
        ("tests.test_torch_engine:not_a_module", CPU, TypeError, "not a torch.nn.Module"),
    ],
)
def test_bad_declarations_fail_at_load(
    target: str, options: dict, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        TorchEngine(target, options)


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]


def test_vision_service_on_torch_cpu_in_process() -> None:
    """The example's real ResNet-50-like network, its pre- and post-processing, on the CPU."""
    from examples.vision import service as vision
    from splitserve.runtime.inprocess import InProcessService

    options = {**vision.TORCH_MODEL.options, "device": "cpu", "dtype": "float32"}
    options.update(cuda_graphs=False, channels_last=False)

    class VisionCPU(vision.Classify):
        name = "vision"
        model = dataclasses.replace(vision.TORCH_MODEL, options=options)

    service = InProcessService(VisionCPU, engine_threads=2)
    reply = service.call(vision.photo(0), "image/jpeg")
    assert reply.status == 200, reply.body
    answer = json.loads(reply.body)
    assert answer["backend"] == "torch" and answer["simulated_accelerator"] is False
    scores = [c["score"] for c in answer["top5"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert len({c["class"] for c in answer["top5"]}) == 5


def test_split_server_runs_torch_in_the_engine_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real split server: torch loads in the engine process, never in CPU workers."""
    from examples.vision.service import photo

    monkeypatch.setenv("SPLITSERVE_VISION_BACKEND", "torch")
    monkeypatch.setenv("SPLITSERVE_VISION_DEVICE", "cpu")
    server = Server(["examples.vision.service:Classify"], "--cpu-workers", "1")
    try:
        r = server.post("vision", content=photo(1), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        assert r.json()["backend"] == "torch" and len(r.json()["top5"]) == 5
        engines, workers = [], []
        for pid in children_of(server.pid):
            name = process_name(pid)
            if name.startswith("splitserve-eng"):
                engines.append(pid)
            elif name.startswith("splitserve-cpu"):
                workers.append(pid)
        assert engines and workers
        for pid in engines:
            assert "libtorch" in Path(f"/proc/{pid}/maps").read_text()
        for pid in workers:
            assert "torch" not in Path(f"/proc/{pid}/maps").read_text()
    finally:
        server.stop()
