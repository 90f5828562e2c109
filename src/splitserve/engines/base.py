"""The one interface every inference backend implements."""

from __future__ import annotations

import abc
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitserve.errors import BadRequest
from splitserve.spec import ModelSpec


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

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, spec: ModelSpec, run_dir: Path | None) -> Engine:
        """The engine for a resolved model spec (see ``create_engine``)."""

    @abc.abstractmethod
    def run_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
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
        """What a benchmark report shows about the loaded engine (device, dtype...)."""
        return {}


# The backends by name: "module:Class", imported only when a model uses the backend (so
# a process imports torch or TensorRT only if it serves such a model). A backend is a
# subclass of ``Engine`` with ``from_spec``; adding one is a line here.
BACKENDS = {
    "onnxruntime": "splitserve.engines.onnxruntime:OnnxRuntimeEngine",
    "simulated": "splitserve.engines.simulated:SimulatedEngine",
    "tensorrt": "splitserve.engines.tensorrt:TensorRTEngine",
    "torch": "splitserve.engines.torch:TorchEngine",
}


def create_engine(spec: ModelSpec, run_dir: Path | None = None) -> Engine:
    """Load ``spec`` on its backend.

    ``run_dir`` is the server's run directory: engines of one server that share a
    device (the simulated one) coordinate through it.
    """
    target = BACKENDS.get(spec.backend)
    if target is None:
        raise ValueError(
            f"unknown backend {spec.backend!r} for {spec.key}; available: {sorted(BACKENDS)}"
        )
    module, _, name = target.partition(":")
    backend: type[Engine] = getattr(importlib.import_module(module), name)
    return backend.from_spec(spec, run_dir)
