"""From the services' declarations to what each process is handed, and the default
process layout when the settings leave it open.

The supervisor (or threaded mode's one process) loads the service classes, applies the
config's per-model overrides, builds what needs building (``splitserve.compile``, run by
the command line before the runtime starts), and resolves every model into a
``ModelSpec``. Engines get specs only, CPU workers get routes (which engine hosts which
model) and the service names they import themselves, the front gets the catalogue.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from splitserve.config import ServerConfig
from splitserve.service import Model, Service, load_service
from splitserve.spec import ModelKey, ModelSpec


def load_services(specs: Sequence[str]) -> dict[str, type[Service]]:
    """Import the ``module:Class`` services, by service name (names must differ)."""
    classes: dict[str, type[Service]] = {}
    for spec in specs:
        cls = load_service(spec)
        name = cls.service_name()
        if name in classes:
            raise ValueError(f"two services are named {name!r}")
        classes[name] = cls
    return classes


@dataclass(frozen=True)
class Declaration:
    """A model as its service declares it, with the config file's overrides applied."""

    key: ModelKey
    service: type[Service]
    model: Model


@dataclass(frozen=True)
class Services:
    """The served classes by service name, and every model they declare by key."""

    classes: dict[str, type[Service]]
    models: dict[str, Declaration]

    @classmethod
    def load(
        cls, specs: Sequence[str], overrides: Mapping[str, Mapping[str, Any]] | None = None
    ) -> Services:
        """Import ``specs`` and apply ``overrides`` (by ``service/model``; one naming no
        model is an error)."""
        classes = load_services(specs)
        models: dict[str, Declaration] = {}
        for svc, service in classes.items():
            for name, model in service.declared_models().items():
                key = ModelKey(svc, name)
                changes = (overrides or {}).get(str(key), {})
                models[str(key)] = Declaration(key, service, dataclasses.replace(model, **changes))
        unknown = set(overrides or {}) - set(models)
        if unknown:
            raise ValueError(f"the config sets models {sorted(unknown)}; served: {sorted(models)}")
        return cls(classes, models)

    def models_of(self, service: str) -> dict[str, Declaration]:
        """One service's declarations by model name."""
        return {d.key.model: d for d in self.models.values() if d.key.service == service}

    def catalogue(self) -> dict[str, dict[str, Any]]:
        """What ``GET /v1/services`` answers: each service's models and batch settings."""
        return {
            svc: {
                "models": {
                    name: {
                        "backend": d.model.backend,
                        "max_batch_size": d.model.max_batch_size,
                        "max_delay_ms": d.model.max_delay_ms,
                    }
                    for name, d in self.models_of(svc).items()
                }
            }
            for svc in self.classes
        }


def resolve(decl: Declaration, built: str | Path | None, threads: int | None) -> ModelSpec:
    """What the engine of ``decl`` loads: its built engine if any, else the declared file."""
    model = decl.model
    if built:
        source = str(built)
    elif model.backend == "torch" and not model.path.endswith(".pt2"):
        source = model.path  # a factory ``package.module:function``, imported as is
    elif model.path:
        source = str(decl.service.model_path(model))
    else:
        source = ""  # the simulated accelerator has no file
    return ModelSpec(
        key=str(decl.key),
        backend=model.backend,
        source=source,
        precision=model.precision,
        max_batch_size=model.max_batch_size,
        max_delay_ms=model.max_delay_ms,
        pad_axes=dict(model.pad_axes),
        pad_value=model.pad_value,
        pad_bucket=model.pad_bucket,
        threads=model.threads or threads,
        options=dict(model.options),
    )


@dataclass(frozen=True)
class Layout:
    """Split mode's processes: engine process j hosts ``engines[j]`` (specs by key)."""

    engines: list[dict[str, ModelSpec]]
    catalogue: dict[str, dict[str, Any]]

    @property
    def routes(self) -> dict[str, list[int]]:
        """For CPU workers: each model key's engine processes."""
        routes: dict[str, list[int]] = {}
        for j, models in enumerate(self.engines):
            for key in models:
                routes.setdefault(key, []).append(j)
        return routes


def plan(cfg: ServerConfig, services: Services, built: Mapping[str, str]) -> Layout:
    """Replica j of every model lives in engine process j, so models share a process
    (and its cores) unless they ask for more replicas than the others.

    ``built`` maps model keys to the engines ``splitserve.compile`` built for them.
    """
    decls = services.models
    replicas = {k: cfg.engine_replicas or d.model.replicas for k, d in decls.items()}
    count = max(replicas.values(), default=0)
    threads = cfg.threads_per_engine(count)
    specs = {k: resolve(d, built.get(k), threads) for k, d in decls.items()}
    engines = [{k: s for k, s in specs.items() if replicas[k] > j} for j in range(count)]
    return Layout(engines, services.catalogue())


# The default layout (``with_default_layout``) comes from measurements
# (docs/benchmarks.md), and says why:
#
# - Models computing on the host's cores: one single-threaded engine replica per core
#   (up to MAX_CPU_REPLICAS, then more threads each). Independent batches on separate
#   cores scale almost perfectly, where one engine spreading a batch over several
#   threads does not, and with the per-engine compute slot (runtime/engine_worker.py) no
#   more compute threads run than there are cores. Pre/post-processing is a small share
#   of such a service (OCR: ~6%), so one CPU worker per four cores.
# - Models on an accelerator (a GPU, or the simulated one): one engine replica, since
#   the device runs one batch at a time anyway, and the CPU work is what limits: a CPU
#   worker per core but one (left to the front and the engine's I/O).
#
# A model that declares ``replicas`` other than 1 keeps its declaration; flags and the
# config file override any of it; ``splitserve tune`` searches around it.
MAX_CPU_REPLICAS = 8


class Defaults(NamedTuple):
    cpu_workers: int
    engine_replicas: int | None  # None: each model's own ``replicas``
    worker_concurrency: int


# Jobs a CPU worker holds at once by default. Models on the host's cores: a worker per
# four cores spends most of a job awaiting engines (OCR: ~94% of it), so it holds more
# than the engines run at once; admission then serves a closed loop of twice as many
# clients as slots without refusals (with 4, a lone worker's 4 slots made 16 clients a
# 4x overload and the front refused most of them), while every slot more adds latency
# to what is in flight (16 per worker: recovery after a 10x overload took 22 s for a new
# request, docs/benchmarks.md). Models on an accelerator: a worker per core, a few each,
# and together at least the largest model's max_batch_size, or its batches never fill
# (on 2 cores the lone worker's 4 slots held the simulated detector's batches of 32 to 4,
# and admission refused 99% of a 16-client closed loop as an overload), up to
# MAX_ACCELERATOR_WORKER_CONCURRENCY.
CPU_MODELS_WORKER_CONCURRENCY = 8
ACCELERATOR_WORKER_CONCURRENCY = 4
MAX_ACCELERATOR_WORKER_CONCURRENCY = 32


def gpu_present() -> bool:
    """An NVIDIA device node is visible (no driver library is loaded to find out)."""
    return Path("/dev/nvidiactl").exists() and os.environ.get("CUDA_VISIBLE_DEVICES") != ""


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def on_accelerator(model: Model) -> bool:
    """Whether the model's batches will run on an accelerator rather than the host."""
    if model.backend in ("simulated", "tensorrt"):
        return True
    if model.backend == "torch":
        return str(model.options.get("device", "cpu")).startswith("cuda")
    if model.backend == "onnxruntime":
        providers = model.options.get("providers")
        if providers is not None:
            return any("CUDA" in str(p) or "Tensorrt" in str(p) for p in providers)
        return _installed("onnxruntime-gpu") and gpu_present()
    return False


def default_layout(
    models: Mapping[str, Model], cores: int | None = None, cpu_workers: int | None = None
) -> Defaults:
    """The layout for ``models`` on a machine of ``cores`` cores (default: this one)."""
    cores = max(1, cores or os.cpu_count() or 1)
    declared = any(m.replicas != 1 for m in models.values())
    if any(not on_accelerator(m) for m in models.values()):
        replicas = None if declared else min(cores, MAX_CPU_REPLICAS)
        workers = cpu_workers or max(1, cores // 4)
        concurrency = CPU_MODELS_WORKER_CONCURRENCY
    else:
        replicas = None
        workers = cpu_workers or max(1, cores - 1)
        # a batch fills only when as many jobs are in flight, over all the workers
        largest = max((m.max_batch_size for m in models.values()), default=1)
        concurrency = min(
            MAX_ACCELERATOR_WORKER_CONCURRENCY,
            max(ACCELERATOR_WORKER_CONCURRENCY, math.ceil(largest / workers)),
        )
    return Defaults(workers, replicas, concurrency)


# Fronts (``--fronts auto``). A front spends ~FRONT_CPU_MS of its core per request on
# HTTP, routing and the two messages to and from a worker (no-op service: ~40% of the
# split server's 0.38-0.40 ms per request, docs/benchmarks.md), so one front serves at
# most ~1000 / FRONT_CPU_MS requests/s. It is the bottleneck only when the rest of the
# server is faster than that:
# - models on the host's cores: the engines take the cores and inference costs far
#   more per request than the front (OCR: ~650 ms of core time per page); a second
#   front would only take a core from them: one front;
# - every model on an accelerator (or no model): the CPU workers, a core each, do the
#   CPU work. W workers outrun one front when a request costs a worker less than
#   W x FRONT_CPU_MS: with a front per CORES_PER_FRONT cores (W ~ 8), services under
#   ~1.5 ms of Python per request, where decoding and resizing one image already costs
#   more. So a front per CORES_PER_FRONT cores, at least 1 and at most MAX_FRONTS: the
#   next ceiling is the one engine process of such a layout, whose event loop spends
#   about 2/3 of a front's time per request (no-op), so a third front would wait on it.
#   Never more than a worker's slots either (each front gets a share of them).
# On the 2-core test machine that is always 1. A lighter service, or one with several
# engine replicas, sets ``--fronts``; ``benchmarks/noop.py --fronts 1 2`` measures it.
FRONT_CPU_MS = 0.2
CORES_PER_FRONT = 8
MAX_FRONTS = 2


def default_fronts(
    models: Mapping[str, Model], cores: int | None = None, worker_concurrency: int = 4
) -> int:
    """How many fronts share the port for ``models`` on ``cores`` cores (see above)."""
    cores = max(1, cores or os.cpu_count() or 1)
    if any(not on_accelerator(m) for m in models.values()):
        return 1
    return max(1, min(cores // CORES_PER_FRONT, MAX_FRONTS, worker_concurrency))


def with_default_layout(cfg: ServerConfig, services: Services) -> ServerConfig:
    """``cfg`` with the CPU workers, engine replicas and fronts it leaves open filled in."""
    models = {key: d.model for key, d in services.models.items()}
    defaults = default_layout(models, cpu_workers=cfg.cpu_workers)
    concurrency = cfg.worker_concurrency or defaults.worker_concurrency
    cfg = dataclasses.replace(
        cfg,
        cpu_workers=defaults.cpu_workers,
        engine_replicas=cfg.engine_replicas or defaults.engine_replicas,
        worker_concurrency=concurrency,
    )
    if cfg.fronts == "auto":
        fronts = default_fronts(models, worker_concurrency=concurrency)
        cfg = dataclasses.replace(cfg, fronts=fronts)
    elif cfg.fronts > concurrency:
        raise ValueError(
            f"fronts ({cfg.fronts}) must be <= worker_concurrency ({concurrency}): each "
            "front gets a share of every CPU worker's slots"
        )
    return cfg
