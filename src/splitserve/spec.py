"""Names and resolved specs shared by the processes, free of user code.

``ModelKey`` names a model across the server (``service/model``: wire messages, engine
routes, statistics, built engines). ``ModelSpec`` is what an engine loads: a model
declaration with its file resolved, its built engine chosen and its thread count
settled, so an engine process never imports a service module to read declarations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class ModelKey(NamedTuple):
    """A model of a service; ``str(key)`` is the ``service/model`` form used on the wire."""

    service: str
    model: str

    def __str__(self) -> str:
        return f"{self.service}/{self.model}"

    @classmethod
    def parse(cls, key: str) -> ModelKey:
        service, sep, model = key.partition("/")
        if not sep or not service or not model:
            raise ValueError(f"a model key is 'service/model', got {key!r}")
        return cls(service, model)


@dataclass(frozen=True)
class ModelSpec:
    """One model as an engine loads it (see ``splitserve.layout`` for how it is made).

    ``source`` is what the backend opens: a file (ONNX, a built engine, an exported
    ``.pt2``) or a torch factory ``package.module:function``; ``precision`` is what that
    file holds. ``threads`` is the intra-op thread count (``None``: the backend's own
    default). The batching fields are the declaration's (``splitserve.Model``).
    """

    # The fields from ``max_batch_size`` on repeat ``splitserve.Model``'s: engines read
    # them here, and never import service.py (pyproject's import contracts).
    key: str
    backend: str
    source: str
    precision: str = "fp32"
    max_batch_size: int = 8
    max_delay_ms: float = 2.0
    pad_axes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    pad_value: float = 0.0
    pad_bucket: int = 0
    threads: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
