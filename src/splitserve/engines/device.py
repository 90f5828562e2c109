"""Where engines keep their caches, and what device an engine is built for.

The engine cache (``splitserve build``) and the TensorRT backend's timing cache both
live under ``cache_root``; ``device_name`` is part of every built engine's cache key.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """``$SPLITSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/splitserve``, else ~/.cache/splitserve."""
    explicit = os.environ.get("SPLITSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "splitserve"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(backend: str, options: Mapping[str, Any]) -> str:
    """What the engine is built for: the GPU for TensorRT/CUDA, otherwise the CPU model."""
    # a provider is a name, or a (name, options) pair
    providers = [p if isinstance(p, str) else p[0] for p in options.get("providers") or []]
    if backend == "tensorrt" or any("CUDA" in p or "Tensorrt" in p for p in providers):
        try:
            import torch

            if torch.cuda.is_available():
                return "cuda:" + torch.cuda.get_device_name(0)
        except ImportError:
            pass
        return "cuda"
    if backend == "onnxruntime" and not providers:
        from splitserve.engines.onnxruntime import default_providers  # only on this path

        if default_providers()[0] != "CPUExecutionProvider":
            return "onnxruntime:" + default_providers()[0]
    return "cpu:" + cpu_name()
