"""The settings of ``splitserve serve``, written once.

Every setting, its default and its help live in ``ServerConfig`` below; the command
line's flags are made from it (``add_arguments``), and a TOML file (``--config``) sets
the same names. Flags override the file, the file overrides the defaults. What a
running server learns (its run directory, the supervisor's pid, built engines) is not
a setting: see ``splitserve.layout`` and ``splitserve.runtime.rundir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitserve.service import DEFAULT_MAX_IMAGE_PIXELS

# What a config file's ``[models."service/model"]`` table may change in a declaration.
MODEL_OVERRIDES = {
    "max_batch_size": int,
    "max_delay_ms": float,
    "replicas": int,
    "threads": int,
    "pad_bucket": int,
}


def _setting(default: Any, help: str, *, flag: str | None = None, **argparse_kw: Any) -> Any:
    """A ``ServerConfig`` field with its command-line flag (default: from the field name)."""
    meta = {"help": help, "flag": flag, "argparse": argparse_kw}
    if callable(default):  # a factory, called per instance
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _auth_token_from_env() -> str:
    return os.environ.get("SPLITSERVE_AUTH_TOKEN", "")


@dataclass
class ServerConfig:
    """How to serve: processes, limits, timeouts. The same in both modes unless noted."""

    services: list[str] = _setting(list, "service classes as module:Class (or file.py:Class)")
    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8000, "HTTP port")
    grpc_port: int = _setting(
        0, "protocol v2 over gRPC on this port, same host (0: off; Triton uses 8001)"
    )
    mode: str = _setting(
        "split",
        "split: front + CPU worker processes + engine processes; "
        "threaded: one process, a thread pool, the classic design",
        choices=["split", "threaded"],
    )
    cpu_workers: int | None = _setting(
        None, "CPU worker processes (split; default: from the cores and the models)", type=int
    )
    engine_replicas: int | None = _setting(
        None,
        "engine processes, each with a replica of every model (overrides the models' own "
        "`replicas`; engine process j hosts replica j; default: the models' own if any "
        "declares some, else from the cores and the models)",
        type=int,
    )
    engine_threads: int | None = _setting(
        None, "intra-op threads per engine (default: cores / engine processes)", type=int
    )
    worker_concurrency: int | None = _setting(
        None,
        "requests a CPU worker holds at once: it preprocesses one while others await "
        "engines (default: from the models: 8 when they run on the host's cores, 4 on "
        "an accelerator)",
        type=int,
    )
    crash_retries: int = _setting(
        1,
        "times a request, or one of its engine calls, is sent again when the process "
        "running it dies, within its deadline (split; 0: answer 503 at once). A request "
        "that kills every process it reaches costs 1 + this many crashes",
    )
    fronts: int | str = _setting(
        "auto",
        "front processes sharing the HTTP (and gRPC) port with SO_REUSEPORT (split); each "
        "gets a share of every CPU worker's --worker-concurrency, so at most that many; "
        "auto: more than 1 only for accelerator models on many cores (docs/benchmarks.md)",
        metavar="N|auto",
    )
    threads: int = _setting(8, "request threads (threaded)")
    queue_size: int = _setting(256, "requests waiting for a free worker (or thread) before 503")
    request_timeout_s: float = _setting(30.0, "seconds (504 after)", flag="--request-timeout")
    drain_timeout_s: float = _setting(
        30.0,
        "seconds admitted requests may take to finish after SIGTERM",
        flag="--drain-timeout",
    )
    auth_token: str = _setting(
        _auth_token_from_env,
        "require 'Authorization: Bearer TOKEN' on every route but liveness "
        "(default: $SPLITSERVE_AUTH_TOKEN; none: no authentication)",
    )
    max_body_bytes: int = _setting(32 * 1024 * 1024, "largest request body (413 above)")
    max_image_pixels: int = _setting(DEFAULT_MAX_IMAGE_PIXELS, "largest image (413 above)")
    shm_pool_bytes: int = _setting(
        512 * 1024 * 1024,
        "shared memory each process may hold for tensors (larger ones then go inline)",
    )
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    trace: str = _setting(
        "off",
        "OpenTelemetry traces, a span per stage of each inference request, W3C traceparent "
        "read from and answered to clients (needs the `trace` extra): off (nothing loaded); "
        "on (OTLP over HTTP to $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "
        "$OTEL_EXPORTER_OTLP_ENDPOINT or http://localhost:4318); or a collector's URL, "
        "e.g. http://127.0.0.1:4318",
    )
    # Per-model overrides of the declarations, by "service/model": the config file only.
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_level = self.log_level.upper()
        if self.mode not in ("split", "threaded"):
            raise ValueError(f"mode must be 'split' or 'threaded', got {self.mode!r}")
        for name in ("threads", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.worker_concurrency is not None and self.worker_concurrency < 1:
            raise ValueError("worker_concurrency must be >= 1")
        if self.trace not in ("off", "on") and not self.trace.startswith(("http://", "https://")):
            raise ValueError(f"trace must be off, on or an http(s):// URL, got {self.trace!r}")
        if self.crash_retries < 0:
            raise ValueError("crash_retries must be >= 0")
        if self.cpu_workers is not None and self.cpu_workers < 1:
            raise ValueError("cpu_workers must be >= 1")
        if self.engine_replicas is not None and self.engine_replicas < 1:
            raise ValueError("engine_replicas must be >= 1")
        self.fronts = _fronts(self.fronts)
        if (
            self.fronts != "auto"
            and self.worker_concurrency is not None
            and self.fronts > self.worker_concurrency
        ):
            raise ValueError(
                f"fronts ({self.fronts}) must be <= worker_concurrency "
                f"({self.worker_concurrency}): each front gets a share of every CPU "
                "worker's slots"
            )
        for key, overrides in self.models.items():
            if not isinstance(overrides, Mapping):
                raise ValueError(f"models.{key!r} must be a table of settings")
            unknown = set(overrides) - set(MODEL_OVERRIDES)
            if unknown:
                raise ValueError(
                    f"models.{key!r}: unknown settings {sorted(unknown)}; "
                    f"a config file may set {sorted(MODEL_OVERRIDES)}"
                )
            for name, value in overrides.items():
                _check_type(f"models.{key!r}.{name}", value, MODEL_OVERRIDES[name])

    @property
    def front_count(self) -> int:
        """``fronts`` as a number: "auto" is resolved by ``layout.with_default_layout``
        before a server starts; unresolved, it is the one front of the cautious default."""
        return self.fronts if isinstance(self.fronts, int) else 1

    def threads_per_engine(self, engine_count: int) -> int:
        """Intra-op threads of each engine process: set, or the cores shared among them."""
        if self.engine_threads:
            return self.engine_threads
        return max(1, (os.cpu_count() or 1) // max(1, engine_count))

    @classmethod
    def from_file(cls, path: Path, **overrides: Any) -> ServerConfig:
        """The settings in a TOML file, then ``overrides`` (the flags given) on top."""
        try:
            values = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read the config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        for name, value in values.items():
            _check_type(f"{path}: {name}", value, _field_type(known[name]))
        return cls(**{**values, **overrides})


def _fronts(value: int | str) -> int | str:
    """``fronts`` as given (a flag is a string): "auto", or a number >= 1."""
    if isinstance(value, str) and value != "auto":
        if not value.strip().isdigit():
            raise ValueError(f"fronts must be a number or 'auto', got {value!r}")
        value = int(value)
    if isinstance(value, int) and value < 1:
        raise ValueError("fronts must be >= 1")
    return value


def _field_type(f: dataclasses.Field) -> type | tuple[type, ...]:
    kinds = {
        "str": str,
        "int": int,
        "int | str": (int, str),
        "float": (int, float),
        "int | None": int,
        "list[str]": list,
        "dict[str, dict[str, Any]]": dict,
    }
    return kinds[str(f.type)]


def _check_type(where: str, value: Any, kind: type | tuple[type, ...]) -> None:
    if kind is float:
        kind = (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where} must be {names}, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag for every setting of ``ServerConfig`` (the file-only ``models`` aside).

    Flags default to nothing at all (``SUPPRESS``): only the flags given override the
    config file and the defaults, which live in the dataclass alone.
    """
    for f in dataclasses.fields(ServerConfig):
        if "help" not in f.metadata:
            continue
        extra = dict(f.metadata["argparse"])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = "" if default in (None, "", []) else f" (default: {default})"
        if f.name == "services":
            parser.add_argument(
                "services", nargs="*", default=argparse.SUPPRESS, help=f.metadata["help"]
            )
            continue
        if f.name == "auth_token":
            shown = ""  # never print a secret
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        extra.setdefault("type", type(default) if default is not None else str)
        extra.setdefault("metavar", f.name.upper().removesuffix("_S"))
        parser.add_argument(
            flag,
            dest=f.name,
            default=argparse.SUPPRESS,
            help=f.metadata["help"] + shown,
            **extra,
        )


def from_arguments(args: argparse.Namespace, config_file: Path | None) -> ServerConfig:
    """The settings of a parsed command line (``add_arguments``), over ``config_file``."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(ServerConfig)
        if hasattr(args, f.name)
    }
    if given.get("services") == []:
        del given["services"]
    cfg = ServerConfig.from_file(config_file, **given) if config_file else ServerConfig(**given)
    if not cfg.services:
        raise ValueError("no service to serve: name module:Class, or `services` in --config")
    return cfg
