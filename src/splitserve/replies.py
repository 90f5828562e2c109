"""A service's answer as HTTP sends it, in every process that handles one.

``Reply`` is made where the service runs (a CPU worker, a request thread) and sent by
the HTTP layer; the load generator reads the timings header it carries. Kept apart
from the runtime and the protocol so that both, and the load generator, use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from splitserve.errors import error_status_and_kind
from splitserve.media import JSON, OCTET_STREAM

# Where a request's time went, per stage (ms), answered with every reply.
TIMINGS_HEADER = "X-Splitserve-Timings"


class Stage(msgspec.Struct, array_like=True):
    """One stage of a traced request, where it ran, and the stages within it.

    Times are ``time.monotonic()`` seconds: one clock for every process of a host, so the
    front can place what a CPU worker or an engine did. The front turns a request's
    stages into OpenTelemetry spans (protocol/tracing.py); nothing else imports
    OpenTelemetry. An ``error.type`` attribute marks a stage that failed.
    """

    name: str
    start: float
    end: float
    attributes: dict[str, str | int | float] = {}
    children: list[Stage] = []


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    timings: dict[str, float] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)  # a traced request's only


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
        return Reply(200, OCTET_STREAM, bytes(result))
    return Reply(200, JSON, _json_encoder.encode(result))
