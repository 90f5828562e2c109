"""Running a service on one request and turning the outcome into a ``Reply``.

Shared by the CPU worker (split mode) and the request threads (threaded mode), so both
modes run the user's code, encode results and report errors identically.
"""

from __future__ import annotations

import logging

from splitserve.replies import Reply, error_reply, result_reply
from splitserve.service import InferFn, Request, Service

log = logging.getLogger("splitserve.service")


async def invoke_service(service: Service, request: Request, infer: InferFn) -> Reply:
    """The service's answer to ``request``; an exception becomes an error reply."""
    try:
        return result_reply(await service.handle(request, infer))
    except Exception as exc:
        reply = error_reply(exc)
        if reply.status >= 500:
            log.exception("%s failed on a request", type(service).__name__)
        return reply
