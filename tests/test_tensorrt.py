"""The TensorRT backend's parts that run without TensorRT: optimisation profiles from
the service's batch settings, ONNX input reading, and the errors without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.engines.base import TensorSpec, create_engine
from splitserve.engines.tensorrt import TensorRTUnavailable, onnx_inputs, profile_shapes
from splitserve.spec import ModelSpec
from tests.build_models import make_small_cnn


def test_profile_covers_batch_1_to_max_and_tunes_for_full_batches():
    specs = [TensorSpec("x", "float32", (None, 3, 32, 32))]
    assert profile_shapes(specs, 16) == {"x": ((1, 3, 32, 32), (16, 3, 32, 32), (16, 3, 32, 32))}


def test_dynamic_axes_need_a_declared_range():
    specs = [TensorSpec("x", "float32", (None, 3, 48, None))]
    with pytest.raises(ValueError, match="shapes"):
        profile_shapes(specs, 6)
    shapes = profile_shapes(specs, 6, {"x": ((3, 48, 32), (3, 48, 320), (3, 48, 2000))})
    assert shapes["x"] == ((1, 3, 48, 32), (6, 3, 48, 320), (6, 3, 48, 2000))
    with pytest.raises(ValueError, match="fixed at 48"):
        profile_shapes(specs, 6, {"x": ((3, 32, 32), (3, 48, 320), (3, 48, 2000))})
    with pytest.raises(ValueError, match="3 axes"):
        profile_shapes(specs, 6, {"x": ((48, 32), (48, 320), (48, 2000))})


def test_onnx_inputs_reads_names_types_and_dynamic_axes(tmp_path: Path):
    make_small_cnn(tmp_path / "cnn.onnx")
    assert onnx_inputs(tmp_path / "cnn.onnx") == [TensorSpec("x", "float32", (None, 3, 32, 32))]


def test_without_tensorrt_the_backend_says_what_it_needs(tmp_path: Path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    make_small_cnn(tmp_path / "cnn.onnx")
    spec = ModelSpec("cnn/model", "tensorrt", str(tmp_path / "cnn.onnx"))
    with pytest.raises(TensorRTUnavailable, match="pip install 'splitserve\\[tensorrt\\]'"):
        create_engine(spec)


def test_a_batch_axis_the_model_fixes_is_kept():
    specs = [TensorSpec("x", "float32", (1, 3, 32, 32))]
    assert profile_shapes(specs, 8)["x"] == ((1, 3, 32, 32),) * 3
