"""Running a service on one request and turning the outcome into a ``Reply``.

Shared by the CPU worker (split mode) and the request threads (threaded mode), so both
modes run the user's code, encode results and report errors identically.
"""

from __future__ import annotations

import logging
from typing import Any

from splitserve.errors import BadRequest, ServiceError
from splitserve.replies import Reply, Stage, error_reply, result_reply
from splitserve.service import InferFn, Request, Service
from splitserve.tensors import (
    BUNDLE_CONTENT_TYPE,
    BundleError,
    pack_tensors_bundle,
    unpack_tensors_bundle,
)

log = logging.getLogger("splitserve.service")


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


def job_stage(
    service: Service | None,
    reply: Reply,
    started: float,
    ended: float,
    calls: list[Stage],
    attributes: dict[str, Any],
    *,
    direct: bool = False,
) -> Stage:
    """A traced job's stage: its engine calls within it and, for a service whose
    ``handle`` is the default one (preprocess, the one model, postprocess), the
    preprocess and postprocess stages around the call; a ``direct`` model call has none."""
    attributes = {**attributes, "splitserve.status": reply.status}
    if reply.status >= 500:
        attributes["error.type"] = str(reply.status)
    children = calls
    default_handle = service is not None and type(service).handle is Service.handle
    if default_handle and not direct and len(calls) == 1:
        (call,) = calls
        children = [Stage("preprocess", started, call.start), call]
        if "error.type" not in call.attributes:
            children.append(Stage("postprocess", call.end, ended))
    return Stage("job", started, ended, attributes, children)
