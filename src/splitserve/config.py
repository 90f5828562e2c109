"""Server settings (from the command line) and the process layout derived from them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from splitserve.service import DEFAULT_MAX_IMAGE_PIXELS, Model, Service, load_service


@dataclass
class ServerConfig:
    services: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    # Protocol v2 over gRPC on this port (0: off; Triton's is 8001), same host.
    grpc_port: int = 0
    mode: str = "split"  # "split" or "threaded"
    cpu_workers: int = 2
    # Overrides every model's own ``replicas``: engine process j hosts replica j.
    engine_replicas: int | None = None
    # Intra-op threads of each engine process; default: the cores shared among them.
    engine_threads: int | None = None
    # Jobs a CPU worker holds at once: it preprocesses one while others await inference.
    worker_concurrency: int = 4
    threads: int = 8  # threaded mode: request threads
    queue_size: int = 256  # jobs waiting in the front for a free worker slot
    request_timeout_s: float = 30.0
    # On SIGTERM: stop admitting, let admitted requests finish for at most this long.
    drain_timeout_s: float = 30.0
    # When set, every route but liveness needs ``Authorization: Bearer <token>``.
    auth_token: str = ""
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    shm_pool_bytes: int = 512 * 1024 * 1024  # per process
    log_level: str = "INFO"
    # Filled in on start: built engines by "service/model" (see splitserve.compile).
    artifacts: dict[str, str] = field(default_factory=dict)
    # Filled in by the supervisor.
    run_dir: str = ""
    supervisor_pid: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("split", "threaded"):
            raise ValueError(f"mode must be 'split' or 'threaded', got {self.mode!r}")
        for name in ("cpu_workers", "worker_concurrency", "threads", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.engine_replicas is not None and self.engine_replicas < 1:
            raise ValueError("engine_replicas must be >= 1")

    def socket_path(self, name: str) -> str:
        """A data-plane Unix socket (see runtime/channel.py)."""
        return f"{self.run_dir}/{name}.sock"

    def engine_socket(self, index: int) -> str:
        return self.socket_path(f"engine-{index}")

    def control_endpoint(self, name: str) -> str:
        """A control-plane ZeroMQ endpoint (supervisor state and readiness)."""
        return f"ipc://{self.run_dir}/{name}.zmq"

    def load_services(self) -> dict[str, type[Service]]:
        classes: dict[str, type[Service]] = {}
        for spec in self.services:
            cls = load_service(spec)
            name = cls.service_name()
            if name in classes:
                raise ValueError(f"two services are named {name!r}")
            classes[name] = cls
        return classes

    def engine_layout(self, classes: dict[str, type[Service]]) -> list[dict[str, Model]]:
        """Which models each engine process hosts, keyed ``service/model``.

        Replica j of every model lives in engine process j, so models share a process
        (and its cores) unless they ask for more replicas than the others.
        """
        declared = {
            f"{svc}/{name}": model
            for svc, cls in classes.items()
            for name, model in cls.declared_models().items()
        }
        replicas = {k: self.engine_replicas or m.replicas for k, m in declared.items()}
        count = max(replicas.values(), default=0)
        return [{k: m for k, m in declared.items() if replicas[k] > j} for j in range(count)]

    def model_file(self, cls: type[Service], key: str, model: Model) -> Path:
        """What the engine of ``key`` ("service/model") loads: its built engine, if any."""
        built = self.artifacts.get(key)
        return Path(built) if built else cls.model_path(model)

    def threads_per_engine(self, engine_count: int) -> int:
        if self.engine_threads:
            return self.engine_threads
        return max(1, (os.cpu_count() or 1) // max(1, engine_count))


def build_engines(classes: dict[str, type[Service]]) -> dict[str, str]:
    """Build or reuse (engine cache) every engine the services ask for, before any loads.

    A build the accuracy gate refuses stops the server with the reason: a server never
    falls back to fp32 quietly. The build tools are imported only when a model needs them.
    """
    if not any(m.needs_build for cls in classes.values() for m in cls.declared_models().values()):
        return {}
    from splitserve.compile.artifacts import prepare_artifacts
    from splitserve.compile.builder import GateRejected
    from splitserve.compile.data import DataError
    from splitserve.compile.precision import PrecisionError
    from splitserve.engines.tensorrt import TensorRTUnavailable

    try:
        return prepare_artifacts(classes)
    except (GateRejected, DataError, PrecisionError, TensorRTUnavailable) as exc:
        raise SystemExit(f"splitserve: cannot build an engine: {exc}") from None
