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

# Work that a client may abandon is watched for a disconnect once it has run this long:
# a client gone sooner costs at most this much work for nobody.
WATCH_AFTER_S = 0.05


async def until_disconnected(receive: Any, work: asyncio.Task, gone: list[bool]) -> None:
    """Cancel ``work`` if the client closes its connection before the answer.

    Once the body is read, the server's next ASGI message is ``http.disconnect``, sent
    when the connection drops; this watcher is cancelled as soon as the answer is ready.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not work.done():
                gone.append(True)
                work.cancel()
            return


async def watched(request: HttpRequest, work: Coroutine[Any, Any, Any]) -> Any:
    """Await ``work``, cancelled (with the jobs it started) if the client disconnects.

    The work runs in the request's own task (a task of its own would cost two more
    turns of the event loop per request); the watcher, which cancels that task, starts
    only once the work has run ``WATCH_AFTER_S``: most requests are answered before, and
    a watcher task costs each of them ~20 us of the front's CPU (docs/benchmarks.md).
    """
    task = asyncio.current_task()
    assert task is not None
    gone: list[bool] = []
    watchers: list[asyncio.Future] = []

    def watch() -> None:
        watchers.append(asyncio.ensure_future(until_disconnected(request.receive, task, gone)))

    timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, watch)
    try:
        return await work
    except asyncio.CancelledError:
        # ours alone (nobody else cancelled this task, e.g. a shutdown): the client left
        if gone and task.uncancel() == 0:
            raise ClientGone("the client closed the connection before the answer") from None
        raise
    finally:
        timer.cancel()
        for watcher in watchers:
            watcher.cancel()


class ClientGone(Cancelled):
    """Nobody will read this answer: the client disconnected."""
