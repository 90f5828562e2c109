"""Counters behind ``GET /v1/stats``.

All counters are cumulative since the process started, so a client takes two snapshots
and subtracts (busy fraction = delta busy_s / delta wall time). Engines count per model
and report to the supervisor once a second over the control plane (``EngineStats``);
the front counts requests and per-stage times from the timings every reply carries.
Engines, the front and threaded mode all use this module, so it belongs to none of them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import msgspec


class ModelStats(msgspec.Struct, array_like=True):
    backend: str
    simulated: bool = False
    batches: int = 0
    rows: int = 0
    busy_s: float = 0.0
    queue_ms_sum: float = 0.0
    batch_sizes: dict[int, int] = {}


class EngineStats(msgspec.Struct, tag="engine_stats", array_like=True):
    """One engine process's counters, sent to the supervisor every second."""

    index: int
    pid: int
    uptime_s: float
    models: dict[str, ModelStats]

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

    def __init__(self, backend: str, simulated: bool = False) -> None:
        self.simulated = simulated
        self._stats = ModelStats(backend, simulated, batch_sizes={})
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
            )


class RequestStats:
    """The front's counters: answers by status and the summed time of each stage."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.by_status: Counter[str] = Counter()
        self.stages = {name: [0, 0.0] for name in STAGES.values()}

    def record(self, status: int, timings: dict[str, float]) -> None:
        self.by_status[str(status)] += 1
        for key, name in STAGES.items():
            value = timings.get(key)
            if value is not None:
                stage = self.stages[name]
                stage[0] += 1
                stage[1] += value

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
            "stages_ms": {n: {"count": c, "sum": s} for n, (c, s) in self.stages.items()},
            "models": models,
            "engines": {
                str(e.index): {"busy_s": e.busy_s, "uptime_s": e.uptime_s} for e in engines
            },
        }
