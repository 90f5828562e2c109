"""Open Inference Protocol v2 over gRPC: ``inference.GRPCInferenceService``.

The same models and semantics as protocol/v2.py (the same ``ModelRegistry``), served by
a grpcio asyncio server on ``--grpc-port`` (off by default) inside the HTTP server's
event loop: the front process in split mode, the process in threaded mode. Outputs are
always answered as raw contents; inputs may be raw or typed contents. Besides KServe's
RPCs, Triton's ``ModelConfig`` and ``ModelStatistics`` are served (reduced messages,
see grpc_v2/inference.proto), since tritonclient calls them.

The messages are generated from grpc_v2/inference.proto and committed (``make protos``
regenerates them): the server needs only the protobuf runtime, not the code generator.
The service handlers are registered generically, so no ``_pb2_grpc`` module is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np

from splitserve.config import ServerConfig
from splitserve.errors import BadRequest, ServiceError, Unauthorized, error_status_and_kind
from splitserve.protocol import datatypes, tracing
from splitserve.protocol.grpc_v2 import inference_pb2 as pb
from splitserve.protocol.metrics import FrontCounters, model_statistics
from splitserve.protocol.models import (
    VERSION,
    ModelEntry,
    ModelRegistry,
    inference_count,
    model_config,
    model_metadata,
    select_outputs,
)
from splitserve.protocol.v2 import content_type_parameter, request_deadline, server_metadata

log = logging.getLogger("splitserve.grpc")

SERVICE = "inference.GRPCInferenceService"

# HTTP statuses of splitserve's errors -> gRPC status codes.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# Typed contents field of each datatype (FP16 and BF16: raw contents only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(parameter: Any) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


def _status_code(status: int) -> grpc.StatusCode:
    if status in STATUS_CODES:
        return STATUS_CODES[status]
    return grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT


def decode_input(tensor: Any, raw: bytes | None) -> np.ndarray:
    shape = list(tensor.shape)
    if raw is not None:
        return datatypes.from_raw(tensor.name, tensor.datatype, shape, raw)
    field = CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:
        datatypes.numpy_dtype(tensor.datatype)  # unknown names fail here with the list
        raise BadRequest(f"input {tensor.name!r}: {tensor.datatype} needs raw_input_contents")
    values = list(getattr(tensor.contents, field))
    if tensor.datatype == "BYTES":
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        if arr.size != int(np.prod(shape)):
            raise BadRequest(f"input {tensor.name!r}: {arr.size} values for shape {shape}")
        return arr.reshape(shape)
    return datatypes.from_json(tensor.name, tensor.datatype, shape, values)


def decode_inputs(request: Any) -> dict[str, np.ndarray]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give one per input"
        )
    if not request.inputs:
        raise BadRequest("the inference request has no inputs")
    tensors: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in tensors:
            raise BadRequest(f"input {tensor.name!r} is given twice")
        tensors[tensor.name] = decode_input(tensor, raw[index] if raw else None)
    return tensors


class InferenceServicer:
    """The RPCs; each returns its response message or aborts with a status."""

    def __init__(
        self,
        dispatcher: Any,
        cfg: ServerConfig,
        catalogue: dict[str, dict[str, Any]],
        counters: FrontCounters,
    ) -> None:
        self.dispatcher = dispatcher
        self.cfg = cfg
        self.registry = ModelRegistry(dispatcher, catalogue)
        self.counters = counters
        self.stats = counters.models
        self.request_stats = counters.requests

    async def _entry(self, name: str, version: str, context: Any) -> ModelEntry:
        try:
            self.check_token(context)
            return self.registry.get(name, version)
        except ServiceError as exc:
            await self._abort(context, exc)
            raise  # not reached: abort raises

    def check_token(self, context: Any) -> None:
        """``--auth-token``: the ``authorization: Bearer`` metadata, as over HTTP."""
        if not self.cfg.auth_token:
            return
        given = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.cfg.auth_token}".encode()):
            raise Unauthorized("missing or wrong bearer token")

    @staticmethod
    async def _abort(context: Any, exc: BaseException) -> None:
        status, _, message = error_status_and_kind(exc)
        await context.abort(_status_code(status), message)

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        await self._authorised(context)
        return pb.ServerReadyResponse(ready=self.dispatcher.ready())

    async def _authorised(self, context: Any) -> None:
        try:
            self.check_token(context)
        except ServiceError as exc:
            await self._abort(context, exc)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        entry = await self._entry(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self.registry.ready(entry))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        await self._authorised(context)
        return pb.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        entry = await self._entry(request.name, request.version, context)
        doc = model_metadata(entry)
        return pb.ModelMetadataResponse(
            name=doc["name"],
            versions=doc["versions"],
            platform=doc["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in doc["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in doc["outputs"]],
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        entry = await self._entry(request.name, request.version, context)
        doc = model_config(entry)
        config = pb.ModelConfig(
            name=doc["name"],
            platform=doc["platform"],
            backend=doc["backend"],
            max_batch_size=doc["max_batch_size"],
            input=[
                pb.ModelInput(name=t["name"], data_type=t["data_type"], dims=t["dims"])
                for t in doc["input"]
            ],
            output=[
                pb.ModelOutput(name=t["name"], data_type=t["data_type"], dims=t["dims"])
                for t in doc["output"]
            ],
        )
        if "dynamic_batching" in doc:
            config.dynamic_batching.max_queue_delay_microseconds = doc["dynamic_batching"][
                "max_queue_delay_microseconds"
            ]
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        if request.name:
            entries = [await self._entry(request.name, request.version, context)]
        else:
            await self._authorised(context)
            entries = list(self.registry.entries().values())
        totals, engines = self.counters.totals().models, self.dispatcher.engine_stats()
        docs = [
            model_statistics(e.name, e.stats_key, bool(e.engine_model), totals, engines)
            for e in entries
        ]
        return pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(**d) for d in docs])

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        entry = await self._entry(request.model_name, request.model_version, context)
        started = self.stats.started(entry.stats_key)
        status, timings, count = 500, {}, 0
        try:
            parameters = {k: parameter_value(v) for k, v in request.parameters.items()}
            deadline = request_deadline(parameters, self.cfg)
            remaining = context.time_remaining()
            if remaining is not None:  # the client's own gRPC deadline
                deadline = min(deadline, time.monotonic() + remaining)
            inputs = decode_inputs(request)
            outputs, timings = await self.registry.infer(
                entry,
                inputs,
                deadline=deadline,
                headers={k: v for k, v in context.invocation_metadata() if isinstance(v, str)},
                content_type=content_type_parameter(parameters),
            )
            outputs = select_outputs(entry, outputs, [o.name for o in request.outputs])
            response = pb.ModelInferResponse(
                model_name=entry.name, model_version=VERSION, id=request.id
            )
            for name, arr in outputs.items():
                response.outputs.add(
                    name=name, datatype=datatypes.datatype_name(arr.dtype), shape=arr.shape
                )
                response.raw_output_contents.append(bytes(datatypes.to_raw(arr)))
            status = 200
            count = inference_count(entry, inputs)
            return response
        except asyncio.CancelledError:  # the client cancelled: the jobs started are cancelled
            status = 499
            raise
        except Exception as exc:
            if not isinstance(exc, ServiceError):
                log.exception("gRPC inference on %s failed", entry.name)
            status = error_status_and_kind(exc)[0]
            await self._abort(context, exc)
        finally:
            self.stats.finished(entry.stats_key, started, status, timings, count)
            self.request_stats.record(status, timings)

    def handler(self) -> grpc.GenericRpcHandler:
        infer: Callable = self.ModelInfer
        if tracing.enabled():
            infer = tracing.traced_rpc(f"{SERVICE}/ModelInfer", infer)
        methods: dict[str, tuple[Callable, Any, Any]] = {
            "ServerLive": (self.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (self.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (
                self.ServerMetadata,
                pb.ServerMetadataRequest,
                pb.ServerMetadataResponse,
            ),
            "ModelMetadata": (
                self.ModelMetadata,
                pb.ModelMetadataRequest,
                pb.ModelMetadataResponse,
            ),
            "ModelInfer": (infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelConfig": (self.ModelConfig, pb.ModelConfigRequest, pb.ModelConfigResponse),
            "ModelStatistics": (
                self.ModelStatistics,
                pb.ModelStatisticsRequest,
                pb.ModelStatisticsResponse,
            ),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    fn,
                    request_deserializer=request_type.FromString,
                    response_serializer=response_type.SerializeToString,
                )
                for name, (fn, request_type, response_type) in methods.items()
            },
        )


def with_grpc(
    lifespan: Any,
    dispatcher: Any,
    cfg: ServerConfig,
    catalogue: dict[str, dict[str, Any]],
    counters: FrontCounters,
) -> Any:
    """``lifespan`` wrapped to run the gRPC server beside HTTP (unchanged when it is off)."""
    if not cfg.grpc_port:
        return lifespan

    @contextlib.asynccontextmanager
    async def combined(app: Any) -> AsyncIterator[None]:
        inner = lifespan(app) if lifespan is not None else contextlib.nullcontext()
        async with inner:
            limit = cfg.max_body_bytes + (1 << 20)  # the tensors plus the message's framing
            server = grpc.aio.server(
                options=[
                    ("grpc.max_receive_message_length", limit),
                    ("grpc.max_send_message_length", limit),
                    # gRPC's Linux default, stated: split mode's fronts share this port
                    ("grpc.so_reuseport", 1),
                ]
            )
            servicer = InferenceServicer(dispatcher, cfg, catalogue, counters)
            server.add_generic_rpc_handlers((servicer.handler(),))
            server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
            await server.start()
            log.info("gRPC (protocol v2) on %s:%d", cfg.host, cfg.grpc_port)
            try:
                yield
            finally:
                await server.stop(grace=1.0)

    return combined
