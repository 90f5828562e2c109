"""Open Inference Protocol v2 over HTTP (KServe's REST protocol, as Triton speaks it).

Routes (``{m}`` a model of protocol/models.py; ``/versions/{v}`` optional, v = "1"):

- ``GET /v2``: server metadata; ``GET /v2/health/live``, ``/v2/health/ready``;
- ``GET /v2/models/{m}``: metadata; ``.../ready``; ``.../config`` (Triton's model
  configuration); ``.../stats`` and ``GET /v2/models/stats`` (Triton's statistics);
- ``POST /v2/models/{m}/infer``: JSON tensors, or Triton's binary tensor data extension
  (``Inference-Header-Content-Length``: the JSON header's size; inputs with
  ``parameters.binary_data_size`` follow it in order; outputs come back binary when
  asked with ``parameters.binary_data`` per output or ``binary_data_output`` for all).

Request parameters: ``timeout`` (microseconds, as Triton: it can only shorten the
server's ``--request-timeout``), ``content_type`` (of a service model's request
elements; default application/octet-stream), ``priority`` (accepted, not used: one
admission queue). Errors are ``{"error": "..."}`` with the status splitserve gives the
failure (400 bad input, 404 unknown model, 413, 503 shed or not ready, 504 deadline).
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any

import msgspec
import numpy as np
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from splitserve.config import ServerConfig
from splitserve.errors import BadRequest, PayloadTooLarge, ServiceError, error_status_and_kind
from splitserve.protocol import datatypes
from splitserve.protocol.body import read_body, request_headers
from splitserve.protocol.metrics import FrontCounters, model_statistics
from splitserve.protocol.models import (
    DEFAULT_CONTENT_TYPE,
    VERSION,
    ModelEntry,
    ModelRegistry,
    inference_count,
    model_config,
    model_metadata,
    select_outputs,
)
from splitserve.protocol.watch import watched

log = logging.getLogger("splitserve.v2")

HEADER_LENGTH = "Inference-Header-Content-Length"
HEADER_LENGTH_KEY = HEADER_LENGTH.lower()  # as ASGI names it
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]


def server_metadata() -> dict[str, Any]:
    from splitserve import __version__

    return {"name": "splitserve", "version": __version__, "extensions": EXTENSIONS}


def error_response(exc: BaseException) -> JSONResponse:
    status, _, message = error_status_and_kind(exc)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def request_deadline(parameters: dict[str, Any], cfg: ServerConfig) -> float:
    """Now + the server's timeout, shortened by the request's ``timeout`` (µs)."""
    budget = cfg.request_timeout_s
    timeout = parameters.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise BadRequest(f"parameter 'timeout' must be microseconds >= 0, got {timeout!r}")
        if timeout > 0:
            budget = min(budget, timeout / 1e6)
    return time.monotonic() + budget


def content_type_parameter(parameters: dict[str, Any]) -> str:
    value = parameters.get("content_type", DEFAULT_CONTENT_TYPE)
    if not isinstance(value, str):
        raise BadRequest("parameter 'content_type' must be a string")
    return value


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip/deflate request body (tritonclient's request compression), bounded."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}")
    wbits = 31 if encoding == "gzip" else 15
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"cannot decompress the body: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"decompressed body is above the limit of {limit} bytes")
    return data


class InputTensor(msgspec.Struct):
    """One input of an inference request (``shape`` is checked where tensors are made)."""

    name: str
    datatype: str
    shape: Any = None
    parameters: dict[str, Any] | None = None
    data: Any = msgspec.UNSET  # absent: the tensor is binary data after the JSON header


class RequestedOutput(msgspec.Struct):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(msgspec.Struct):
    """The JSON of an inference request (the binary extension's header), typed: msgspec
    checks the structure while it decodes, the code below only what types cannot say."""

    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None
    id: Any = None


class _BinaryData(msgspec.Struct):
    binary_data_size: int


class _OutputTensor(msgspec.Struct, omit_defaults=True):
    name: str
    datatype: str
    shape: tuple[int, ...]
    parameters: _BinaryData | None = None
    data: list | None = None


class _InferResponse(msgspec.Struct, omit_defaults=True):
    model_name: str
    model_version: str
    outputs: list[_OutputTensor]
    id: Any = None


_decode_request = msgspec.json.Decoder(InferRequest).decode
_encode = msgspec.json.Encoder().encode


def parse_infer_body(body: bytes, header_length: str | None) -> tuple[InferRequest, memoryview]:
    """The JSON header and the binary data after it (a view: the tensors are not copied)."""
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"invalid {HEADER_LENGTH} {header_length!r}")
        view = memoryview(body)
        split = int(header_length)
        json_part, binary = view[:split], view[split:]
    try:
        request = _decode_request(json_part)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid inference request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the inference request is not valid JSON: {exc}") from None
    if not request.inputs:
        raise BadRequest("the inference request needs a non-empty 'inputs' list")
    return request, binary


def decode_inputs(request: InferRequest, binary: memoryview) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for item in request.inputs:
        name = item.name
        if name in tensors:
            raise BadRequest(f"input {name!r} is given twice")
        size = item.parameters.get("binary_data_size") if item.parameters else None
        if size is not None:
            if (
                not isinstance(size, int)
                or isinstance(size, bool)
                or size < 0
                or offset + size > len(binary)
            ):
                raise BadRequest(f"input {name!r}: binary_data_size {size!r} past the body")
            raw = binary[offset : offset + size]
            offset += size
            tensors[name] = datatypes.from_raw(name, item.datatype, item.shape, raw)
        elif item.data is not msgspec.UNSET:
            tensors[name] = datatypes.from_json(name, item.datatype, item.shape, item.data)
        else:
            raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    return tensors


def requested_outputs(request: InferRequest) -> tuple[list[str], dict[str, bool]]:
    """The outputs asked for by name, and which of them as binary data."""
    names: list[str] = []
    binary: dict[str, bool] = {}
    for item in request.outputs or ():
        names.append(item.name)
        flag = item.parameters.get("binary_data") if item.parameters else None
        if flag is not None:
            binary[item.name] = bool(flag)
    return names, binary


def encode_response(
    entry: ModelEntry,
    request_id: Any,
    outputs: dict[str, np.ndarray],
    binary: dict[str, bool],
    all_binary: bool,
) -> Response:
    docs: list[_OutputTensor] = []
    chunks: list[bytes | memoryview] = []
    for name, arr in outputs.items():
        doc = _OutputTensor(name, datatypes.datatype_name(arr.dtype), arr.shape)
        if binary.get(name, all_binary):
            raw = datatypes.to_raw(arr)
            doc.parameters = _BinaryData(len(raw))
            chunks.append(raw)
        else:
            doc.data = datatypes.to_json(arr)
        docs.append(doc)
    header = _encode(_InferResponse(entry.name, VERSION, docs, request_id))
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *chunks]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def v2_routes(
    dispatcher: Any,
    cfg: ServerConfig,
    catalogue: dict[str, dict[str, Any]],
    counters: FrontCounters,
) -> list[Route]:
    """The /v2 routes of the app that protocol/rest.py builds (both modes)."""
    registry = ModelRegistry(dispatcher, catalogue)
    stats, request_stats = counters.models, counters.requests

    def _entry(request: HttpRequest) -> ModelEntry:
        params = request.path_params
        return registry.get(params["name"], params.get("version", ""))

    async def metadata(_: HttpRequest) -> Response:
        return JSONResponse(server_metadata())

    async def live(_: HttpRequest) -> Response:
        return JSONResponse({"live": True})

    async def ready(_: HttpRequest) -> Response:
        is_ready = dispatcher.ready()
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    async def model(request: HttpRequest) -> Response:
        try:
            return JSONResponse(model_metadata(_entry(request)))
        except ServiceError as exc:
            return error_response(exc)

    async def model_ready(request: HttpRequest) -> Response:
        try:
            entry = _entry(request)
        except ServiceError as exc:
            return error_response(exc)
        is_ready = registry.ready(entry)
        body = {"name": entry.name, "ready": is_ready}
        return JSONResponse(body, status_code=200 if is_ready else 503)

    async def config(request: HttpRequest) -> Response:
        try:
            return JSONResponse(model_config(_entry(request)))
        except ServiceError as exc:
            return error_response(exc)

    def _statistics(entries: list[ModelEntry]) -> list[dict[str, Any]]:
        totals, engines = counters.totals().models, dispatcher.engine_stats()
        return [
            model_statistics(e.name, e.stats_key, bool(e.engine_model), totals, engines)
            for e in entries
        ]

    async def model_stats(request: HttpRequest) -> Response:
        try:
            entry = _entry(request)
        except ServiceError as exc:
            return error_response(exc)
        return JSONResponse({"model_stats": _statistics([entry])})

    async def all_stats(_: HttpRequest) -> Response:
        return JSONResponse({"model_stats": _statistics(list(registry.entries().values()))})

    async def infer(request: HttpRequest) -> Response:
        try:
            entry = _entry(request)
        except ServiceError as exc:
            return error_response(exc)
        started = stats.started(entry.stats_key)
        status, timings, count = 500, {}, 0
        try:
            headers = request_headers(request)
            body = await read_body(request, headers, cfg.max_body_bytes)
            encoding = headers.get("content-encoding", "").lower()
            body = _decompress(body, encoding, cfg.max_body_bytes)
            doc, binary = parse_infer_body(body, headers.get(HEADER_LENGTH_KEY))
            parameters = doc.parameters or {}
            deadline = request_deadline(parameters, cfg)
            inputs = decode_inputs(doc, binary)
            names, binary_outputs = requested_outputs(doc)
            outputs, timings = await watched(
                request,
                registry.infer(
                    entry,
                    inputs,
                    deadline=deadline,
                    headers=headers,
                    content_type=content_type_parameter(parameters),
                ),
            )
            outputs = select_outputs(entry, outputs, names)
            response = encode_response(
                entry,
                doc.id,
                outputs,
                binary_outputs,
                bool(parameters.get("binary_data_output", False)),
            )
            status = 200
            count = inference_count(entry, inputs)
            return response
        except Exception as exc:
            if not isinstance(exc, ServiceError):
                log.exception("v2 inference on %s failed", entry.name)
            response = error_response(exc)
            status = response.status_code
            return response
        finally:
            stats.finished(entry.stats_key, started, status, timings, count)
            request_stats.record(status, timings)

    def versioned(path: str, endpoint: Any, methods: list[str]) -> list[Route]:
        return [
            Route(f"/v2/models/{{name}}{path}", endpoint, methods=methods),
            Route(f"/v2/models/{{name}}/versions/{{version}}{path}", endpoint, methods=methods),
        ]

    return [  # inference first: Starlette tries the routes in order
        *versioned("/infer", infer, ["POST"]),
        Route("/v2", metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/stats", all_stats, methods=["GET"]),
        *versioned("", model, ["GET"]),
        *versioned("/ready", model_ready, ["GET"]),
        *versioned("/config", config, ["GET"]),
        *versioned("/stats", model_stats, ["GET"]),
    ]
