"""Running a service on one request and turning the outcome into an HTTP reply.

Shared by the CPU worker (split mode) and the request threads (threaded mode), so both
modes run the user's code, encode results and report errors identically.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from splitserve.errors import BadRequest, ServiceError, error_status_and_kind
from splitserve.service import InferFn, Request, Service
from splitserve.tensors import (
    BUNDLE_CONTENT_TYPE,
    BundleError,
    pack_tensors_bundle,
    unpack_tensors_bundle,
)

log = logging.getLogger("splitserve.service")

JSON = "application/json"
# Where a request's time went, per stage (ms), answered with every reply.
TIMINGS_HEADER = "X-Splitserve-Timings"


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    timings: dict[str, float] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def _json_default(value: Any) -> Any:
    """Let services return numpy scalars and arrays in JSON results."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


_json_encoder = msgspec.json.Encoder(enc_hook=_json_default)


def timings_header(timings: dict[str, float]) -> str:
    """The ``TIMINGS_HEADER`` value: ``stage=ms,stage=ms`` (``bench`` parses it)."""
    return ",".join(f"{k}={v:.3f}" for k, v in timings.items())


def error_reply(exc: BaseException) -> Reply:
    status, kind, message = error_status_and_kind(exc)
    body = _json_encoder.encode({"error": {"type": kind, "message": message}})
    headers = {}
    if status == 503:  # whole seconds (RFC 9110), at least 1
        retry_after = getattr(exc, "retry_after_s", 1.0)
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    elif status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="splitserve"'
    return Reply(status, JSON, body, headers=headers)


def result_reply(result: Any) -> Reply:
    if isinstance(result, bytes | bytearray | memoryview):
        return Reply(200, "application/octet-stream", bytes(result))
    return Reply(200, JSON, _json_encoder.encode(result))


async def invoke_service(service: Service, request: Request, infer: InferFn) -> Reply:
    """The service's answer to ``request``; an exception becomes an error reply."""
    try:
        return result_reply(await service.handle(request, infer))
    except Exception as exc:
        reply = error_reply(exc)
        if reply.status >= 500 and not isinstance(exc, ServiceError):
            log.exception("%s failed on a request", type(service).__name__)
        return reply


async def invoke_model(model: str, body: bytes, infer: InferFn) -> Reply:
    """A direct call of one engine model: a tensor bundle in, a tensor bundle out."""
    try:
        try:
            inputs = unpack_tensors_bundle(body)
        except BundleError as exc:
            raise BadRequest(str(exc)) from None
        outputs = await infer(model, inputs)
        return Reply(200, BUNDLE_CONTENT_TYPE, pack_tensors_bundle(outputs))
    except Exception as exc:
        return error_reply(exc)
