"""The control plane: children report readiness, the supervisor broadcasts the state.

ZeroMQ fits here (PUSH/PULL fan-in, PUB/SUB fan-out, reconnects handled); it carries
a few small messages a second, so its per-message latency does not matter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from splitserve.config import ServerConfig
from splitserve.runtime import messages as msg


class ControlSender:
    """A child's line to the supervisor (never blocks: the supervisor may be busy)."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.socket = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, 16)
        self.socket.connect(cfg.control_endpoint("control"))

    def send(self, message: msg.ChildReady | msg.EngineStats) -> None:
        with contextlib.suppress(zmq.Again):
            self.socket.send(msg.encode(message), zmq.NOBLOCK)

    def close(self) -> None:
        self.socket.close(linger=2000)


def report_ready(cfg: ServerConfig, role: str, index: int) -> None:
    """Tell the supervisor this child is ready to serve."""
    sender = ControlSender(cfg)
    sender.send(msg.ChildReady(role, index, os.getpid()))
    sender.close()


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
