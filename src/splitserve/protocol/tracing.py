"""OpenTelemetry traces of inference requests (``--trace``; the ``trace`` extra).

Off (the default), nothing imports OpenTelemetry and a request costs one check
(``recording``). On, in the process that speaks HTTP and gRPC (the front in split mode,
the process in threaded mode):

- each inference request (``POST /v1/services/{name}``, ``POST /v2/models/{name}/infer``,
  gRPC ``ModelInfer``) gets a SERVER span, the child of the client's W3C ``traceparent``
  (and ``tracestate``) when it sends one; its answer carries a ``traceparent`` naming
  that span (an HTTP header, gRPC initial metadata);
- each job the request becomes gets a ``dispatch`` span whose children are the stages
  the job went through wherever it ran, with their exact times: the wait for a worker
  slot (or thread), the CPU worker's job (preprocess and postprocess when the service
  keeps the default ``handle``), each engine call and, inside it, the engine's queue,
  compute slot and batch compute (``splitserve.replies.Stage``, returned in the
  replies of traced jobs only).

Only this process exports (OTLP over HTTP; ``BatchSpanProcessor``: a bounded queue in
memory, a thread that sends it, spans dropped rather than a request ever waiting). The
standard variables apply: ``OTEL_SERVICE_NAME`` (default "splitserve"),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_*``, ``OTEL_BSP_*``,
``OTEL_TRACES_SAMPLER`` (an unsampled request records nothing anywhere) and
``OTEL_PROPAGATORS`` (what is read from requests; answers are W3C trace context).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from splitserve.config import ServerConfig
from splitserve.replies import Reply, Stage

# What the extra brings: checked by `splitserve serve --trace` before any process starts.
REQUIRED_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
INSTALL_HINT = "pip install 'splitserve[trace]'"

# gRPC codes a server span counts as its own failure (OpenTelemetry's RPC conventions).
GRPC_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


class _OpenTelemetry:
    """The tracer, its exporter and the propagators: imported when tracing starts."""

    def __init__(self, endpoint: str | None) -> None:
        from opentelemetry import context, propagate, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from splitserve import __version__

        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "splitserve"}))
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(self.provider)  # a threaded service's own spans join in
        self.tracer = self.provider.get_tracer("splitserve", __version__)
        self.trace = trace
        self.context = context
        self.propagator = propagate.get_global_textmap()
        self.fields = frozenset(self.propagator.fields)  # the headers it reads
        self.answer = TraceContextTextMapPropagator()
        self.error = trace.Status(trace.StatusCode.ERROR)

    @contextlib.contextmanager
    def serve(
        self, name: str, carrier: Mapping[str, str], attributes: dict[str, Any]
    ) -> Iterator[Any]:
        """A SERVER span, the child of what ``carrier`` propagates, current while the
        request is handled (asyncio tasks it starts inherit it)."""
        parent = self.propagator.extract(carrier)
        kind = self.trace.SpanKind.SERVER
        span = self.tracer.start_span(name, parent, kind, attributes)
        token = self.context.attach(self.trace.set_span_in_context(span, parent))
        try:  # its status is the caller's: an HTTP status, a gRPC code
            yield span
        finally:
            self.context.detach(token)
            span.end()

    def naming(self, span: Any) -> dict[str, str]:
        """The W3C headers that name ``span``: ``traceparent`` (and ``tracestate``)."""
        carrier: dict[str, str] = {}
        self.answer.inject(carrier, self.trace.set_span_in_context(span))
        return carrier

    def emit(self, stage: Stage) -> None:
        """``stage`` and the stages within it as spans under the current span."""
        offset = time.time_ns() - time.monotonic_ns()  # wall clock = monotonic + offset
        self._emit(stage, self.context.get_current(), offset)

    def _emit(self, stage: Stage, parent: Any, offset: int) -> None:
        start = offset + round(stage.start * 1e9)
        span = self.tracer.start_span(
            stage.name, parent, attributes=stage.attributes, start_time=start
        )
        if "error.type" in stage.attributes:
            span.set_status(self.error)
        inner = self.trace.set_span_in_context(span, parent)
        for child in stage.children:
            self._emit(child, inner, offset)
        span.end(end_time=offset + round(stage.end * 1e9))


_otel: _OpenTelemetry | None = None  # set by ``start``: None while tracing is off


def missing_modules() -> list[str]:
    """The modules of the ``trace`` extra that are not installed."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def endpoint(setting: str) -> str | None:
    """The OTLP/HTTP traces URL of ``--trace``: None for ``on`` (the exporter reads the
    OTEL_EXPORTER_OTLP_* variables), else the URL with ``/v1/traces`` when it has none."""
    if setting == "on":
        return None
    base = setting.rstrip("/")
    return base if base.endswith("/v1/traces") else base + "/v1/traces"


def start(cfg: ServerConfig) -> None:
    """Start tracing in this process when ``cfg.trace`` asks for it (once)."""
    global _otel
    if cfg.trace == "off" or _otel is not None:
        return
    _otel = _OpenTelemetry(endpoint(cfg.trace))
    atexit.register(stop)


def stop(timeout_s: float = 5.0) -> None:
    """Send what is queued and stop, waiting at most ``timeout_s`` for the collector."""
    if _otel is None:
        return
    flush = threading.Thread(target=_otel.provider.shutdown, name="trace-flush", daemon=True)
    flush.start()
    flush.join(timeout_s)


def enabled() -> bool:
    return _otel is not None


def recording() -> bool:
    """Whether the request being handled is traced (tracing on, and the request sampled):
    only then do its jobs ask the other processes for their stages."""
    return _otel is not None and _otel.trace.get_current_span().is_recording()


def record_dispatch(
    service: str,
    model: str,
    arrived: float,
    reply: Reply,
    started: float | None = None,
    where: Mapping[str, str | int | float] | None = None,
) -> None:
    """One job of the current request as a ``dispatch`` span: the wait for a slot
    (``arrived`` to ``started``, the job's start by default) and the reply's stages;
    ``where`` adds attributes (which worker ran it)."""
    if _otel is None:
        return
    if started is None:
        started = reply.stages[0].start if reply.stages else arrived
    attributes = {"splitserve.service": service, "splitserve.status": reply.status, **(where or {})}
    if model:
        attributes["splitserve.model"] = model
    if reply.status >= 500:
        attributes["error.type"] = str(reply.status)
    queue = Stage("queue", arrived, started)
    _otel.emit(Stage("dispatch", arrived, time.monotonic(), attributes, [queue, *reply.stages]))


def inference_route(path: str) -> str | None:
    """The route template of an inference request's path, None for other paths."""
    parts = path.split("/")
    if len(parts) == 4 and parts[1:3] == ["v1", "services"] and parts[3]:
        return "/v1/services/{name}"
    if parts[1:3] == ["v2", "models"] and parts[-1] == "infer" and parts[3]:
        if len(parts) == 5:
            return "/v2/models/{name}/infer"
        if len(parts) == 7 and parts[4] == "versions":
            return "/v2/models/{name}/versions/{version}/infer"
    return None


class HttpTracing:
    """ASGI middleware: a SERVER span per inference request (other routes pass through),
    its ``traceparent`` answered in the response headers."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        otel = _otel
        route = None
        if otel is not None and scope["type"] == "http" and scope["method"] == "POST":
            route = inference_route(scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        assert otel is not None
        carrier = {
            name: value.decode("latin-1")
            for key, value in scope["headers"]
            if (name := key.decode("latin-1")) in otel.fields
        }
        attributes = {
            "http.request.method": "POST",
            "http.route": route,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
        }
        with otel.serve(f"POST {route}", carrier, attributes) as span:
            naming = otel.naming(span).items()
            answer = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in naming]

            async def send_traced(message: Any) -> None:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_attribute("error.type", str(status))
                        span.set_status(otel.error)
                    message = {**message, "headers": [*message.get("headers", ()), *answer]}
                await send(message)

            await self.app(scope, receive, send_traced)


def traced_rpc(
    method: str, handler: Callable[[Any, Any], Awaitable[Any]]
) -> Callable[[Any, Any], Awaitable[Any]]:
    """A unary gRPC handler with a SERVER span (``method``: "package.Service/Method"),
    its ``traceparent`` answered in the initial metadata."""
    otel = _otel
    assert otel is not None, "tracing is off"
    service, _, name = method.rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

    async def traced(request: Any, context: Any) -> Any:
        metadata = context.invocation_metadata() or ()
        carrier = {k: v for k, v in metadata if k in otel.fields and isinstance(v, str)}
        with otel.serve(method, carrier, attributes) as span:
            await context.send_initial_metadata(tuple(otel.naming(span).items()))
            failed = True
            try:
                response = await handler(request, context)
                failed = False
                return response
            finally:
                code = context.code()
                span.set_attribute("rpc.grpc.status_code", code.value[0] if code else 0)
                if (code is not None and code.name in GRPC_SERVER_ERRORS) or (
                    failed and code is None
                ):
                    span.set_status(otel.error)

    return traced
