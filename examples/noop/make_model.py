"""Write ``identity.onnx``: one float32 input ``x`` [batch, n] returned unchanged.

The no-op service and the transport benchmarks use it to measure the server's own cost.
Run: ``python examples/noop/make_model.py [out_path]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent / "identity.onnx"


def make_identity_model(path: Path = DEFAULT_PATH, dtype: str = "float32") -> Path:
    import onnx
    from onnx import TensorProto, helper

    elem = {"float32": TensorProto.FLOAT, "uint8": TensorProto.UINT8}[dtype]
    x = helper.make_tensor_value_info("x", elem, ["batch", "n"])
    y = helper.make_tensor_value_info("y", elem, ["batch", "n"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


if __name__ == "__main__":
    print(make_identity_model(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PATH))
