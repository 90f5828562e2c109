"""Running a service on one request and turning the outcome into a ``Reply``.

Shared by the CPU worker (split mode) and the request threads (threaded mode), so both
modes run the user's code, encode results and report errors identically.
"""

from __future__ import annotations

import logging

from splitserve.errors import BadRequest, ServiceError
from splitserve.replies import Reply, error_reply, result_reply
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
