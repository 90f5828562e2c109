"""Per-model request counters (v2 statistics) and Prometheus ``/metrics``.

The front counts what it answers, per model (a service, or a bare engine model
``service.model``): successes, failures by reason, durations, and stage-time histograms
from the timings each reply carries. The engines' counters (batches, rows, busy and queue
time, batch sizes, shared memory) reach the front in the supervisor's ``ServerState``
(threaded mode: the process's own models), and restarts come with it too: a scrape reads
them all in the front, so ``/metrics`` covers every process without a second channel.

Triton's metric names are used where Triton has the metric (``nv_inference_*``, same
labels ``model`` and ``version``, counters without a ``_total`` suffix, as Triton
writes them); the rest are ``splitserve_*``. GPU metrics come from NVML and only where
a GPU and ``pynvml`` exist.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from splitserve.stats import (
    STAGE_BUCKETS_MS,
    STAGES,
    EngineStats,
    FrontStats,
    Histogram,
    ModelRequests,
    RequestStats,
)


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


class InferenceStats:
    """A front's per-model counters; used from its one event loop only. They live in
    ``counts`` (shared with the front's ``RequestStats``: see ``FrontCounters``)."""

    def __init__(self, counts: FrontStats | None = None) -> None:
        self.counts = FrontStats() if counts is None else counts
        self.models = self.counts.models
        self.stages = self.counts.stages
        for stage in STAGES.values():
            self.stages.setdefault(stage, Histogram())

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
            reason = failure_reason(status)
            counters.failures[reason] = counters.failures.get(reason, 0) + 1
            counters.fail_ns += elapsed_ns
        queue_ms = timings.get("front_queue_ms", 0.0) + timings.get("engine_queue_ms", 0.0)
        counters.queue_ns += int(queue_ms * 1e6)
        counters.compute_ns += int(timings.get("engine_compute_ms", 0.0) * 1e6)
        for key_ms, stage in STAGES.items():
            value = timings.get(key_ms)
            if value is not None:
                self.stages[stage].observe(value)


class FrontCounters:
    """Everything a front counts, in one ``FrontStats``: ``requests`` (answers by status
    and stage, for ``/v1/stats``) and ``models`` (per model, for v2 statistics and
    ``/metrics``). ``peers`` gives the latest counts of the server's other fronts (split
    mode: from the supervisor's state; nothing in threaded mode); every read goes
    through ``totals``, so whichever front a client reaches answers for the server.
    ``started``: when the server started (``/v1/stats`` uptime), not this front."""

    def __init__(
        self,
        index: int = 0,
        peers: Callable[[], list[FrontStats]] = list,
        started: float | None = None,
    ) -> None:
        self.counts = FrontStats(index)
        self.parts = [self.counts]  # whose counts these are (totals: every front's)
        self.requests = RequestStats(self.counts, started)
        self.models = InferenceStats(self.counts)
        self.peers = peers

    def report(self, pid: int) -> FrontStats:
        """What this front sends the supervisor (its live counts, encoded at once)."""
        self.counts.pid = pid
        return self.counts

    def totals(self) -> FrontCounters:
        """The whole server's counts: this front's and the other fronts' latest (a new
        object, to read only, when there are others)."""
        peers = self.peers()
        if not peers:
            return self
        total = FrontCounters(self.counts.index, started=self.requests.started)
        total.parts = [self.counts, *peers]
        for part in total.parts:
            total.counts.add(part)
        return total

    def by_front(self) -> dict[int, int]:
        """Requests answered by each front (its earlier runs included)."""
        answered: dict[int, int] = {}
        for part in self.parts:
            answered[part.index] = answered.get(part.index, 0) + part.answered
        return answered


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


class Exposition:
    """The Prometheus text format (0.0.4), written directly.

    prometheus-client's ``generate_latest`` costs ~35 µs per sample here (~7 ms for the
    ~200 samples of a small server, measured on the 2-core test machine): at a 10 Hz
    scrape that is 7% of a core in the front, which also serves every request. Written
    directly it is ~15x cheaper. It also keeps Triton's counter names exactly as Triton
    exposes them (no ``_total`` suffix added). Tests parse it with prometheus-client.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        self._line(name, _labels(labels), value)

    def _line(self, name: str, labels: str, value: float) -> None:
        if labels:
            self.lines.append(f"{name}{{{labels}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")

    def metric(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict, float]]
    ) -> None:
        self.family(name, kind, help_text)
        for labels, value in samples:
            self.sample(name, labels, value)

    def histogram(
        self,
        name: str,
        help_text: str,
        series: Iterable[tuple[dict, list[tuple[float, int]], float]],
    ) -> None:
        """``series``: (labels, [(upper bound, cumulative count)...ending at +Inf], sum)."""
        self.family(name, "histogram", help_text)
        for labels, buckets, total in series:
            base = _labels(labels)
            prefix = f"{base}," if base else ""
            for bound, count in buckets:
                self._line(f"{name}_bucket", f'{prefix}le="{_bound(bound)}"', count)
            self._line(f"{name}_sum", base, total)
            self._line(f"{name}_count", base, buckets[-1][1] if buckets else 0)

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value)) if value == value else "NaN"


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


BATCH_BOUNDS = (*(float(2**i) for i in range(11)), float("inf"))  # batch sizes 1 ... 1024


def render_metrics(
    counters: FrontCounters, dispatcher: Any, model_name: Callable[[str], str]
) -> bytes:
    """The whole exposition, from what the front holds (no call to another process):
    ``counters`` are the server's totals (``FrontCounters.totals``)."""
    stats, request_stats = counters.models, counters.requests
    out = Exposition()
    engines: list[EngineStats] = dispatcher.engine_stats()
    by_model: dict[str, list[Any]] = {}
    for engine in engines:
        for key, model in engine.models.items():
            by_model.setdefault(key, []).append(model)
    keys = sorted(set(stats.models) | set(by_model))
    rows = []  # (labels, requests as the front saw them, the engines' counters or None)
    for key in keys:
        labels = {"model": model_name(key), "version": "1"}
        rows.append((labels, stats.models.get(key, ModelRequests()), by_model.get(key)))

    def per_model(pick: Callable[[ModelRequests, list[Any] | None], float]) -> list:
        return [(labels, pick(requests, engine)) for labels, requests, engine in rows]

    out.metric(
        "nv_inference_request_success",
        "counter",
        "Successful inference requests",
        per_model(lambda r, e: r.success),
    )
    out.metric(
        "nv_inference_request_failure",
        "counter",
        "Failed inference requests, by reason",
        [
            ({**labels, "reason": reason}, n)
            for labels, requests, _ in rows
            for reason, n in sorted(requests.failures.items())
        ],
    )
    # Engine models: the engines' counters, which include the calls services make.
    out.metric(
        "nv_inference_count",
        "counter",
        "Inferences performed (rows for engine models, request elements for services)",
        per_model(lambda r, e: sum(m.rows for m in e) if e else r.inference_count),
    )
    out.metric(
        "nv_inference_exec_count",
        "counter",
        "Model executions (batches for engine models, requests for services)",
        per_model(lambda r, e: sum(m.batches for m in e) if e else r.execution_count),
    )
    out.metric(
        "nv_inference_request_duration_us",
        "counter",
        "Cumulative request duration (front to answer)",
        per_model(lambda r, e: (r.success_ns + r.fail_ns) / 1000),
    )
    out.metric(
        "nv_inference_queue_duration_us",
        "counter",
        "Cumulative queueing duration (front queue and engine queue)",
        per_model(lambda r, e: sum(m.queue_ms_sum for m in e) * 1000 if e else r.queue_ns / 1000),
    )
    out.metric(
        "nv_inference_compute_infer_duration_us",
        "counter",
        "Cumulative compute duration (in the engines)",
        per_model(lambda r, e: sum(m.busy_s for m in e) * 1e6 if e else r.compute_ns / 1000),
    )
    out.metric(
        "nv_inference_pending_request_count",
        "gauge",
        "Requests received and not answered yet",
        per_model(lambda r, e: r.pending),
    )
    out.histogram(
        "splitserve_batch_size",
        "Rows per batch, per engine model",
        [
            (
                {"model": model_name(key)},
                _cumulative(models),
                float(sum(s * n for m in models for s, n in m.batch_sizes.items())),
            )
            for key, models in sorted(by_model.items())
        ],
    )
    out.histogram(
        "splitserve_stage_duration_ms",
        "Time per stage of a request (front queue, CPU worker, awaiting engines, "
        "engine queue, engine compute)",
        [({"stage": stage}, _running(hist), hist.total) for stage, hist in stats.stages.items()],
    )
    out.metric(
        "splitserve_engine_busy_seconds_total",
        "counter",
        "Seconds each engine spent computing (its rate is the busy fraction)",
        [({"engine": str(e.index)}, e.busy_s) for e in engines],
    )
    by_status = request_stats.by_status
    out.metric(
        "splitserve_requests_total",
        "counter",
        "Answers by HTTP status (/v1 and /v2, gRPC as the equivalent status)",
        [({"status": status}, n) for status, n in sorted(by_status.items())],
    )
    out.metric(
        "splitserve_front_requests_total",
        "counter",
        "Answers by front process (split mode: --fronts processes share the port)",
        [({"front": str(index)}, n) for index, n in sorted(counters.by_front().items())],
    )
    out.metric(
        "splitserve_shed_requests_total",
        "counter",
        "Requests refused with 503 (could not be served in time, shutting down)",
        [({}, by_status.get("503", 0))],
    )
    out.metric(
        "splitserve_cancelled_requests_total",
        "counter",
        "Requests whose work was cancelled: deadline passed (504) or client gone (499)",
        [({}, by_status.get("504", 0) + by_status.get("499", 0))],
    )
    state = getattr(dispatcher, "state", None)
    out.metric(
        "splitserve_restarts_total",
        "counter",
        "Child processes restarted by the supervisor, by role",
        [
            ({"role": role}, n)
            for role, n in sorted((getattr(state, "restarts", None) or {}).items())
        ],
    )
    out.metric(
        "splitserve_shared_memory_bytes",
        "gauge",
        "Shared memory allocated by each engine's pool",
        [({"engine": str(e.index)}, e.shm_bytes) for e in engines],
    )
    _gpu_metrics(out)
    return out.text()


def _running(hist: Histogram) -> list[tuple[float, int]]:
    buckets = []
    running = 0
    for bound, n in zip((*STAGE_BUCKETS_MS, float("inf")), hist.counts, strict=True):
        running += n
        buckets.append((float(bound), running))
    return buckets


def _cumulative(models: list[Any]) -> list[tuple[float, int]]:
    sizes: Counter[int] = Counter()
    for model in models:
        sizes.update(model.batch_sizes)
    return [(bound, sum(n for s, n in sizes.items() if s <= bound)) for bound in BATCH_BOUNDS]


_nvml: list[Any] = []  # [pynvml] once initialised; [None] where there is no GPU


def _gpu_metrics(out: Exposition) -> None:
    """NVML utilisation and memory per GPU; nothing without a GPU or pynvml (tried once)."""
    if not _nvml:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml.append(pynvml)
        except Exception:
            _nvml.append(None)
    pynvml = _nvml[0]
    if pynvml is None:
        return
    try:
        count = pynvml.nvmlDeviceGetCount()
    except Exception:
        return
    utilisation, used, total = [], [], []
    for index in range(count):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        labels = {"gpu_uuid": str(pynvml.nvmlDeviceGetUUID(handle))}
        utilisation.append((labels, pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100))
        used.append((labels, memory.used))
        total.append((labels, memory.total))
    out.metric("nv_gpu_utilization", "gauge", "GPU utilization rate [0.0 - 1.0)", utilisation)
    out.metric("nv_gpu_memory_used_bytes", "gauge", "GPU used memory, in bytes", used)
    out.metric("nv_gpu_memory_total_bytes", "gauge", "GPU total memory, in bytes", total)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def metrics_route(counters: FrontCounters, dispatcher: Any) -> Any:
    """``GET /metrics``: the Prometheus text format, computed at each scrape."""
    from starlette.responses import Response
    from starlette.routing import Route

    def model_name(key: str) -> str:
        return key.replace("/", ".")  # "service/model" -> the v2 model "service.model"

    async def metrics(_: Any) -> Response:
        body = render_metrics(counters.totals(), dispatcher, model_name)
        return Response(body, media_type=CONTENT_TYPE)

    return Route("/metrics", metrics, methods=["GET"])
