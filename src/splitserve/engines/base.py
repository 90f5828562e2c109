"""The one interface every inference backend implements."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitserve.errors import BadRequest
from splitserve.service import Model


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of a model; ``None`` in ``shape`` marks a dynamic axis."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


class Engine(abc.ABC):
    """A loaded model that runs a whole batch at once. Lives in an engine process only."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    simulated = False  # True only for the simulated accelerator: labelled wherever it shows
    # True when batches compute on the host's cores (not on an accelerator): such batches
    # take turns in their engine process, so no more compute threads run than it was given.
    on_host_cores = False

    @abc.abstractmethod
    def infer(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch (axis 0 is the batch axis of every input and output)."""

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Reject inputs the model cannot take (``BadRequest`` saying what differs)."""
        expected = {s.name for s in self.inputs}
        if set(inputs) != expected:
            raise BadRequest(f"model inputs are {sorted(expected)}, got {sorted(inputs)}")
        for spec in self.inputs:
            arr = inputs[spec.name]
            if arr.dtype != np.dtype(spec.dtype):
                raise BadRequest(f"input {spec.name!r} must be {spec.dtype}, got {arr.dtype}")
            if arr.ndim != len(spec.shape):
                raise BadRequest(
                    f"input {spec.name!r} must have {len(spec.shape)} dimensions, "
                    f"got shape {arr.shape}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
                if axis > 0 and want is not None and want != got:
                    raise BadRequest(
                        f"input {spec.name!r} axis {axis} must be {want}, got shape {arr.shape}"
                    )

    @property
    def max_batch_size(self) -> int | None:
        """The largest batch the model itself accepts (``None``: no limit of its own)."""
        dim = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else None
        return dim if isinstance(dim, int) and dim > 0 else None

    def warmup_batch(self, batch_size: int = 1) -> dict[str, np.ndarray]:
        """A batch of the right dtypes, dynamic axes set to 32, for the warm-up run."""
        batch: dict[str, np.ndarray] = {}
        rng = np.random.default_rng(0)
        for spec in self.inputs:
            shape = [batch_size] + [d if isinstance(d, int) else 32 for d in spec.shape[1:]]
            if np.dtype(spec.dtype).kind == "f":
                batch[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            else:
                batch[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return batch

    def metadata(self) -> dict[str, Any]:
        return {}


BACKENDS = ("onnxruntime", "simulated", "tensorrt", "torch")


def create_engine(
    model: Model, path: Path, *, threads: int | None, run_dir: Path | None = None
) -> Engine:
    """Instantiate the backend named by ``model.backend`` (imports it only now).

    ``run_dir`` is the server's run directory: engines of one server that share a
    device (the simulated one) coordinate through it.
    """
    if model.backend == "onnxruntime":
        from splitserve.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, threads=model.threads or threads, options=model.options)
    if model.backend == "tensorrt":  # ``path``: the prepared ONNX; the plan is built beside it
        from splitserve.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(
            path,
            precision=model.precision,
            max_batch_size=model.max_batch_size,
            options=model.options,
        )
    if model.backend == "simulated":
        from splitserve.engines.simulated import SimulatedEngine

        return SimulatedEngine(model.options, run_dir)
    if model.backend == "torch":  # a factory (``module:function``) is used as is
        from splitserve.engines.torch import TorchEngine

        return TorchEngine(
            str(path) if model.path.endswith(".pt2") else model.path,
            model.options,
            max_batch_size=model.max_batch_size,
            threads=model.threads or threads,
        )
    raise ValueError(f"unknown backend {model.backend!r} for {path.name}; available: {BACKENDS}")
