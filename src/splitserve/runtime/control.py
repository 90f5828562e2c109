"""The control plane: children report readiness, the supervisor broadcasts the state.

ZeroMQ fits here (PUSH/PULL fan-in, PUB/SUB fan-out, reconnects handled); it carries
a few small messages a second, so its per-message latency does not matter.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from splitserve.config import ServerConfig
from splitserve.runtime import messages as msg


def report_ready(cfg: ServerConfig, role: str, index: int) -> None:
    """Tell the supervisor this child is ready to serve."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(cfg.control_endpoint("control"))
    sock.send(msg.encode(msg.ChildReady(role, index, os.getpid())))
    sock.close(linger=2000)


async def server_states(cfg: ServerConfig) -> AsyncIterator[msg.ServerState]:
    """The supervisor's state broadcasts, as they come."""
    ctx = zmq.asyncio.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(cfg.control_endpoint("state"))
    try:
        while True:
            state = msg.control_decoder.decode(await sub.recv())
            if isinstance(state, msg.ServerState):
                yield state
    finally:
        sub.close(linger=0)
