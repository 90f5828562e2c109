"""Reading an HTTP request (every route that takes a body): its headers once, its body
bounded.

Starlette's ``request.headers`` decodes every header at each lookup, and ``dict()`` of
it decodes them all once per key; a route that needs several headers and hands all of
them on (to a worker) reads them here once.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest

from splitserve.errors import BadRequest, PayloadTooLarge


def request_headers(request: HttpRequest) -> dict[str, str]:
    """The headers as a dict, names lower case (ASGI's); a repeated header keeps its
    first value, as Starlette's ``Headers.get`` does."""
    return {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in reversed(request.scope["headers"])
    }


async def read_body(request: HttpRequest, headers: dict[str, str], limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass ``limit`` bytes."""
    declared = headers.get("content-length")
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
