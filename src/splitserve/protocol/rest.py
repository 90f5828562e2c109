"""The HTTP surface, identical in split and threaded mode.

Routes:
- ``POST /v1/services/{name}``: the body is the request (raw image bytes, or JSON); the
  answer is the service's result as JSON (or bytes).
- ``GET /v1/services``: the served services and their models.
- ``GET /v1/stats``: cumulative counters (requests, per-stage times, batches, engine
  busy time) for load generators; see runtime/stats.py.
- ``GET /health/live``: the process answers. ``GET /health/ready``: every engine has
  loaded and warmed up, and at least one CPU worker is ready (503 until then).
- ``/v2/...``: the Open Inference Protocol (protocol/v2.py); ``GET /metrics``:
  Prometheus (protocol/metrics.py).

The front does no user work: it checks the route and the body size, stamps a deadline
and hands the request to a ``Dispatcher``.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from splitserve.config import ServerConfig
from splitserve.errors import BadRequest, NotFound, PayloadTooLarge, ServiceError
from splitserve.protocol.grpc_server import with_grpc
from splitserve.protocol.metrics import InferenceStats, metrics_route
from splitserve.protocol.v2 import v2_routes
from splitserve.runtime.invoke import TIMINGS_HEADER, Reply, error_reply, timings_header
from splitserve.runtime.messages import EngineStats
from splitserve.runtime.stats import RequestStats


class Dispatcher(Protocol):
    """Runs a service on a request somewhere (worker processes, or request threads)."""

    mode: str

    def ready(self) -> bool: ...

    def engine_stats(self) -> list[EngineStats]: ...

    async def dispatch(
        self, service: str, body: bytes, content_type: str, headers: dict[str, str], deadline: float
    ) -> Reply: ...


def _response(reply: Reply) -> Response:
    headers = reply.headers
    if reply.timings:  # where the time went, per stage (ms), for benchmarks and debugging
        headers = {**headers, TIMINGS_HEADER: timings_header(reply.timings)}
    return Response(reply.body, reply.status, headers=headers, media_type=reply.content_type)


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLarge(f"body of {declared} bytes is above the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body is above the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("client disconnected while sending the body") from None
    return b"".join(chunks)


def create_app(
    dispatcher: Dispatcher,
    cfg: ServerConfig,
    catalogue: dict[str, dict[str, Any]],
    lifespan: Any = None,
) -> Starlette:
    """The ASGI app; ``catalogue`` maps service names to a description of their models."""

    request_stats = RequestStats()
    inference_stats = InferenceStats()  # per model, for /v2 statistics and /metrics

    async def infer(request: HttpRequest) -> Response:
        name = request.path_params["name"]
        started = inference_stats.started(name) if name in catalogue else 0.0
        try:
            if name not in catalogue:
                raise NotFound(f"no service named {name!r}; served: {sorted(catalogue)}")
            body = await read_body(request, cfg.max_body_bytes)
            deadline = time.monotonic() + cfg.request_timeout_s
            content_type = request.headers.get("content-type", "application/octet-stream")
            reply = await dispatcher.dispatch(
                name, body, content_type, dict(request.headers), deadline
            )
        except ServiceError as exc:
            reply = error_reply(exc)
        request_stats.record(reply.status, reply.timings)
        if name in catalogue:
            inference_stats.finished(name, started, reply.status, reply.timings)
        return _response(reply)

    async def stats(_: HttpRequest) -> Response:
        return JSONResponse(request_stats.snapshot(dispatcher.mode, dispatcher.engine_stats()))

    async def services(_: HttpRequest) -> Response:
        return JSONResponse({"services": catalogue})

    async def live(_: HttpRequest) -> Response:
        return JSONResponse({"status": "live"})

    async def ready(_: HttpRequest) -> Response:
        if dispatcher.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    routes = [
        Route("/v1/services/{name}", infer, methods=["POST"]),
        Route("/v1/services", services, methods=["GET"]),
        Route("/v1/stats", stats, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        *v2_routes(dispatcher, cfg, catalogue, inference_stats, request_stats),
        metrics_route(inference_stats, request_stats, dispatcher),
    ]
    lifespan = with_grpc(lifespan, dispatcher, cfg, catalogue, inference_stats, request_stats)
    return Starlette(routes=routes, lifespan=lifespan)


def describe_services(classes: dict) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "models": {
                m: {
                    "backend": model.backend,
                    "max_batch_size": model.max_batch_size,
                    "max_delay_ms": model.max_delay_ms,
                }
                for m, model in cls.declared_models().items()
            }
        }
        for name, cls in classes.items()
    }


def serve_app(app: Starlette, cfg: ServerConfig) -> None:
    """Run the app on uvicorn (uvloop and httptools when installed)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()
