"""Per-model request counters (v2 statistics) and Prometheus ``/metrics``.

The front counts what it answers, per model (a service, or a bare engine model
``service.model``): successes, failures by reason, durations, and stage-time histograms
from the timings each reply carries. The engines' counters (batches, rows, busy and queue
time, batch sizes, shared memory) reach the front in the supervisor's ``ServerState``
(threaded mode: the process's own models), and restarts come with it too: a scrape reads
them all in the front, so ``/metrics`` covers every process without a second channel.

Triton's metric names are used where Triton has the metric (``nv_inference_*``, same
labels ``model`` and ``version``); the rest are ``splitserve_*``. GPU metrics come from
NVML and only where a GPU and ``pynvml`` exist.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from splitserve.runtime.messages import EngineStats
from splitserve.runtime.stats import STAGES

# Upper bounds (ms) of the stage-time histograms.
STAGE_BUCKETS_MS = (0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


def failure_reason(status: int) -> str:
    """Triton's failure reasons (REJECTED, CANCELED, BACKEND, OTHER) plus TIMEOUT."""
    if status == 503:
        return "REJECTED"  # shed: queues full, or a process restarting
    if status == 504:
        return "TIMEOUT"
    if status == 499:
        return "CANCELED"
    if status >= 500:
        return "BACKEND"
    return "OTHER"  # the request was wrong (4xx)


@dataclass
class ModelRequests:
    """One model's answered requests, as the front saw them."""

    success: int = 0
    success_ns: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    inference_count: int = 0  # rows (engine models) or request elements (services)
    execution_count: int = 0
    pending: int = 0
    last_inference_ms: int = 0


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(STAGE_BUCKETS_MS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(STAGE_BUCKETS_MS, value)] += 1
        self.total += value


class InferenceStats:
    """The front's per-model counters; used from its one event loop only."""

    def __init__(self) -> None:
        self.models: dict[str, ModelRequests] = {}
        self.stages = {name: Histogram() for name in STAGES.values()}

    def model(self, key: str) -> ModelRequests:
        counters = self.models.get(key)
        if counters is None:
            counters = self.models[key] = ModelRequests()
        return counters

    def started(self, key: str) -> float:
        self.model(key).pending += 1
        return time.monotonic()

    def finished(
        self,
        key: str,
        started: float,
        status: int,
        timings: dict[str, float],
        count: int = 1,
    ) -> None:
        counters = self.model(key)
        counters.pending -= 1
        elapsed_ns = int((time.monotonic() - started) * 1e9)
        if status == 200:
            counters.success += 1
            counters.success_ns += elapsed_ns
            counters.inference_count += count
            counters.execution_count += 1
            counters.last_inference_ms = int(time.time() * 1000)
        else:
            counters.failures[failure_reason(status)] += 1
            counters.fail_ns += elapsed_ns
        queue_ms = timings.get("front_queue_ms", 0.0) + timings.get("engine_queue_ms", 0.0)
        counters.queue_ns += int(queue_ms * 1e6)
        counters.compute_ns += int(timings.get("engine_compute_ms", 0.0) * 1e6)
        for key_ms, stage in STAGES.items():
            value = timings.get(key_ms)
            if value is not None:
                self.stages[stage].observe(value)


def model_statistics(
    name: str, key: str, engine_model: bool, stats: InferenceStats, engines: list[EngineStats]
) -> dict[str, Any]:
    """Triton's statistics document for one model (``/v2/models/{m}/stats``)."""
    requests = stats.models.get(key, ModelRequests())
    doc: dict[str, Any] = {
        "name": name,
        "version": "1",
        "last_inference": requests.last_inference_ms,
        "inference_count": requests.inference_count,
        "execution_count": requests.execution_count,
        "inference_stats": {
            "success": {"count": requests.success, "ns": requests.success_ns},
            "fail": {"count": sum(requests.failures.values()), "ns": requests.fail_ns},
            "queue": {"count": requests.success, "ns": requests.queue_ns},
            "compute_input": {"count": 0, "ns": 0},
            "compute_infer": {"count": requests.success, "ns": requests.compute_ns},
            "compute_output": {"count": 0, "ns": 0},
        },
        "batch_stats": [],
    }
    if engine_model:  # the engines' view: every request of this model, whatever its route
        sizes: Counter[int] = Counter()
        batches = rows = 0
        queue_ms = busy_s = 0.0
        for engine in engines:
            model = engine.models.get(key)
            if model is not None:
                batches += model.batches
                rows += model.rows
                queue_ms += model.queue_ms_sum
                busy_s += model.busy_s
                sizes.update(model.batch_sizes)
        doc["inference_count"] = rows
        doc["execution_count"] = batches
        doc["inference_stats"]["queue"] = {"count": rows, "ns": int(queue_ms * 1e6)}
        doc["inference_stats"]["compute_infer"] = {"count": batches, "ns": int(busy_s * 1e9)}
        doc["batch_stats"] = [
            {"batch_size": size, "compute_infer": {"count": n, "ns": 0}}
            for size, n in sorted(sizes.items())
        ]
    return doc


class MetricsCollector:
    """A prometheus-client collector that reads the counters at each scrape."""

    def __init__(
        self,
        stats: InferenceStats,
        request_stats: Any,
        dispatcher: Any,
        model_names: Any,
    ) -> None:
        """``model_names(key) -> v2 model name``; ``request_stats``: the /v1 counters."""
        self.stats = stats
        self.request_stats = request_stats
        self.dispatcher = dispatcher
        self.model_names = model_names

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        labels = ["model", "version"]
        success = CounterMetricFamily(
            "nv_inference_request_success", "Successful inference requests", labels=labels
        )
        failure = CounterMetricFamily(
            "nv_inference_request_failure",
            "Failed inference requests, by reason",
            labels=[*labels, "reason"],
        )
        count = CounterMetricFamily(
            "nv_inference_count", "Inferences performed (rows or request elements)", labels=labels
        )
        executions = CounterMetricFamily(
            "nv_inference_exec_count", "Model executions (batches for engine models)", labels=labels
        )
        duration = CounterMetricFamily(
            "nv_inference_request_duration_us", "Cumulative request duration", labels=labels
        )
        queue = CounterMetricFamily(
            "nv_inference_queue_duration_us", "Cumulative queueing duration", labels=labels
        )
        compute = CounterMetricFamily(
            "nv_inference_compute_infer_duration_us", "Cumulative compute duration", labels=labels
        )
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count", "Requests in the server now", labels=labels
        )
        engines = self.dispatcher.engine_stats()
        engine_models: dict[str, list[Any]] = {}
        for engine in engines:
            for key, model in engine.models.items():
                engine_models.setdefault(key, []).append(model)
        for key, requests in self.stats.models.items():
            if key in engine_models:
                continue  # engine models: the engines' counters below include these requests
            name = [self.model_names(key), "1"]
            success.add_metric(name, requests.success)
            for reason, n in requests.failures.items():
                failure.add_metric([*name, reason], n)
            count.add_metric(name, requests.inference_count)
            executions.add_metric(name, requests.execution_count)
            duration.add_metric(name, (requests.success_ns + requests.fail_ns) / 1000)
            queue.add_metric(name, requests.queue_ns / 1000)
            compute.add_metric(name, requests.compute_ns / 1000)
            pending.add_metric(name, requests.pending)
        batch_size = HistogramMetricFamily(
            "splitserve_batch_size", "Rows per batch, per engine model", labels=["model"]
        )
        busy = CounterMetricFamily(
            "splitserve_engine_busy_seconds",
            "Seconds an engine spent computing (busy fraction = rate)",
            labels=["engine"],
        )
        for key, models in sorted(engine_models.items()):
            name = [self.model_names(key), "1"]
            requests = self.stats.models.get(key, ModelRequests())
            success.add_metric(name, requests.success)
            for reason, n in requests.failures.items():
                failure.add_metric([*name, reason], n)
            duration.add_metric(name, (requests.success_ns + requests.fail_ns) / 1000)
            pending.add_metric(name, requests.pending)
            count.add_metric(name, sum(m.rows for m in models))
            executions.add_metric(name, sum(m.batches for m in models))
            queue.add_metric(name, sum(m.queue_ms_sum for m in models) * 1000)
            compute.add_metric(name, sum(m.busy_s for m in models) * 1e6)
            sizes: Counter[int] = Counter()
            for m in models:
                sizes.update(m.batch_sizes)
            batch_size.add_metric(
                [name[0]], _cumulative(sizes), sum(s * n for s, n in sizes.items())
            )
        for engine in engines:
            busy.add_metric([str(engine.index)], engine.busy_s)
        yield from (success, failure, count, executions, duration, queue, compute, pending)
        yield batch_size
        yield busy
        yield from self._splitserve_metrics(engines)
        yield from _gpu_metrics()

    def _splitserve_metrics(self, engines: list[EngineStats]) -> Iterable[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        stages = HistogramMetricFamily(
            "splitserve_stage_duration_ms",
            "Time per stage of a request (front queue, worker, awaiting engines, "
            "engine queue, engine compute)",
            labels=["stage"],
        )
        for stage, hist in self.stats.stages.items():
            buckets = []
            running = 0
            for bound, n in zip((*STAGE_BUCKETS_MS, float("inf")), hist.counts, strict=True):
                running += n
                buckets.append([_bound(bound), running])
            stages.add_metric([stage], buckets, hist.total)
        yield stages
        by_status = CounterMetricFamily(
            "splitserve_requests", "Answers by HTTP status (/v1 and /v2)", labels=["status"]
        )
        for status, n in self.request_stats.by_status.items():
            by_status.add_metric([status], n)
        yield by_status
        shed = CounterMetricFamily("splitserve_shed_requests", "Requests refused with 503")
        shed.add_metric([], self.request_stats.by_status.get("503", 0))
        yield shed
        expired = CounterMetricFamily(
            "splitserve_deadline_exceeded_requests", "Requests that ran out of time (504)"
        )
        expired.add_metric([], self.request_stats.by_status.get("504", 0))
        yield expired
        state = getattr(self.dispatcher, "state", None)
        restarts = CounterMetricFamily(
            "splitserve_restarts", "Child processes restarted, by role", labels=["role"]
        )
        for role, n in (getattr(state, "restarts", None) or {}).items():
            restarts.add_metric([role], n)
        yield restarts
        shm = GaugeMetricFamily(
            "splitserve_shared_memory_bytes",
            "Shared memory allocated by each engine's pool",
            labels=["engine"],
        )
        for engine in engines:
            shm.add_metric([str(engine.index)], engine.shm_bytes)
        yield shm


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


def _cumulative(sizes: Counter[int]) -> list[list[Any]]:
    """Histogram buckets over batch sizes 1, 2, 4, ... 1024, +Inf."""
    buckets = []
    for bound in (*(2**i for i in range(11)), float("inf")):
        buckets.append([_bound(bound), sum(n for s, n in sizes.items() if s <= bound)])
    return buckets


def _gpu_metrics() -> Iterable[Any]:
    """NVML utilisation and memory per GPU; nothing without a GPU or pynvml."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return
    from prometheus_client.core import GaugeMetricFamily

    utilisation = GaugeMetricFamily("nv_gpu_utilization", "GPU utilisation (0-1)", labels=["gpu"])
    used = GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU memory used", labels=["gpu"])
    total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        utilisation.add_metric([str(index)], pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
        used.add_metric([str(index)], memory.used)
        total.add_metric([str(index)], memory.total)
    yield from (utilisation, used, total)


def metrics_route(stats: InferenceStats, request_stats: Any, dispatcher: Any) -> Any:
    """``GET /metrics``: the Prometheus text format, computed at each scrape."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from starlette.responses import Response
    from starlette.routing import Route

    def model_name(key: str) -> str:
        return key.replace("/", ".")  # "service/model" -> the v2 model "service.model"

    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(stats, request_stats, dispatcher, model_name))

    async def metrics(_: Any) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", metrics, methods=["GET"])
