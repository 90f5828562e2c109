"""A running split-mode server's own state: its private directory and its supervisor.

Made by the supervisor at start and handed to every child with the settings; the
settings (``ServerConfig``) say how to serve, this says where this server lives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunDir:
    """``path`` holds the server's sockets; ``supervisor_pid`` names its shared memory
    (see shm.py) and is the parent each child watches; ``started``: when the server
    started (``time.monotonic()``, one clock for every process of a host)."""

    path: str
    supervisor_pid: int
    started: float = field(default_factory=time.monotonic)

    def socket_path(self, name: str) -> str:
        """A data-plane Unix socket (see channel.py)."""
        return f"{self.path}/{name}.sock"

    def engine_socket(self, index: int) -> str:
        return self.socket_path(f"engine-{index}")

    def front_socket(self, index: int) -> str:
        return self.socket_path(f"front-{index}")

    def control_endpoint(self, name: str) -> str:
        """A control-plane ZeroMQ endpoint (supervisor state and readiness)."""
        return f"ipc://{self.path}/{name}.zmq"
