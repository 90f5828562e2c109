"""`splitserve build`: precision preparation, the accuracy gate, the fp32 search, the cache,
and servers that build or reuse engines on start. Real models, real ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from splitserve.compile.builder import BuildSpec, GateRejected, build
from splitserve.compile.data import DataError
from splitserve.compile.gate import ABS_FLOOR, GateResult, output_error
from splitserve.compile.precision import PrecisionError
from splitserve.engines.onnxruntime import OnnxRuntimeEngine
from tests.build_models import (
    CNN_SHAPE,
    SENSITIVE_WIDTH,
    make_cancelling,
    make_clipped,
    make_near_zero,
    make_sensitive,
    make_small_cnn,
)
from tests.build_models import write_inputs as write_batches
from tests.conftest import ROOT, Server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("build-models")
    make_sensitive(base / "sensitive.onnx")
    make_small_cnn(base / "cnn.onnx")
    write_batches(base / "sensitive_inputs", (SENSITIVE_WIDTH,), 8, seed=1)
    write_batches(base / "cnn_inputs", CNN_SHAPE, 8, seed=2)
    return {
        "sensitive": base / "sensitive.onnx",
        "cnn": base / "cnn.onnx",
        "sensitive_inputs": base / "sensitive_inputs",
        "cnn_inputs": base / "cnn_inputs",
    }


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(root))
    return root


def _outputs(path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": batch})[0]


def test_gate_rejects_broken_fp16_build_and_auto_search_fixes_it(models, cache):
    spec = BuildSpec(
        models["sensitive"], "fp16", calibration=models["sensitive_inputs"], tolerance=1e-3
    )
    with pytest.raises(GateRejected) as rejected:
        build(spec)
    report = rejected.value.report
    assert not report["gate"]["passed"]
    assert report["gate"]["outputs"]["y"]["rel_l2"] > 0.5  # weights clipped to fp16's range
    assert not list((cache / "engines").glob("*/model.onnx")), "a rejected engine was cached"
    assert list((cache / "engines").glob("*.rejected.json"))

    spec.keep_fp32 = ("auto",)
    artifact = build(spec)
    report = artifact.report
    assert report["gate"]["passed"]
    assert report["kept_fp32"] == ["project"], report["kept_fp32"]  # the one layer, no more
    assert report["search"]["probes"][-1]["passed"]
    # What was built: fp16 weights outside the kept layer, the kept layer's in fp32.
    built = onnx.load(artifact.path)
    types = {init.name: init.data_type for init in built.graph.initializer}
    assert types["wide"] == onnx.TensorProto.FLOAT
    assert onnx.TensorProto.FLOAT16 in types.values()
    x = np.load(models["sensitive_inputs"] / "batch_007.npy")
    err = output_error(_outputs(models["sensitive"], x), _outputs(artifact.path, x))
    assert err.rel_l2 < 1e-3


def test_int8_build_is_quantized_gated_and_cached(models, cache):
    spec = BuildSpec(models["cnn"], "int8", calibration=models["cnn_inputs"])
    first = build(spec)
    assert not first.reused
    report = first.report
    assert report["gate"]["passed"]
    assert report["gate"]["outputs"]["y"]["rel_l2"] < 0.1
    assert report["latency"]["fp32_ms"] > 0 and report["latency"]["engine_ms"] > 0
    assert report["device"].startswith("cpu:")
    assert "onnxruntime" in report["versions"]
    # The saved artifact carries the optimised int8 graph (Q/DQ folded into int8 kernels
    # or kept as QuantizeLinear pairs): no fp32-only graph slipped through.
    ops = {n.op_type for n in onnx.load(first.path).graph.node}
    assert ops & {"QuantizeLinear", "QLinearConv", "DynamicQuantizeLinear", "ConvInteger"}
    assert (first.directory / "report.json").exists()

    again = build(spec)
    assert again.reused and again.directory == first.directory

    # Anything in the key changes the entry: here the fp32 keep list.
    spec.keep_fp32 = ("conv1",)
    other = build(spec)
    assert not other.reused and other.directory != first.directory
    assert other.report["kept_fp32"] == ["conv1"]


def test_int8_needs_calibration_and_tensor_files_must_match_inputs(models, cache, tmp_path):
    with pytest.raises(DataError, match="calibration"):
        build(BuildSpec(models["cnn"], "int8"))
    wrong = tmp_path / "images"
    wrong.mkdir()
    (wrong / "a.jpg").write_bytes(b"not really")
    (wrong / "b.jpg").write_bytes(b"not really")
    with pytest.raises(DataError, match="--service"):
        build(BuildSpec(models["cnn"], "int8", calibration=wrong))
    with pytest.raises(PrecisionError, match="neither a node name nor an op type"):
        build(BuildSpec(models["cnn"], "fp16", keep_fp32=("NoSuchLayer",)))


def test_bf16_on_the_cpu_provider_is_a_clear_error(models, cache):
    with pytest.raises(PrecisionError, match="bf16 needs a GPU backend"):
        build(BuildSpec(models["cnn"], "bf16", calibration=models["cnn_inputs"]))


def _cli(*args: str, env_cache: Path) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, SPLITSERVE_CACHE_DIR=str(env_cache))
    return subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "build", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_cli_rejects_then_builds_with_auto_and_writes_reports(models, cache, tmp_path):
    base = [
        str(models["sensitive"]),
        "--precision",
        "fp16",
        "--tolerance",
        "0.001",
        "--calibration",
        str(models["sensitive_inputs"]),
    ]
    rejected = _cli(*base, "--report", str(tmp_path / "rejected.json"), env_cache=cache)
    assert rejected.returncode == 1, rejected.stderr
    assert "fails the accuracy gate" in rejected.stderr
    assert not json.loads((tmp_path / "rejected.json").read_text())["gate"]["passed"]

    out = tmp_path / "model-fp16.onnx"
    done = _cli(
        *base,
        "--keep-fp32",
        "auto",
        "--output",
        str(out),
        "--report",
        str(tmp_path / "report.json"),
        env_cache=cache,
    )
    assert done.returncode == 0, done.stderr
    assert "kept in fp32: project" in done.stdout
    assert out.exists()
    assert json.loads((tmp_path / "report.json").read_text())["kept_fp32"] == ["project"]

    reused = _cli(*base, "--keep-fp32", "auto", env_cache=cache)
    assert reused.returncode == 0 and reused.stdout.startswith("reused"), reused.stdout


def test_cli_tensorrt_without_tensorrt_says_what_is_missing(models, cache):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    done = _cli(str(models["cnn"]), "--precision", "fp16", "--backend", "tensorrt", env_cache=cache)
    assert done.returncode == 2
    assert "tensorrt backend needs NVIDIA TensorRT" in done.stderr


def test_cli_torch_backend_explains_where_its_precision_comes_from(models, cache):
    done = _cli(str(models["cnn"]), "--precision", "fp16", "--backend", "torch", env_cache=cache)
    assert done.returncode == 2
    assert "dtype" in done.stderr


def test_io_binding_gives_the_same_outputs_as_run(models):
    x = np.load(models["cnn_inputs"] / "batch_000.npy")
    plain = OnnxRuntimeEngine(models["cnn"], threads=1)
    bound = OnnxRuntimeEngine(models["cnn"], threads=1, options={"io_binding": True})
    assert bound.io_binding and not plain.io_binding
    np.testing.assert_array_equal(plain.run_batch({"x": x})["y"], bound.run_batch({"x": x})["y"])


@pytest.mark.parametrize("mode", ["split", "threaded"])
def test_server_builds_on_first_start_and_reuses_the_cache(mode, cache):
    """A Model with precision="fp16", keep_fp32=("auto",): built and gated on start, then
    served; the next start takes it from the cache and says so."""
    services = ["tests.services:SensitiveFp16"]
    args = ["--mode", mode, "--cpu-workers", "1"]
    x = np.load(ROOT / "tests/_models/sensitive_inputs/batch_000.npy")
    reference = _outputs(ROOT / "tests/_models/sensitive.onnx", x)
    for start, word in ((1, "built"), (2, "reusing cached")):
        server = Server(services, *args)
        try:
            assert f"sensitivefp16/model: {word} fp16 engine" in server.log(), server.log()
            assert "kept in fp32: project" in server.log()
            reply = server.post("sensitivefp16", json={"x": x.tolist()})
            assert reply.status_code == 200, reply.text
            got = np.array(reply.json()["y"], dtype=np.float32)
            assert output_error(reference, got).rel_l2 < 1e-3, start
        finally:
            server.stop()


def test_server_refuses_to_start_when_the_gate_rejects(cache):
    import os

    from tests.conftest import free_port

    server_cmd = [
        sys.executable,
        "-m",
        "splitserve.cli",
        "serve",
        "tests.services:SensitiveFp16Strict",
        "--port",
        str(free_port()),
    ]
    done = subprocess.run(
        server_cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, SPLITSERVE_CACHE_DIR=str(cache)),
    )
    assert done.returncode != 0
    assert "fails the accuracy gate" in done.stderr


def test_ocr_line_equality_of_the_benchmarks():
    from examples.ocr.service import text_lines_equal

    assert text_lines_equal(["a b", "c"], ["a b", "c"]) == (2, 2)
    assert text_lines_equal(["a b", "c"], ["ab", "c"]) == (1, 2)  # a space is text
    assert text_lines_equal(["a", "b", "c"], ["a", "c"]) == (2, 3)  # a line lost
    assert text_lines_equal([], []) == (0, 0)


def test_edit_distance():
    from examples.ocr.compare import edit_distance

    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("same text", "same text") == 0
    assert edit_distance("ab", "ba") == 2  # a swap is two edits
    assert edit_distance("No.58816 loan", "No.5B816 loan") == 1


def test_ocr_agreement_is_one_minus_the_character_error_rate():
    from examples.ocr.service import OCRService

    def answer(*texts: str) -> dict:
        return {"results": [{"text": t} for t in texts]}

    agree = OCRService.agreement
    page = answer("invoice 2011-10-21", "credit $5,862.10")  # 18 + 1 + 16 characters
    assert agree(None, page, page) == (35, 35)
    # One character misread costs one in 35 (whole-line equality would count a line lost).
    assert agree(None, page, answer("invoice 2011-10-21", "credit $5,862.1O")) == (34, 35)
    assert agree(None, page, answer("invoice 2011-10-21")) == (18, 35)  # a line and its break
    # Text invented on a blank page: negative, and the gate's ratio falls to 0.
    assert agree(None, answer(), answer("ghost")) == (-5, 0)
    from splitserve.compile.gate import service_agreement

    summed = service_agreement(
        lambda r, n: agree(None, r, n), [page, answer()], [page, answer("ghost")]
    )
    assert (summed.matching, summed.total) == (30, 35)
    assert summed.ratio == pytest.approx(30 / 35)


def test_gate_error_is_sound_for_near_zero_references():
    # A probability map of ~1e-9 that moved by ~1e-8: finite, and small in absolute terms.
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 1e-9, 1000)
    err = output_error(ref, ref + rng.uniform(-1e-8, 1e-8, 1000))
    assert err.finite and err.floored and err.scale < 1e-8
    assert err.rel_l2 < 1e-4  # measured against the floor, not divided by ~0
    assert GateResult(1e-2, {"y": err}).passed
    # The same output moved by 0.01 in absolute terms fails, and the message says why.
    moved = output_error(ref, ref + 0.01)
    gate = GateResult(1e-2, {"y": moved})
    assert not gate.passed and moved.finite
    (failure,) = gate.failures
    assert "relative error" in failure and f"the floor {ABS_FLOOR:g}" in failure
    assert "not finite" not in failure and "NaN" not in failure
    # Outputs of order one keep the plain relative measure: 1% noise reads as ~1%.
    big = rng.normal(0, 1, 1000)
    plain = output_error(big, big * 1.01)
    assert not plain.floored and plain.rel_l2 == pytest.approx(0.01, rel=0.05)
    # An exact zero reference and an exact copy: no error, no division by zero.
    assert output_error(np.zeros(4), np.zeros(4)).rel_l2 == 0.0


def test_uncalibrated_build_of_a_near_zero_output_passes_and_says_what_it_is_worth(tmp_path, cache):
    """The OCR detector's case in small: on random inputs the output is ~1e-13."""
    path = tmp_path / "near_zero.onnx"
    make_near_zero(path)
    done = _cli(
        str(path), "--precision", "fp16", "--report", str(tmp_path / "r.json"), env_cache=cache
    )
    assert done.returncode == 0, done.stderr
    assert "gate: passed" in done.stdout
    assert "note: the gate judged random inputs (no --calibration)" in done.stdout
    gate = json.loads((tmp_path / "r.json").read_text())["gate"]
    assert gate["inputs"] == "random" and gate["note"]
    assert gate["outputs"]["y"]["floored"] and gate["outputs"]["y"]["problem"] == ""


@pytest.mark.parametrize("keep", [("clip",), ("div",), ("Clip",), ("auto",)])
def test_kept_fp32_layers_with_several_typed_inputs_load(tmp_path, cache, keep):
    """Clip's min/max and a constant Clip and Div share: every typed input of a kept
    layer gets the layer's float type, so ONNX Runtime accepts the graph."""
    path = tmp_path / "clipped.onnx"
    make_clipped(path)
    inputs = tmp_path / "inputs"
    write_batches(inputs, (3, 8, 8), 4, seed=4)
    # "auto" with a tolerance fp16 cannot meet: the search keeps layers one by one.
    tolerance = 1e-6 if keep == ("auto",) else None
    spec = BuildSpec(path, "fp16", calibration=inputs, keep_fp32=keep, tolerance=tolerance)
    artifact = build(spec)
    assert artifact.report["gate"]["passed"], artifact.report["gate"]
    x = np.load(inputs / "batch_000.npy")
    assert output_error(_outputs(path, x), _outputs(artifact.path, x)).rel_l2 < 1e-2


def test_calibration_folder_of_pages_skips_their_ground_truth(tmp_path):
    from splitserve.compile.data import list_files

    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "doc_0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(8))
    (pages / "doc_0.json").write_text("{}")
    (pages / "doc_1.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(8))
    (pages / "doc_1.json").write_text("{}")
    assert [p.name for p in list_files(pages)] == ["doc_0.png", "doc_1.jpg"]
    requests = tmp_path / "requests"  # a JSON service's requests are all kept
    requests.mkdir()
    for i in range(2):
        (requests / f"r{i}.json").write_text("{}")
    assert len(list_files(requests)) == 2


def test_cli_without_the_build_extra_names_the_extra(tmp_path, models):
    """onnx missing (made unimportable in the child): the message says what to install."""
    code = (
        "import sys; sys.modules['onnx'] = None\n"
        "from splitserve.cli import main\n"
        f"sys.exit(main(['build', {str(models['cnn'])!r}, '--precision', 'fp16']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'splitserve[build]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_search_rounds_rerank_and_trim_to_the_needed_layers():
    """The search logic alone: layer "c" only shows its loss once "a" is kept (as a
    layer fed by an overflowing one does); the answer is exactly {a, c}."""
    from splitserve.compile.search import search_keep

    needed = {"a", "c"}
    layers = ["a", "b", "c", "d", "e", "f", "g", "h"]

    def attempt(extra: list[str]) -> tuple[bool, str, object]:
        return needed <= set(extra), "", frozenset(extra)

    def rank(built: object, kept: set[str]) -> list[str]:
        order = ["c", "b", "d"] if "a" in built else ["a", "b", "d", "e", "c"]  # type: ignore[operator]
        rest = [x for x in layers if x not in order]
        return [x for x in order + rest if x not in kept]

    result = search_keep(attempt, rank, frozenset())
    assert result.passed
    assert sorted(result.extra) == ["a", "c"]
    assert len(result.probes) <= 4


def test_cli_build_with_the_service_declaration_is_what_the_server_reuses(cache):
    """`splitserve build --service ... --model ...` and a server compute the same key."""
    done = _cli(
        "--service",
        "tests.services:SensitiveFp16",
        "--model",
        "model",
        "--precision",
        "fp16",
        env_cache=cache,
    )
    assert done.returncode == 0, done.stderr
    server = Server(["tests.services:SensitiveFp16"], "--mode", "threaded")
    try:
        assert "sensitivefp16/model: reusing cached fp16 engine" in server.log(), server.log()
    finally:
        server.stop()


def test_int8_for_tensorrt_is_symmetric_without_quantized_biases(models):
    """TensorRT's parser accepts only symmetric int8 Q/DQ (zero points 0, int8 type)."""
    from splitserve.compile.precision import KeepList, apply_precision, fold_constants, name_nodes

    source = name_nodes(fold_constants(onnx.load(models["cnn"])))
    batches = [{"x": np.load(p)} for p in sorted(models["cnn_inputs"].glob("*.npy"))[:4]]
    graph = apply_precision(source, "int8", KeepList(), batches, backend="tensorrt").graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quantize
    for node in quantize:
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
    assert not any(v.dtype == np.int32 for v in inits.values()), "biases must stay fp32"


def test_gate_accepts_non_finite_values_only_where_fp32_has_them():
    ref = np.array([0.0, -np.inf, 1.0, 2.0])
    assert output_error(ref, np.array([0.0, -np.inf, 1.0, 2.01])).finite
    assert not output_error(ref, np.array([0.0, 5.0, 1.0, 2.0])).finite
    assert not output_error(ref, np.array([np.inf, -np.inf, 1.0, 2.0])).finite


def test_a_model_with_external_weights_builds_and_its_weights_are_in_the_key(
    models, cache, tmp_path
):
    """Exporters write large weights beside the graph (model.onnx.data)."""
    path = tmp_path / "cnn.onnx"
    model = onnx.load(models["cnn"])
    onnx.save(model, path, save_as_external_data=True, location="cnn.onnx.data", size_threshold=0)
    assert (tmp_path / "cnn.onnx.data").exists()
    spec = BuildSpec(path, "fp16", calibration=models["cnn_inputs"])
    first = build(spec)
    assert first.report["gate"]["passed"] and build(spec).reused
    model = onnx.load(models["cnn"])
    for init in model.graph.initializer:  # new weights, same graph
        if init.name == "fc":
            values = onnx.numpy_helper.to_array(init) * 2
            init.CopyFrom(onnx.numpy_helper.from_array(values, "fc"))
    onnx.save(model, path, save_as_external_data=True, location="cnn.onnx.data", size_threshold=0)
    again = build(spec)
    assert not again.reused and again.directory != first.directory


def test_the_vision_classifier_exported_by_torch_builds_at_fp16(cache, tmp_path):
    """examples/vision's network (its small variant) as a user exports it: torch's ONNX
    exporter, weights in an external file, then `splitserve build --precision fp16`."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from examples.vision.model import tiny_resnet

    path = tmp_path / "classifier.onnx"
    torch.onnx.export(
        tiny_resnet().eval(),
        (torch.randn(1, 3, 64, 64),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", max=64)}},
    )
    inputs = tmp_path / "inputs"
    write_batches(inputs, (3, 64, 64), 4, seed=6)
    done = _cli(str(path), "--precision", "fp16", "--calibration", str(inputs), env_cache=cache)
    assert done.returncode == 0, done.stderr
    assert "gate: passed" in done.stdout


def test_a_service_agreement_is_the_gate_unless_a_tolerance_is_given(tmp_path, cache):
    """A service that judges its own answers: the outputs' relative error (here ~0.3 at
    fp16) is reported but does not refuse the build; an explicit tolerance still does."""
    import splitserve

    path = tmp_path / "cancelling.onnx"
    make_cancelling(path)

    class SignOf(splitserve.Service):
        name = "sign-of"
        model = splitserve.Model(str(path))

        def preprocess(self, request: splitserve.Request) -> dict[str, np.ndarray]:
            return {"x": np.asarray(request.json_field("x", list), dtype=np.float32)}

        def postprocess(self, outputs: splitserve.Tensors, request: splitserve.Request) -> dict:
            return {"rows": int(outputs["y"].shape[0])}  # what fp16 cannot change

        def agreement(self, reference: dict, candidate: dict) -> tuple[int, int]:
            return int(reference == candidate), 1

    requests = tmp_path / "requests"
    requests.mkdir()
    rng = np.random.default_rng(11)
    for i in range(4):
        (requests / f"r{i}.json").write_text(json.dumps({"x": rng.normal(0, 1, (2, 8)).tolist()}))
    spec = BuildSpec(path, "fp16", calibration=requests, service=SignOf, model_name="model")
    artifact = build(spec)
    gate = artifact.report["gate"]
    assert gate["passed"] and gate["tolerance"] == float("inf")
    assert gate["outputs"]["y"]["rel_l2"] > 0.01 and gate["agreement"]["ratio"] == 1.0
    spec.tolerance = 1e-2
    with pytest.raises(GateRejected, match="relative error"):
        build(spec)
