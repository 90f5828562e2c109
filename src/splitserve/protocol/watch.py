"""Work for a request that stops when its client leaves (every HTTP route that runs one).

Once the body is read, the server's next ASGI message is ``http.disconnect``, sent when
the connection drops: the work is cancelled then, and with it the jobs it started in
CPU workers and engines (they get a cancel).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from starlette.requests import Request as HttpRequest

from splitserve.errors import Cancelled


async def until_disconnected(receive: Any, work: asyncio.Task) -> None:
    """Cancel ``work`` if the client closes its connection before the answer.

    Once the body is read, the server's next ASGI message is ``http.disconnect``, sent
    when the connection drops; the task is cancelled as soon as the answer is ready.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not work.done():
                work.cancel()
            return


async def watched(request: HttpRequest, work: Coroutine[Any, Any, Any]) -> Any:
    """Await ``work``, cancelled (with the jobs it started) if the client disconnects."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request.receive, task))
    try:
        return await task
    except asyncio.CancelledError:
        if watch.done() and not asyncio.current_task().cancelling():  # type: ignore[union-attr]
            raise ClientGone("the client closed the connection before the answer") from None
        raise
    finally:
        watch.cancel()


class ClientGone(Cancelled):
    """Nobody will read this answer: the client disconnected."""
