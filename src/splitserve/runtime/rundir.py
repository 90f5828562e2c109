"""A running split-mode server's own state: its private directory and its supervisor.

Made by the supervisor at start and handed to every child with the settings; the
settings (``ServerConfig``) say how to serve, this says where this server lives.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunDir:
    """``path`` holds the server's sockets; ``supervisor_pid`` names its shared memory
    (see shm.py) and is the parent each child watches."""

    path: str
    supervisor_pid: int

    def socket_path(self, name: str) -> str:
        """A data-plane Unix socket (see channel.py)."""
        return f"{self.path}/{name}.sock"

    def engine_socket(self, index: int) -> str:
        return self.socket_path(f"engine-{index}")

    def control_endpoint(self, name: str) -> str:
        """A control-plane ZeroMQ endpoint (supervisor state and readiness)."""
        return f"ipc://{self.path}/{name}.zmq"
