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

from splitserve.runtime import messages as msg
from splitserve.runtime.rundir import RunDir


class ControlSender:
    """A child's line to the supervisor (never blocks: the supervisor may be busy)."""

    def __init__(self, run: RunDir) -> None:
        self.socket = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, 16)
        self.socket.connect(run.control_endpoint("control"))

    def send(self, message: msg.ChildReady | msg.EngineStats | msg.FrontStats) -> None:
        with contextlib.suppress(zmq.Again):
            self.socket.send(msg.encode(message), zmq.NOBLOCK)

    def close(self) -> None:
        self.socket.close(linger=2000)


def report_ready(run: RunDir, role: str, index: int) -> None:
    """Tell the supervisor this child is ready to serve."""
    sender = ControlSender(run)
    sender.send(msg.ChildReady(role, index, os.getpid()))
    sender.close()


async def server_states(run: RunDir) -> AsyncIterator[msg.ServerState]:
    """The supervisor's state broadcasts, as they come."""
    ctx = zmq.asyncio.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(run.control_endpoint("state"))
    try:
        while True:
            state = msg.control_decoder.decode(await sub.recv())
            if isinstance(state, msg.ServerState):
                yield state
    finally:
        sub.close(linger=0)
