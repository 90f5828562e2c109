"""Counters behind ``GET /v1/stats``.

All counters are cumulative since the server started, so a client takes two snapshots
and subtracts (busy fraction = delta busy_s / delta wall time). Engines count per model
and report to the supervisor once a second over the control plane (``EngineStats``);
each front counts requests, per model and per stage, from the timings every reply
carries (``FrontStats``), and reports them the same way, so that any front can answer
for the whole server. Engines, fronts, the supervisor and threaded mode all use this
module, so it belongs to none of them.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec


class TensorInfo(msgspec.Struct, array_like=True, frozen=True):
    """A model input or output as its engine loaded it (-1: a dynamic axis)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


class ModelStats(msgspec.Struct, array_like=True):
    backend: str
    simulated: bool = False
    batches: int = 0
    rows: int = 0
    busy_s: float = 0.0
    queue_ms_sum: float = 0.0
    batch_sizes: dict[int, int] = {}
    # The model's signature, for protocol v2 metadata (the front loads no model).
    inputs: list[TensorInfo] = []
    outputs: list[TensorInfo] = []


class EngineStats(msgspec.Struct, tag="engine_stats", array_like=True):
    """One engine process's counters, sent to the supervisor every second."""

    index: int
    pid: int
    uptime_s: float
    models: dict[str, ModelStats]
    shm_bytes: int = 0  # this engine's shared-memory pool, allocated

    @property
    def busy_s(self) -> float:
        return sum(m.busy_s for m in self.models.values())


# Reply timings (ms) that the front sums per stage, under the stage's public name.
STAGES = {
    "front_queue_ms": "front_queue",
    "worker_ms": "worker",
    "infer_wait_ms": "infer_wait",
    "engine_queue_ms": "engine_queue",
    "engine_compute_ms": "engine_compute",
}


class ModelCounters:
    """Counts one model's batches; shared by its batch thread and the reporter."""

    def __init__(
        self,
        backend: str,
        simulated: bool = False,
        inputs: Sequence[Any] = (),
        outputs: Sequence[Any] = (),
    ) -> None:
        """``inputs``/``outputs``: the engine's TensorSpecs (name, dtype, shape)."""
        self.simulated = simulated
        self._stats = ModelStats(backend, simulated, batch_sizes={})
        self._inputs = [_tensor_info(spec) for spec in inputs]
        self._outputs = [_tensor_info(spec) for spec in outputs]
        self._sizes: Counter[int] = Counter()
        self._lock = threading.Lock()

    def record(self, rows: int, busy_s: float, queue_ms_sum: float) -> None:
        with self._lock:
            s = self._stats
            s.batches += 1
            s.rows += rows
            s.busy_s += busy_s
            s.queue_ms_sum += queue_ms_sum
            self._sizes[rows] += 1

    def snapshot(self) -> ModelStats:
        with self._lock:
            s = self._stats
            return ModelStats(
                s.backend,
                s.simulated,
                s.batches,
                s.rows,
                s.busy_s,
                s.queue_ms_sum,
                dict(self._sizes),
                self._inputs,
                self._outputs,
            )


def _tensor_info(spec: Any) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in spec.shape)
    return TensorInfo(spec.name, str(spec.dtype), shape)


# Upper bounds (ms) of the stage-time histograms.
STAGE_BUCKETS_MS = (0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class Histogram(msgspec.Struct, array_like=True):
    counts: list[int] = msgspec.field(default_factory=lambda: [0] * (len(STAGE_BUCKETS_MS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(STAGE_BUCKETS_MS, value)] += 1
        self.total += value

    def add(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total


class ModelRequests(msgspec.Struct, array_like=True):
    """One model's answered requests, as a front saw them."""

    success: int = 0
    success_ns: int = 0
    failures: dict[str, int] = {}  # by reason (protocol/metrics.py:failure_reason)
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    inference_count: int = 0  # rows (engine models) or request elements (services)
    execution_count: int = 0
    pending: int = 0
    last_inference_ms: int = 0

    def add(self, other: ModelRequests) -> None:
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        _add_counts(self.failures, other.failures)
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)


_SUMMED = (
    "success",
    "success_ns",
    "fail_ns",
    "queue_ns",
    "compute_ns",
    "inference_count",
    "execution_count",
    "pending",
)


class StageSum(msgspec.Struct, array_like=True):
    count: int = 0
    sum_ms: float = 0.0


class FrontStats(msgspec.Struct, tag="front_stats", array_like=True):
    """Everything one front counts, cumulative since it started: answers by status and
    the summed time of each stage (``/v1/stats``), and per model and per-stage
    histograms (v2 statistics, ``/metrics``). A front sends it to the supervisor every
    second; the supervisor broadcasts every front's latest (``ServerState``) and keeps
    the last of each front that died (``pid`` 0), so sums over fronts never go down."""

    index: int = 0
    pid: int = 0
    by_status: dict[str, int] = {}
    stage_sums: dict[str, StageSum] = {}
    models: dict[str, ModelRequests] = {}
    stages: dict[str, Histogram] = {}

    @property
    def answered(self) -> int:
        return sum(self.by_status.values())

    def add(self, other: FrontStats) -> None:
        """Count ``other``'s requests in too (the index and pid stay this one's)."""
        _add_counts(self.by_status, other.by_status)
        for name, theirs in other.stage_sums.items():
            mine = self.stage_sums.setdefault(name, StageSum())
            mine.count += theirs.count
            mine.sum_ms += theirs.sum_ms
        for key, requests in other.models.items():
            self.models.setdefault(key, ModelRequests()).add(requests)
        for name, hist in other.stages.items():
            self.stages.setdefault(name, Histogram()).add(hist)


def _add_counts(into: dict[str, int], other: dict[str, int]) -> None:
    for key, n in other.items():
        into[key] = into.get(key, 0) + n


def summed(parts: Iterable[FrontStats], index: int = 0, pid: int = 0) -> FrontStats:
    """The counts of several fronts as one (new: the parts are left as they are)."""
    total = FrontStats(index, pid)
    for part in parts:
        total.add(part)
    return total


class RequestStats:
    """The front's counters: answers by status and the summed time of each stage.

    ``counts`` is where they live (shared with the front's per-model counters, so the
    front reports one ``FrontStats``)."""

    def __init__(self, counts: FrontStats | None = None, started: float | None = None) -> None:
        self.started = time.monotonic() if started is None else started
        self.counts = FrontStats() if counts is None else counts
        self.by_status = self.counts.by_status
        sums = self.counts.stage_sums
        self._stages = [(key, sums.setdefault(name, StageSum())) for key, name in STAGES.items()]

    def record(self, status: int, timings: dict[str, float]) -> None:
        key = str(status)
        self.by_status[key] = self.by_status.get(key, 0) + 1
        for key_ms, stage in self._stages:
            value = timings.get(key_ms)
            if value is not None:
                stage.count += 1
                stage.sum_ms += value

    def _stage(self, name: str) -> dict[str, float]:
        stage = self.counts.stage_sums[name]
        return {"count": stage.count, "sum": stage.sum_ms}

    def snapshot(self, mode: str, engines: list[EngineStats]) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for engine in engines:
            for key, stats in engine.models.items():
                merged = models.setdefault(
                    key,
                    {
                        "backend": stats.backend,
                        "simulated": stats.simulated,
                        "batches": 0,
                        "rows": 0,
                        "busy_s": 0.0,
                        "queue_ms_sum": 0.0,
                        "batch_sizes": {},
                    },
                )
                merged["batches"] += stats.batches
                merged["rows"] += stats.rows
                merged["busy_s"] += stats.busy_s
                merged["queue_ms_sum"] += stats.queue_ms_sum
                for size, n in stats.batch_sizes.items():
                    merged["batch_sizes"][str(size)] = merged["batch_sizes"].get(str(size), 0) + n
        return {
            "mode": mode,
            "uptime_s": time.monotonic() - self.started,
            "requests": {"total": sum(self.by_status.values()), "by_status": dict(self.by_status)},
            "stages_ms": {name: self._stage(name) for name in STAGES.values()},
            "models": models,
            "engines": {
                str(e.index): {"busy_s": e.busy_s, "uptime_s": e.uptime_s} for e in engines
            },
        }
