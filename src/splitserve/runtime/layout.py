"""The default process layout: how many CPU workers and engine replicas, and how many
compute threads each engine gets, chosen from the machine and the served models when
the command line leaves them open.

The rules come from measurements (docs/benchmarks.md) and say why:

- Models computing on the host's cores: one single-threaded engine replica per core (up
  to ``MAX_CPU_REPLICAS``, then more threads each). Independent batches on separate
  cores scale almost perfectly, where one engine spreading a batch over several threads
  does not, and with the per-engine compute slot (engine_worker.py) no more compute
  threads run than there are cores. Pre/post-processing is a small share of such a
  service (OCR: ~6%), so one CPU worker per four cores.
- Models on an accelerator (a GPU, or the simulated one): one engine replica, since the
  device runs one batch at a time anyway, and the CPU work is what limits: a CPU worker
  per core but one (left to the front and the engine's I/O).

A model that declares ``replicas`` other than 1 keeps its declaration; ``splitserve
tune`` searches around these defaults for the best layout of a given service.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from splitserve.service import Model

MAX_CPU_REPLICAS = 8


class Layout(NamedTuple):
    cpu_workers: int
    engine_replicas: int | None  # None: each model's own ``replicas``


def gpu_present() -> bool:
    """An NVIDIA device node is visible (no driver library is loaded to find out)."""
    return Path("/dev/nvidiactl").exists() and os.environ.get("CUDA_VISIBLE_DEVICES") != ""


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def on_accelerator(model: Model) -> bool:
    """Whether the model's batches will run on an accelerator rather than the host."""
    if model.backend in ("simulated", "tensorrt"):
        return True
    if model.backend == "torch":
        return str(model.options.get("device", "cpu")).startswith("cuda")
    if model.backend == "onnxruntime":
        providers = model.options.get("providers")
        if providers is not None:
            return any("CUDA" in str(p) or "Tensorrt" in str(p) for p in providers)
        return _installed("onnxruntime-gpu") and gpu_present()
    return False


def default_layout(
    models: Mapping[str, Model], cores: int | None = None, cpu_workers: int | None = None
) -> Layout:
    """The layout for ``models`` on a machine of ``cores`` cores (default: this one)."""
    cores = max(1, cores or os.cpu_count() or 1)
    declared = any(m.replicas != 1 for m in models.values())
    if any(not on_accelerator(m) for m in models.values()):
        replicas = None if declared else min(cores, MAX_CPU_REPLICAS)
        workers = max(1, cores // 4)
    else:
        replicas = None
        workers = max(1, cores - 1)
    return Layout(cpu_workers or workers, replicas)
