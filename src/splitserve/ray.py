"""A splitserve service on Ray Serve: the CPU stage and the engine stage as two deployments.

    from splitserve.ray import Stage, build_app
    app = build_app("examples.ocr.service:OCRService",
                    cpu=Stage(replicas=4, num_cpus=1),
                    engines=Stage(replicas=1, num_cpus=1, num_gpus=1))
    serve.run(app, route_prefix="/")

or, for a private single-node Ray on this machine (everything on 127.0.0.1):

    python -m splitserve.ray examples.ocr.service:OCRService --port 8000

The same ``Service`` class as ``splitserve serve``, unchanged. The CPU stage (ingress)
runs the service's ``setup`` and ``handle`` on its replica's event loop, as a CPU worker
does; each ``infer`` is a call through a Ray Serve handle to the engine stage, whose
replicas load the models with splitserve's engines and batch the calls of every CPU
replica with splitserve's ``Batcher`` (one thread per model runs the batches). Tensors
travel as Ray arguments and results: numpy arrays are serialised out of band, through
Ray's object store when large. Ray's scheduler places the stages by their resources
(``num_cpus``, ``num_gpus``, custom ``resources``), so CPU and GPU work can live on
different nodes; each stage has its own replicas or autoscaling config.

Routes of the CPU stage: ``POST /v1/services/{name}`` (answers as splitserve's) and
``GET /health/live``, ``/health/ready``. Engine builds (``precision`` other than fp32,
TensorRT) are not made here: the engine stage serves fp32 model files only, and says so.

Ray is an optional extra (``pip install 'splitserve[ray]'``), imported only in this module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitserve.engines.base import Engine, create_engine
from splitserve.errors import (
    DeadlineExceeded,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    Unavailable,
    error_status_and_kind,
)
from splitserve.layout import Declaration, resolve
from splitserve.replies import TIMINGS_HEADER, Reply, error_reply
from splitserve.replies import timings_header as format_timings
from splitserve.runtime.batcher import Batcher, PendingRequest
from splitserve.runtime.invoke import invoke_service
from splitserve.service import DEFAULT_MAX_IMAGE_PIXELS, Request, Tensors, load_service
from splitserve.spec import ModelKey, ModelSpec

log = logging.getLogger("splitserve.ray")

ROUTE_PREFIX = "/v1/services/"
# Ray Serve's own per-request logs are off, as splitserve logs no request either.
SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}


@dataclass(frozen=True)
class Stage:
    """Resources and scaling of one stage (a Ray Serve deployment).

    ``replicas`` is a fixed count, or ``autoscaling`` a Ray Serve autoscaling config
    (``{"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 2}``) that
    replaces it. ``max_ongoing_requests`` bounds the calls one replica holds: for the
    CPU stage, the jobs a worker interleaves; for the engine stage, the calls waiting in
    its batchers (keep it above ``max_batch_size`` so batches can fill).
    """

    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)
    autoscaling: Mapping[str, Any] | None = None
    max_ongoing_requests: int = 8

    def deployment_options(self, name: str) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            actor["resources"] = dict(self.resources)
        options: dict[str, Any] = {
            "name": name,
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests,
            "logging_config": SERVE_LOGGING,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = dict(self.autoscaling)
        else:
            options["num_replicas"] = self.replicas
        return options


@dataclass
class EngineReply:
    """The engine stage's answer to one call: outputs, or an error with its status."""

    outputs: dict[str, np.ndarray] | None
    error: str = ""
    error_status: int = 0
    queue_ms: float = 0.0
    infer_ms: float = 0.0
    batch_size: int = 0
    node_id: str = ""


def bind_loopback_only() -> None:
    """In a replica: bind Serve's inter-deployment gRPC server to 127.0.0.1, not ``[::]``.

    Ray Serve 2.60 starts that server on every interface with no setting for it
    (``ray/serve/_private/replica.py``). For a cluster whose nodes are all on this
    machine; on a real cluster the nodes' addresses must be reachable, so leave it.
    """
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "loopback_only", False):
        return

    def loopback(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.removeprefix("[::]:")
        return bind(server, address)

    loopback.loopback_only = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = loopback


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class ModelBatches(threading.Thread):
    """One model's batcher and the thread that runs its batches (as in an engine process)."""

    def __init__(self, key: str, model: ModelSpec, engine: Engine) -> None:
        super().__init__(name=f"model:{key}", daemon=True)
        self.key = key
        self.engine = engine
        own_limit = engine.max_batch_size
        self.batcher = Batcher(
            min(model.max_batch_size, own_limit) if own_limit else model.max_batch_size,
            model.max_delay_ms / 1000.0,
            model.pad_axes,
            model.pad_value,
            pad_bucket=model.pad_bucket,
        )
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()
        self.batcher.close()

    def run(self) -> None:
        node = _node_id()
        while not self._stop.is_set():
            batch, expired = self.batcher.next_batch(timeout=0.5)
            for req in expired:
                _answer(req, _error(DeadlineExceeded("deadline passed in the engine queue")))
            if batch is None:
                continue
            started = time.monotonic()
            try:
                outputs = self.engine.run_batch(batch.inputs)
                finished = time.monotonic()
                done = batch.complete(outputs)
            except Exception as exc:
                log.exception("%s: inference failed on a batch of %d", self.key, batch.size)
                for req in batch.fail():
                    _answer(req, _error(exc))
                continue
            infer_ms = (finished - started) * 1000
            for req in done:
                queue_ms = (batch.formed - req.arrived) * 1000
                _answer(req, EngineReply(req.outputs, "", 0, queue_ms, infer_ms, batch.size, node))


def _error(exc: BaseException) -> EngineReply:
    status, _, message = error_status_and_kind(exc)
    return EngineReply(None, message, status)


def _answer(req: PendingRequest, reply: EngineReply) -> None:
    """Resolve a call's future on the event loop that awaits it (from a model thread)."""
    loop, future = req.key

    def resolve() -> None:
        if not future.done():
            future.set_result(reply)

    with contextlib.suppress(RuntimeError):  # the loop is closed: the replica is stopping
        loop.call_soon_threadsafe(resolve)


class EngineStage:
    """A replica of the engine stage: every model of the service, loaded and warmed up."""

    def __init__(self, service: str, engine_threads: int | None, loopback_only: bool) -> None:
        if loopback_only:
            bind_loopback_only()  # the replica starts that server after this returns
        cls = load_service(service)
        self.models: dict[str, ModelBatches] = {}
        for name, model in cls.declared_models().items():
            if model.needs_build:
                raise ValueError(
                    f"{cls.__name__}.{name}: precision={model.precision!r} / backend="
                    f"{model.backend!r} needs `splitserve build`; the Ray engine stage "
                    "serves fp32 model files only"
                )
            key = ModelKey(cls.service_name(), name)
            spec = resolve(Declaration(key, cls, model), None, engine_threads)
            engine = create_engine(spec)
            with contextlib.suppress(Exception):  # strict shapes: the first call warms it
                engine.run_batch(engine.warmup_batch())
            self.models[name] = ModelBatches(str(key), spec, engine)
            self.models[name].start()

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], timeout_s: float
    ) -> EngineReply:
        """Queue one call in the model's batcher; the reply comes when its batch ran."""
        batches = self.models.get(model)
        try:
            if batches is None:
                raise NotFound(f"the service declares no model {model!r}")
            batches.engine.check_inputs(inputs)
            future = asyncio.get_running_loop().create_future()
            key = (asyncio.get_running_loop(), future)
            batches.batcher.submit(PendingRequest(key, inputs, time.monotonic() + timeout_s))
        except Exception as exc:
            return _error(exc)
        return await future

    def __del__(self) -> None:
        for batches in getattr(self, "models", {}).values():
            batches.stop()


class ServiceStage:
    """A replica of the CPU stage (the ingress): the service's own code, as a CPU worker."""

    def __init__(
        self,
        service: str,
        engines: Any,
        *,
        max_image_pixels: int,
        max_body_bytes: int,
        request_timeout_s: float,
        loopback_only: bool,
    ) -> None:
        if loopback_only:
            bind_loopback_only()
        cls = load_service(service)
        self.name = cls.service_name()
        self.service = cls()
        self.service.setup()
        if "cv2" in sys.modules:  # numerics stay single-threaded, as in a CPU worker
            sys.modules["cv2"].setNumThreads(1)
        self.engines = engines
        self.max_image_pixels = max_image_pixels
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s

    async def __call__(self, http: Any) -> Any:
        from starlette.responses import JSONResponse, Response

        path = http.url.path
        if http.method == "GET" and path in ("/health/live", "/health/ready"):
            return JSONResponse({"status": "ok", "node_id": _node_id()})
        if http.method != "POST" or path != ROUTE_PREFIX + self.name:
            reply = error_reply(NotFound(f"no route {http.method} {path}"))
        else:
            body = await http.body()
            headers = dict(http.headers)
            content_type = headers.get("content-type", "application/octet-stream")
            reply = await self.answer(body, content_type, headers)
        headers = dict(reply.headers)
        if reply.timings:
            headers[TIMINGS_HEADER] = format_timings(reply.timings)
        return Response(
            reply.body, status_code=reply.status, media_type=reply.content_type, headers=headers
        )

    async def answer(
        self, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> Reply:
        """The service's reply to one request body (also callable through a handle)."""
        if len(body) > self.max_body_bytes:
            return error_reply(
                PayloadTooLarge(f"body of {len(body)} bytes is above {self.max_body_bytes}")
            )
        started = time.monotonic()
        deadline = started + self.request_timeout_s
        timings: dict[str, float] = {}

        async def infer(model: str, inputs: Mapping[str, np.ndarray]) -> Tensors:
            return await self._infer(model, inputs, deadline, timings)

        request = Request(body, content_type, headers, self.max_image_pixels)
        try:
            reply = await asyncio.wait_for(
                invoke_service(self.service, request, infer), self.request_timeout_s
            )
        except TimeoutError:
            reply = error_reply(DeadlineExceeded(f"no answer within {self.request_timeout_s}s"))
        reply.timings = {**timings, "worker_ms": (time.monotonic() - started) * 1000}
        return reply

    async def _infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        deadline: float,
        timings: dict[str, float],
    ) -> Tensors:
        from ray.exceptions import RayActorError

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"the deadline passed before {model} ran")
        started = time.monotonic()
        try:
            reply: EngineReply = await self.engines.infer.remote(model, dict(inputs), remaining)
        except RayActorError:
            raise Unavailable(f"the engine replica serving {model} died; retry") from None
        if reply.error:
            raise ServiceError(f"{self.name}/{model}: {reply.error}", status=reply.error_status)
        assert reply.outputs is not None
        for name, value in (
            ("infer_calls", 1),
            ("infer_wait_ms", (time.monotonic() - started) * 1000),
            ("engine_queue_ms", reply.queue_ms),
            ("engine_compute_ms", reply.infer_ms),
            ("engine_batch_rows", reply.batch_size),
        ):
            timings[name] = timings.get(name, 0) + value
        return reply.outputs

    def node_id(self) -> str:
        return _node_id()


def build_app(
    service: str,
    *,
    cpu: Stage | None = None,
    engines: Stage | None = None,
    engine_threads: int | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_body_bytes: int = 32 * 1024 * 1024,
    request_timeout_s: float = 30.0,
    loopback_only: bool = False,
) -> Any:
    """The Ray Serve application of ``service`` (``module:Class``): CPU stage -> engines.

    The class is named, not passed, so every replica imports it itself (the module must
    be importable on every node). ``loopback_only`` is for clusters whose nodes are all
    on this machine (see ``bind_loopback_only``).
    """
    from ray import serve

    name = load_service(service).service_name()
    cpu = cpu or Stage(replicas=2, max_ongoing_requests=4)
    engines = engines or Stage(replicas=1, max_ongoing_requests=64)
    engine_app = serve.deployment(EngineStage, **engines.deployment_options(f"{name}-engines"))
    cpu_app = serve.deployment(ServiceStage, **cpu.deployment_options(f"{name}-cpu"))
    return cpu_app.bind(
        service,
        engine_app.bind(service, engine_threads, loopback_only),
        max_image_pixels=max_image_pixels,
        max_body_bytes=max_body_bytes,
        request_timeout_s=request_timeout_s,
        loopback_only=loopback_only,
    )


def local_ray_env() -> None:
    """Before ``import ray``: keep a local Ray's node address at 127.0.0.1.

    Ray 2.x on Linux turns ``_node_ip_address="127.0.0.1"`` into the machine's outbound
    address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its single-machine mode).
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main(argv: list[str] | None = None) -> int:
    """Serve one service on a private single-node Ray, everything on 127.0.0.1."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("service", help="module:Class")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cpu-replicas", type=int, default=2)
    parser.add_argument("--cpu-concurrency", type=int, default=4, help="jobs per CPU replica")
    parser.add_argument("--engine-replicas", type=int, default=1)
    parser.add_argument("--engine-threads", type=int, default=None)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="Ray's CPUs")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    parser.add_argument("--temp-dir", default=None, help="Ray's session folder (absolute)")
    args = parser.parse_args(argv)

    local_ray_env()
    import ray
    from ray import serve

    stop = threading.Event()
    try:
        ray.init(
            address="local",
            include_dashboard=False,
            num_cpus=args.num_cpus,
            object_store_memory=200 << 20,
            _node_ip_address="127.0.0.1",
            _temp_dir=args.temp_dir,
            log_to_driver=False,
        )
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own
            signal.signal(sig, lambda *_: stop.set())
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": "127.0.0.1", "port": args.port},
            logging_config=SERVE_LOGGING,
        )
        # Fractional CPUs: Ray schedules by them, the OS shares the cores anyway.
        share = args.num_cpus / (args.cpu_replicas + args.engine_replicas)
        app = build_app(
            args.service,
            cpu=Stage(args.cpu_replicas, share, max_ongoing_requests=args.cpu_concurrency),
            engines=Stage(args.engine_replicas, share, max_ongoing_requests=64),
            engine_threads=args.engine_threads,
            max_image_pixels=args.max_image_pixels,
            request_timeout_s=args.request_timeout,
            loopback_only=True,
        )
        serve.run(app, route_prefix="/", logging_config=SERVE_LOGGING)
        print(f"ray serve ready on http://127.0.0.1:{args.port}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    return 0


if __name__ == "__main__":
    # Run under the importable name, so Ray pickles the classes by reference.
    from splitserve import ray as splitserve_ray

    sys.exit(splitserve_ray.main())
