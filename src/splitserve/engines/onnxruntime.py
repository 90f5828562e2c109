"""ONNX Runtime backend: CPU by default, CUDA / TensorRT providers when installed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from splitserve.engines.base import Engine, TensorSpec

# onnxruntime reports element types as strings such as "tensor(float)".
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

# Preferred order: the fastest provider the installed onnxruntime offers comes first.
_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _spec(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else None for d in node.shape)
    return TensorSpec(node.name, _ORT_TYPES.get(node.type, "float32"), shape)


class OnnxRuntimeEngine(Engine):
    """An ``InferenceSession`` with thread counts set for the process layout.

    ``threads`` is the intra-op thread count (the engine process gets the cores);
    ``options`` may set ``providers`` (a list) and ``inter_op_threads``.
    """

    def __init__(
        self, path: Path, *, threads: int | None = None, options: Mapping[str, Any] | None = None
    ) -> None:
        options = dict(options or {})
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = int(options.pop("inter_op_threads", 1))
        # Spinning threads burn the cores CPU workers need between batches.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        providers = options.pop("providers", None) or [p for p in _PROVIDER_ORDER if p in available]
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        self.providers = self.session.get_providers()
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def infer(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self._output_names, dict(batch))
        return dict(zip(self._output_names, results, strict=True))

    def metadata(self) -> dict[str, Any]:
        return dict(self.session.get_modelmeta().custom_metadata_map)
