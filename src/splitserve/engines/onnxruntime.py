"""ONNX Runtime backend: CPU by default, CUDA / TensorRT providers when installed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from splitserve.engines.base import Engine, TensorSpec
from splitserve.spec import ModelSpec

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


def default_providers() -> list[str]:
    """The installed providers this engine uses, fastest first (CPU always last)."""
    available = ort.get_available_providers()
    return [p for p in _PROVIDER_ORDER if p in available]


def _spec(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else None for d in node.shape)
    return TensorSpec(node.name, _ORT_TYPES.get(node.type, "float32"), shape)


class OnnxRuntimeEngine(Engine):
    """An ``InferenceSession`` with thread counts set for the process layout.

    ``threads`` is the intra-op thread count (the engine process gets the cores);
    ``options`` may set ``providers`` (a list), ``inter_op_threads`` and ``io_binding``.

    On a GPU provider, batches run through I/O binding (on by default there): inputs are
    copied to the device once, outputs are allocated on the device and copied back in
    one step, instead of ``run``'s per-call host allocations.
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
        providers = options.pop("providers", None) or default_providers()
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        self.providers = self.session.get_providers()
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        on_gpu = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.io_binding = bool(options.pop("io_binding", on_gpu))
        self._output_device = "cuda" if on_gpu else "cpu"
        self.on_host_cores = not on_gpu

    @classmethod
    def from_spec(cls, spec: ModelSpec, run_dir: Path | None) -> OnnxRuntimeEngine:
        return cls(Path(spec.source), threads=spec.threads, options=spec.options)

    def run_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.io_binding:
            return self._infer_bound(batch)
        results = self.session.run(self._output_names, dict(batch))
        return dict(zip(self._output_names, results, strict=True))

    def _infer_bound(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for name, value in batch.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self._output_names:
            binding.bind_output(name, self._output_device)
        self.session.run_with_iobinding(binding)
        results = binding.copy_outputs_to_cpu()
        return dict(zip(self._output_names, results, strict=True))
