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
from splitserve.protocol.metrics import FrontCounters, model_statistics
from splitserve.protocol.models import (
    DEFAULT_CONTENT_TYPE,
    VERSION,
    ModelEntry,
    ModelRegistry,
    model_config,
    model_metadata,
    select_outputs,
)
from splitserve.protocol.watch import watched

log = logging.getLogger("splitserve.v2")

HEADER_LENGTH = "Inference-Header-Content-Length"
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


def parse_infer_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary data after it."""
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"invalid {HEADER_LENGTH} {header_length!r}")
        split = int(header_length)
        json_part, binary = body[:split], memoryview(body)[split:]
    try:
        doc = msgspec.json.decode(json_part)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the inference request must be a JSON object")
    return doc, binary


def _parameters(doc: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"'parameters' of {where} must be an object")
    return parameters


def decode_inputs(doc: dict[str, Any], binary: memoryview) -> dict[str, np.ndarray]:
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("the inference request needs a non-empty 'inputs' list")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for item in inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest("each input needs a 'name'")
        name = item["name"]
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise BadRequest(f"input {name!r} needs a 'datatype'")
        if name in tensors:
            raise BadRequest(f"input {name!r} is given twice")
        size = _parameters(item, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"input {name!r}: binary_data_size {size!r} past the body")
            raw = binary[offset : offset + size]
            offset += size
            tensors[name] = datatypes.from_raw(name, datatype, item.get("shape"), raw)
        elif "data" in item:
            tensors[name] = datatypes.from_json(name, datatype, item.get("shape"), item["data"])
        else:
            raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    return tensors


def requested_outputs(doc: dict[str, Any]) -> tuple[list[str], dict[str, bool]]:
    """The outputs asked for by name, and which of them as binary data."""
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list):
        raise BadRequest("'outputs' must be a list")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for item in outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest("each requested output needs a 'name'")
        names.append(item["name"])
        flag = _parameters(item, f"output {item['name']!r}").get("binary_data")
        if flag is not None:
            binary[item["name"]] = bool(flag)
    return names, binary


def encode_response(
    entry: ModelEntry,
    request_id: Any,
    outputs: dict[str, np.ndarray],
    binary: dict[str, bool],
    all_binary: bool,
) -> Response:
    docs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, arr in outputs.items():
        doc: dict[str, Any] = {
            "name": name,
            "datatype": datatypes.datatype_name(arr.dtype),
            "shape": list(arr.shape),
        }
        if binary.get(name, all_binary):
            raw = datatypes.to_raw(arr)
            doc["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            doc["data"] = datatypes.to_json(arr)
        docs.append(doc)
    result: dict[str, Any] = {"model_name": entry.name, "model_version": VERSION, "outputs": docs}
    if request_id is not None:
        result["id"] = request_id
    header = msgspec.json.encode(result)
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
        from splitserve.protocol.rest import read_body

        try:
            entry = _entry(request)
        except ServiceError as exc:
            return error_response(exc)
        started = stats.started(entry.stats_key)
        status, timings, count = 500, {}, 0
        try:
            body = await read_body(request, cfg.max_body_bytes)
            encoding = request.headers.get("content-encoding", "").lower()
            body = _decompress(body, encoding, cfg.max_body_bytes)
            doc, binary = parse_infer_body(body, request.headers.get(HEADER_LENGTH.lower()))
            parameters = _parameters(doc, "the request")
            deadline = request_deadline(parameters, cfg)
            inputs = decode_inputs(doc, binary)
            names, binary_outputs = requested_outputs(doc)
            outputs, timings = await watched(
                request,
                registry.infer(
                    entry,
                    inputs,
                    deadline=deadline,
                    headers=dict(request.headers),
                    content_type=content_type_parameter(parameters),
                ),
            )
            outputs = select_outputs(entry, outputs, names)
            response = encode_response(
                entry,
                doc.get("id"),
                outputs,
                binary_outputs,
                bool(parameters.get("binary_data_output", False)),
            )
            status = 200
            count = _inference_count(entry, inputs)
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

    return [
        Route("/v2", metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/stats", all_stats, methods=["GET"]),
        *versioned("", model, ["GET"]),
        *versioned("/ready", model_ready, ["GET"]),
        *versioned("/config", config, ["GET"]),
        *versioned("/stats", model_stats, ["GET"]),
        *versioned("/infer", infer, ["POST"]),
    ]


def _inference_count(entry: ModelEntry, inputs: dict[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()))
    if entry.engine_model:
        return int(first.shape[0]) if first.ndim else 1
    return int(first.size)
