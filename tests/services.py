"""Services the tests serve: small real ONNX models, knobs to misbehave on request."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

import splitserve

MODEL_DIR = Path(__file__).resolve().parent / "_models"


def make_models() -> None:
    """Write the test models (identity graphs; one with its batch axis fixed at 1)."""
    import onnx
    from onnx import TensorProto, helper

    from examples.noop.make_model import make_identity_model

    MODEL_DIR.mkdir(exist_ok=True)
    make_identity_model(MODEL_DIR / "identity.onnx")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "one", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(MODEL_DIR / "identity_batch1.onnx"))

    from tests.build_models import SENSITIVE_WIDTH, make_sensitive, write_inputs

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, [])
    node = helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)
    graph = helper.make_graph([node], "scalar", [x], [total])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(MODEL_DIR / "scalar.onnx"))

    make_sensitive(MODEL_DIR / "sensitive.onnx")
    write_inputs(MODEL_DIR / "sensitive_inputs", (SENSITIVE_WIDTH,), 8, seed=1)


class Echo(splitserve.Service):
    """JSON {"values": [...], "rows": k, "sleep_ms": t, "crash": bool} -> the values back.

    ``rows`` repeats the values as k rows of one request; ``sleep_ms`` busies the CPU
    worker; ``crash`` ends the worker process abruptly, as a segfault would. Anything
    else malformed is a 4xx.
    """

    name = "echo"
    model = splitserve.Model(str(MODEL_DIR / "identity.onnx"), max_batch_size=8, max_delay_ms=20)
    max_rows = 64

    def preprocess(self, request: splitserve.Request) -> dict[str, np.ndarray]:
        if not request.is_json:
            if not request.body or len(request.body) % 4:
                raise splitserve.BadRequest("raw body must be float32 values")
            return {"x": np.frombuffer(request.body, dtype=np.float32)[None, :]}
        values = request.json_array("values", np.float32, ndim=1)
        doc = request.json()
        if doc.get("crash"):
            os._exit(3)
        sleep_ms = doc.get("sleep_ms", 0)
        if not isinstance(sleep_ms, int | float) or isinstance(sleep_ms, bool) or sleep_ms < 0:
            raise splitserve.Unprocessable("'sleep_ms' must be a number >= 0")
        time.sleep(sleep_ms / 1000)
        rows = doc.get("rows", 1)
        if type(rows) is not int or not 1 <= rows <= self.max_rows:
            raise splitserve.Unprocessable(f"'rows' must be an integer from 1 to {self.max_rows}")
        return {"x": np.repeat(values[None, :], rows, axis=0)}

    def postprocess(self, outputs: splitserve.Tensors, request: splitserve.Request) -> Any:
        y = outputs["y"]
        if not request.is_json:
            return y.tobytes()
        return {"values": y.tolist(), "shape": list(y.shape)}


class FixedOne(Echo):
    """The same, on a model whose batch axis is fixed at 1: rows run one by one."""

    name = "fixed_one"
    model = splitserve.Model(
        str(MODEL_DIR / "identity_batch1.onnx"), max_batch_size=8, max_delay_ms=5
    )


class Padded(Echo):
    """Variable-length rows share batches, zero-padded along axis 1."""

    name = "padded"
    model = splitserve.Model(
        str(MODEL_DIR / "identity.onnx"), max_batch_size=16, max_delay_ms=50, pad_axes={"x": (1,)}
    )


class Pipeline(splitserve.Service):
    """Two models called from ``handle`` with CPU work between them."""

    name = "pipeline"
    models = {
        "first": splitserve.Model(str(MODEL_DIR / "identity.onnx")),
        "second": splitserve.Model(str(MODEL_DIR / "identity.onnx"), replicas=2),
    }

    async def handle(self, request: splitserve.Request, infer) -> Any:
        values = request.json_array("values", np.float32, ndim=1)[None, :]
        first = await infer("first", {"x": values})
        second = await infer("second", {"x": first["y"] * 2})
        return {"values": second["y"][0].tolist()}


class SlowEngine(splitserve.Service):
    """Raw float32 values -> {"rows": 1}, through a model on the simulated accelerator
    that takes 400 ms per batch: calls stay in flight at the engine long enough to kill it
    under them."""

    name = "slowengine"
    model = splitserve.Model(
        backend="simulated",
        max_batch_size=8,
        max_delay_ms=1.0,
        options={
            "inputs": {"x": {"shape": [None, 4], "dtype": "float32"}},
            "outputs": {"y": {"shape": [None, 4], "dtype": "float32"}},
            "latency_ms": [400.0, 0.0],
        },
    )

    def preprocess(self, request: splitserve.Request) -> dict[str, np.ndarray]:
        return {"x": np.zeros((1, 4), dtype=np.float32)}

    def postprocess(self, outputs: splitserve.Tensors, request: splitserve.Request) -> Any:
        return {"rows": int(outputs["y"].shape[0])}


class Misbehave(splitserve.Service):
    """JSON {"wait_s": t, "rank3": bool, "scalar": bool} -> {"ok": true}, calling a model
    wrongly on request: after an awaited pause of ``t`` seconds (a job that can be
    cancelled), with an input of the wrong rank (the engine refuses it), or on a model
    whose output is 0-d (it cannot be split into the batch's rows)."""

    name = "misbehave"
    models = {
        "identity": splitserve.Model(str(MODEL_DIR / "identity.onnx"), max_batch_size=4),
        "scalar": splitserve.Model(str(MODEL_DIR / "scalar.onnx"), max_batch_size=4),
    }

    async def handle(self, request: splitserve.Request, infer) -> Any:
        doc = request.json()
        if doc.get("wait_s"):
            await asyncio.sleep(float(doc["wait_s"]))
        x = np.ones((1, 3), dtype=np.float32)
        if doc.get("rank3"):
            x = x[None]
        await infer("scalar" if doc.get("scalar") else "identity", {"x": x})
        return {"ok": True}


class ImageStats(splitserve.Service):
    """An image (raw bytes, or JSON {"image": base64}) -> its size and mean BGR colour.

    The numbers go through the identity model, so every image request crosses an engine.
    """

    name = "image_stats"
    model = splitserve.Model(str(MODEL_DIR / "identity.onnx"), max_batch_size=8, max_delay_ms=5)

    def preprocess(self, request: splitserve.Request) -> dict[str, np.ndarray]:
        img = request.image()
        mean_bgr = img.reshape(-1, 3).mean(axis=0)
        return {"x": np.array([[*img.shape[:2], *mean_bgr]], dtype=np.float32)}

    def postprocess(self, outputs: splitserve.Tensors, request: splitserve.Request) -> Any:
        height, width, *mean_bgr = outputs["y"][0].tolist()
        return {"width": int(width), "height": int(height), "mean_bgr": mean_bgr}


class SensitiveFp16(splitserve.Service):
    """JSON {"x": [[16 floats], ...]} -> {"y": ...} from an fp16 engine built on start.

    The model's last layer cannot be fp16 (weights beyond its range): the accuracy gate
    refuses the all-fp16 build and ``keep_fp32=("auto",)`` finds that layer.
    """

    model = splitserve.Model(
        str(MODEL_DIR / "sensitive.onnx"),
        precision="fp16",
        calibration=str(MODEL_DIR / "sensitive_inputs"),
        keep_fp32=("auto",),
        tolerance=1e-3,
    )

    def preprocess(self, request: splitserve.Request) -> dict[str, np.ndarray]:
        return {"x": request.json_array("x", np.float32, ndim=2)}

    def postprocess(self, outputs: dict[str, np.ndarray], request: splitserve.Request) -> Any:
        return {"y": outputs["y"].tolist()}


class SensitiveFp16Strict(SensitiveFp16):
    """The same build without the fp32 search: the gate must stop the server."""

    model = splitserve.Model(
        str(MODEL_DIR / "sensitive.onnx"),
        precision="fp16",
        calibration=str(MODEL_DIR / "sensitive_inputs"),
        tolerance=1e-3,
    )
