"""The HTTP surface, identical in split and threaded mode.

Routes:
- ``POST /v1/services/{name}``: the body is the request (raw image bytes, or JSON); the
  answer is the service's result as JSON (or bytes).
- ``GET /v1/services``: the served services and their models.
- ``GET /v1/stats``: cumulative counters (requests, per-stage times, batches, engine
  busy time) for load generators; see splitserve/stats.py.
- ``GET /health/live``: the process answers. ``GET /health/ready``: every engine has
  loaded and warmed up, and at least one CPU worker is ready (503 until then).
- ``/v2/...``: the Open Inference Protocol (protocol/v2.py); ``GET /metrics``:
  Prometheus (protocol/metrics.py).

With ``--trace``, inference requests are traced (protocol/tracing.py).

The front does no user work: it checks the route and the body size, stamps a deadline
and hands the request to a ``Dispatcher``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import time
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from splitserve.config import ServerConfig
from splitserve.errors import BadRequest, NotFound, ServiceError, Unauthorized
from splitserve.protocol import tracing
from splitserve.protocol.body import read_body, request_headers
from splitserve.protocol.grpc_server import with_grpc
from splitserve.protocol.metrics import FrontCounters, metrics_route
from splitserve.protocol.v2 import v2_routes
from splitserve.protocol.watch import watched
from splitserve.replies import TIMINGS_HEADER, Reply, error_reply, timings_header
from splitserve.stats import EngineStats, FrontStats

log = logging.getLogger("splitserve.front")


# A client's own deadline for one request, in seconds; it may only shorten the server's
# ``--request-timeout``.
TIMEOUT_HEADER = "x-request-timeout"


class Dispatcher(Protocol):
    """Runs a service on a request somewhere (worker processes, or request threads)."""

    mode: str
    draining: bool

    def ready(self) -> bool: ...

    def engine_stats(self) -> list[EngineStats]: ...

    def peer_stats(self) -> list[FrontStats]:
        """The latest counts of the server's other fronts (none in threaded mode)."""

    def begin_drain(self) -> None:
        """Refuse new requests (503) and turn readiness off; admitted ones go on."""

    def in_flight(self) -> int:
        """Requests admitted and not answered yet."""

    async def dispatch(
        self,
        service: str,
        body: bytes,
        content_type: str,
        headers: dict[str, str],
        deadline: float,
        model: str = "",
    ) -> Reply:
        """The reply to one request. With ``model`` set, the body is a tensor bundle
        (splitserve.tensors) for that engine model of the service, and so is the reply."""


def request_deadline(headers: Any, cfg: ServerConfig, now: float) -> float:
    """The server's deadline, or the client's ``X-Request-Timeout`` when sooner."""
    timeout = cfg.request_timeout_s
    asked = headers.get(TIMEOUT_HEADER)
    if asked is not None:
        try:
            seconds = float(asked)
        except ValueError:
            seconds = float("nan")
        if not seconds > 0:  # also refuses NaN
            raise BadRequest(f"{TIMEOUT_HEADER} must be a positive number of seconds")
        timeout = min(timeout, seconds)
    return now + timeout


async def dispatch_watched(
    request: HttpRequest, dispatcher: Dispatcher, *args: Any, **kwargs: Any
) -> Reply:
    """``dispatcher.dispatch``, cancelled (with the work it started) if the client leaves."""
    return await watched(request, dispatcher.dispatch(*args, **kwargs))


class BearerAuth:
    """ASGI middleware: every HTTP route but liveness needs ``Authorization: Bearer``.

    Liveness stays open so that orchestrators' probes need no secret; the token is
    compared in constant time.
    """

    OPEN_PATHS = frozenset({"/health/live", "/v2/health/live"})

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                reply = error_reply(Unauthorized("missing or wrong bearer token"))
                await _response(reply)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _response(reply: Reply) -> Response:
    headers = reply.headers
    if reply.timings:  # where the time went, per stage (ms), for benchmarks and debugging
        headers = {**headers, TIMINGS_HEADER: timings_header(reply.timings)}
    return Response(reply.body, reply.status, headers=headers, media_type=reply.content_type)


def create_app(
    dispatcher: Dispatcher,
    cfg: ServerConfig,
    catalogue: dict[str, dict[str, Any]],
    lifespan: Any = None,
    counters: FrontCounters | None = None,
) -> Starlette:
    """The ASGI app; ``catalogue`` maps service names to a description of their models;
    ``counters``: where it counts what it answers (default: new ones)."""

    tracing.start(cfg)  # when --trace asks for it
    if counters is None:
        counters = FrontCounters(peers=dispatcher.peer_stats)
    request_stats, inference_stats = counters.requests, counters.models

    async def post_service(request: HttpRequest) -> Response:
        name = request.path_params["name"]
        started = inference_stats.started(name) if name in catalogue else 0.0
        try:
            if name not in catalogue:
                raise NotFound(f"no service named {name!r}; served: {sorted(catalogue)}")
            headers = request_headers(request)
            deadline = request_deadline(headers, cfg, time.monotonic())
            body = await read_body(request, headers, cfg.max_body_bytes)
            content_type = headers.get("content-type", "application/octet-stream")
            reply = await dispatch_watched(
                request, dispatcher, name, body, content_type, headers, deadline
            )
        except ServiceError as exc:
            reply = error_reply(exc)
        request_stats.record(reply.status, reply.timings)
        if name in catalogue:
            inference_stats.finished(name, started, reply.status, reply.timings)
        return _response(reply)

    async def stats(_: HttpRequest) -> Response:
        totals = counters.totals().requests
        return JSONResponse(totals.snapshot(dispatcher.mode, dispatcher.engine_stats()))

    async def services(_: HttpRequest) -> Response:
        return JSONResponse({"services": catalogue})

    async def live(_: HttpRequest) -> Response:
        return JSONResponse({"status": "live"})

    async def ready(_: HttpRequest) -> Response:
        if dispatcher.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    # Starlette tries the routes in order: the inference routes come first.
    routes = [
        Route("/v1/services/{name}", post_service, methods=["POST"]),
        *v2_routes(dispatcher, cfg, catalogue, counters),
        Route("/v1/services", services, methods=["GET"]),
        Route("/v1/stats", stats, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        metrics_route(counters, dispatcher),
    ]
    lifespan = with_grpc(lifespan, dispatcher, cfg, catalogue, counters)
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _routing_error}
    )
    app.router.redirect_slashes = False  # `POST /v1/services/` is a 404, not a redirect
    traced = tracing.HttpTracing(app) if tracing.enabled() else app
    return BearerAuth(traced, cfg.auth_token) if cfg.auth_token else traced


async def _routing_error(_: HttpRequest, exc: Exception) -> Response:
    """Starlette's own 404 (no such path) and 405 (wrong method) as our JSON errors."""
    assert isinstance(exc, HTTPException)
    kinds = {404: "not_found", 405: "method_not_allowed"}
    error = ServiceError(exc.detail, status=exc.status_code, kind=kinds.get(exc.status_code))
    reply = error_reply(error)
    reply.headers.update(exc.headers or {})  # 405: Allow
    return _response(reply)


def listening_socket(host: str, port: int) -> socket.socket:
    """The HTTP port, bound with SO_REUSEPORT so that several processes (split mode's
    fronts) listen on it together and the kernel spreads the connections among them.
    Only processes of the same user can join (Linux); the command line checks that
    nothing else listens there before the server starts (``check_port_free``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=True)
    except OSError as exc:
        raise SystemExit(f"splitserve: cannot listen on {host}:{port}: {exc.strerror}") from None


def serve_app(
    app: Any, cfg: ServerConfig, dispatcher: Dispatcher, reuse_port: bool = False
) -> None:
    """Run the app on uvicorn (uvloop and httptools when installed) until SIGTERM/SIGINT,
    then drain: readiness 503 and new requests refused at once, admitted requests
    answered (for at most ``cfg.drain_timeout_s``), then exit. A second signal exits
    at once. ``reuse_port``: share the port with other processes (``listening_socket``)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def serve(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if dispatcher.draining or self.should_exit:
                super().handle_exit(sig, frame)
                self.force_exit = True
                return
            self._captured_signals.append(sig)
            dispatcher.begin_drain()
            log.info("draining: %d requests in flight", dispatcher.in_flight())
            # From a signal handler: hand the task to the loop the thread-safe way.
            self.loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            self.drain_task = self.loop.create_task(self.drain())

        async def drain(self) -> None:
            end = time.monotonic() + cfg.drain_timeout_s
            while dispatcher.in_flight() and time.monotonic() < end:
                await asyncio.sleep(0.02)
            if dispatcher.in_flight():
                log.warning("drain timeout: %d requests still in flight", dispatcher.in_flight())
            self.should_exit = True

    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    sockets = [listening_socket(cfg.host, cfg.port)] if reuse_port else None
    DrainingServer(config).run(sockets)
