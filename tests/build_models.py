"""Small ONNX models for the engine-build tests, written by code (never committed).

``sensitive``: an MLP whose last layer ("project") has weights beyond fp16's largest
value (65504): all-fp16 cannot be right; keeping that one layer in fp32 is the fix.
``small_cnn``: two convolutions, pooling and a dense layer, for int8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SENSITIVE_WIDTH = 16
CNN_SHAPE = (3, 32, 32)


def _save(nodes, inputs, outputs, initializers, path: Path) -> None:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def make_sensitive(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (SENSITIVE_WIDTH, 64)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (64, 32)).astype(np.float32), "w2"),
        # weights beyond fp16's range (65504): an fp16 copy of them cannot be right
        numpy_helper.from_array(rng.uniform(1e5, 3e5, (32, 8)).astype(np.float32), "wide"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="dense1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="dense2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "wide"], ["y"], name="project"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", SENSITIVE_WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    _save(nodes, [x], [y], inits, path)


def make_small_cnn(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32), "c1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (16,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (32, 16, 3, 3)).astype(np.float32), "c2"),
        numpy_helper.from_array(rng.normal(0, 0.1, (32,)).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 0.3, (10, 32)).astype(np.float32), "fc"),
        numpy_helper.from_array(rng.normal(0, 0.1, (10,)).astype(np.float32), "fcb"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1", "b1"], ["a1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2", "b2"], ["a2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="dense", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *CNN_SHAPE])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])
    _save(nodes, [x], [y], inits, path)


def write_inputs(folder: Path, shape: tuple[int, ...], count: int, seed: int = 0) -> None:
    """``count`` .npy batches of 4 rows, values like a normalised image or embedding."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.save(folder / f"batch_{i:03d}.npy", rng.normal(0, 1, (4, *shape)).astype(np.float32))


def make_clipped(path: Path) -> None:
    """Conv -> Clip(0, six) -> Div(six): the MobileNet hard-swish shape of the OCR
    detector, where Clip's bounds and Div's divisor are one shared constant. Keeping
    either layer in fp32 leaves the other with an input of the wrong float type unless
    every typed input of a kept layer is cast."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip"),
        helper.make_node("Div", ["c", "six"], ["y"], name="div"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])
    _save(nodes, [x], [y], inits, path)


def make_near_zero(path: Path) -> None:
    """Sigmoid(x @ w - 30): a probability map that is all but zero on most inputs (as a
    text detector's on an image without text, ~1e-13), finite everywhere."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(9)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.2, (8, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(-30.0, np.float32), "shift"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
        helper.make_node("Add", ["h", "shift"], ["z"], name="shift"),
        helper.make_node("Sigmoid", ["z"], ["y"], name="sigmoid"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    _save(nodes, [x], [y], inits, path)


def make_cancelling(path: Path) -> None:
    """x @ (A + D) - x @ A with A ~ 1000 and D ~ 1: x @ D in fp32; at fp16, where the
    weights' step at 1000 is 0.5, the difference moves by tenths (a large relative
    error on any backend, since it lies in the weights)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(13)
    base = rng.uniform(1000, 2000, (8, 8)).astype(np.float32)
    inits = [
        numpy_helper.from_array(base + rng.normal(0, 1, (8, 8)).astype(np.float32), "w_plus"),
        numpy_helper.from_array(base, "w"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_plus"], ["a"], name="plus"),
        helper.make_node("MatMul", ["x", "w"], ["b"], name="base"),
        helper.make_node("Sub", ["a", "b"], ["y"], name="cancel"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    _save(nodes, [x], [y], inits, path)
