"""A simulated accelerator, for planning and testing beyond the machines at hand.

It runs a model's declared inputs and outputs with a latency model
``t(batch) = a + b * batch`` (``latency_ms: [a, b]`` in the model's options, to be
calibrated from real GPU runs, e.g. by benchmarks/gpu), holds ONE device shared by every
engine process of the server while it "runs" (an exclusive file lock, as a single GPU
serialises kernels of different processes), and sleeps meanwhile: like a GPU kernel, it
costs the host no CPU. Every output, metric and log line says it is simulated.

    Model(backend="simulated", options={
        "inputs": {"x": {"shape": [None, 3, 224, 224], "dtype": "float32"}},
        "outputs": {"logits": {"shape": [None, 1000], "dtype": "float32"}},
        "latency_ms": [2.0, 0.25],
    })
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from splitserve.engines.base import Engine, TensorSpec
from splitserve.spec import ModelSpec

log = logging.getLogger("splitserve.engine")

_process_lock = threading.Lock()  # flock does not exclude threads sharing one descriptor


def _specs(declared: Any, what: str) -> list[TensorSpec]:
    if not isinstance(declared, Mapping) or not declared:
        raise ValueError(f"simulated model needs options[{what!r}]: {{name: {{shape, dtype}}}}")
    specs = []
    for name, spec in declared.items():
        shape = tuple(None if d is None else int(d) for d in spec["shape"])
        if not shape or shape[0] is not None:
            raise ValueError(f"{what} {name!r}: the first (batch) axis must be None")
        specs.append(TensorSpec(name, str(np.dtype(spec.get("dtype", "float32"))), shape))
    return specs


class SimulatedEngine(Engine):
    simulated = True

    def __init__(self, options: Mapping[str, Any], device_dir: Path | None = None) -> None:
        self.inputs = _specs(options.get("inputs"), "inputs")
        self.outputs = _specs(options.get("outputs"), "outputs")
        for spec in self.outputs:
            if any(d is None for d in spec.shape[1:]):
                raise ValueError(f"output {spec.name!r}: only the batch axis may be dynamic")
        a_ms, b_ms = options.get("latency_ms", (1.0, 0.1))
        if a_ms < 0 or b_ms < 0:
            raise ValueError("latency_ms [a, b] must be >= 0")
        self.a_s, self.b_s = a_ms / 1000.0, b_ms / 1000.0
        # One lock file per server (its run directory) = one device for all its engines.
        device_dir = device_dir or Path(tempfile.gettempdir()) / f"splitserve-sim-{os.getpid()}"
        device_dir.mkdir(parents=True, exist_ok=True)
        self._device = os.open(device_dir / "simulated-device.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._rng = np.random.default_rng(0)
        log.warning("SIMULATED accelerator: t(batch) = %.3f ms + %.3f ms * batch", a_ms, b_ms)

    @classmethod
    def from_spec(cls, spec: ModelSpec, run_dir: Path | None) -> SimulatedEngine:
        return cls(spec.options, run_dir)

    def latency_s(self, batch_size: int) -> float:
        return self.a_s + self.b_s * batch_size

    def run_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = next(iter(batch.values())).shape[0]
        outputs = {
            spec.name: self._rng.standard_normal((rows, *spec.shape[1:])).astype(spec.dtype)
            for spec in self.outputs
        }
        with _process_lock:
            fcntl.flock(self._device, fcntl.LOCK_EX)  # waits (no CPU) for the device
            try:
                time.sleep(self.latency_s(rows))
            finally:
                fcntl.flock(self._device, fcntl.LOCK_UN)
        return outputs
