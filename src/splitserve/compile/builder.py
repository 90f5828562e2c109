"""One build: prepare the precision, gate it against fp32, search fp32 layers, cache it.

Used by ``splitserve build`` and by servers on start (a model that asks for a
precision is built, or reused from the cache, before its engines load).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import onnx
except ModuleNotFoundError as exc:  # installed without the `build` extra
    from splitserve.compile import missing_build_extra

    raise missing_build_extra(exc) from None

from splitserve.compile import cache
from splitserve.compile.data import (
    Batch,
    DataError,
    answer_of,
    capture_inputs,
    files_digest,
    is_tensor_file,
    load_tensors,
    split_files,
)
from splitserve.compile.gate import (
    DEFAULT_TOLERANCE,
    GateResult,
    compare_engines,
    compare_latency,
    run_batches,
    service_agreement,
)
from splitserve.compile.precision import (
    PRECISIONS,
    PrecisionError,
    apply_precision,
    changed_nodes,
    fold_constants,
    name_nodes,
    required_opset,
    resolve_keep,
    upgrade_opset,
)
from splitserve.compile.search import group_by_op_type, rank_layers, search_keep
from splitserve.engines.base import Engine, create_engine
from splitserve.engines.device import device_name
from splitserve.service import DEFAULT_MIN_AGREEMENT, Service
from splitserve.spec import ModelSpec

log = logging.getLogger("splitserve.compile")

BUILD_BACKENDS = ("onnxruntime", "tensorrt")
RANKING_BATCHES = 4  # calibration batches the layer ranking runs (each exposes every layer)
SYNTHETIC_BATCHES = 8
# What a gate on random inputs is worth, said in the log, the report and the command's
# output: a model's answers on noise (a text detector's map of noise is all but zero)
# say nothing of its answers on real inputs.
UNCALIBRATED_GATE = (
    "the gate judged random inputs (no --calibration): it shows that the graph loads and "
    "runs at this precision without overflow, not that the model's answers on real "
    "inputs are kept; give it real inputs with --calibration DIR (.npy/.npz tensors, or "
    "request files with --service) for a gate that does"
)


class GateRejected(RuntimeError):
    """The engine missed the tolerance (and the fp32 search, if asked, found no fix)."""

    def __init__(self, message: str, report: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class BuildSpec:
    """What to build. ``keep_fp32`` may contain ``"auto"`` (search for more layers)."""

    model_path: Path
    precision: str
    backend: str = "onnxruntime"
    calibration: Path | None = None
    holdout: Path | None = None
    keep_fp32: Sequence[str] = ()
    tolerance: float | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    search: str = "nodes"  # or "op-types"
    int8_ops: str = "compute"  # or "all" (see precision.INT8_OP_TYPES)
    service: type[Service] | None = None
    model_name: str | None = None
    threads: int | None = None
    max_batch_size: int = 8
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PrecisionError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.backend not in BUILD_BACKENDS:
            raise PrecisionError(
                f"`splitserve build` prepares ONNX engines for {BUILD_BACKENDS}; the torch "
                "backend takes its precision from the module (Model options dtype='float16' "
                "or 'bfloat16')"
            )
        if self.search not in ("nodes", "op-types"):
            raise ValueError(f"search must be 'nodes' or 'op-types', got {self.search!r}")
        if self.service is not None and self.model_name is None:
            (self.model_name,) = self.service.declared_models()

    @property
    def gate_tolerance(self) -> float:
        """The largest relative error of an output: ``tolerance`` when given; else none
        when the service's agreement judges the build (the outputs' numbers are a proxy
        for what the service answers, and a strict one: OCR's recogniser reads the same
        text while a near tie between two classes flips in its softmax); else the
        precision's default."""
        if self.tolerance is not None:
            return self.tolerance
        if self.gated_by_agreement:
            return math.inf
        return DEFAULT_TOLERANCE[self.precision]

    @property
    def gated_by_agreement(self) -> bool:
        """The service's own ``agreement`` will judge held-out requests: a service that
        defines one, and request files (not tensors) to run it on."""
        if self.service is None or self.calibration is None:
            return False
        if self.service.agreement is Service.agreement:
            return False
        split = split_files(self.calibration, self.holdout)
        return not all(is_tensor_file(p) for p in split.calibration + split.holdout)

    @property
    def auto(self) -> bool:
        return "auto" in self.keep_fp32

    @property
    def fixed_keep(self) -> list[str]:
        return [k for k in self.keep_fp32 if k != "auto"]


@dataclass
class Artifact:
    """A built engine: the file its backend loads, and the build's report."""

    path: Path
    directory: Path
    report: dict[str, Any]
    reused: bool


@dataclass
class _Data:
    calibration: list[Batch]
    holdout: list[Batch]
    holdout_files: list[Path]
    reference_answers: list[Any]
    description: str


def _load_engine(spec: BuildSpec, path: Path, precision: str | None = None) -> Engine:
    """``path`` on the build's backend (TensorRT builds its plan beside it)."""
    model = ModelSpec(
        key=spec.model_name or path.stem,
        backend=spec.backend,
        source=str(path),
        precision=precision or spec.precision,
        max_batch_size=spec.max_batch_size,
        threads=spec.threads,
        options=spec.options,
    )
    return create_engine(model)


def _synthetic(engine: Engine, count: int) -> list[Batch]:
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(count):
        batch = engine.warmup_batch(1)
        batches.append(
            {
                k: rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v
                for k, v in batch.items()
            }
        )
    return batches


def _load_data(spec: BuildSpec, reference: Engine) -> _Data:
    names = [s.name for s in reference.inputs]
    if spec.calibration is None:
        if spec.precision == "int8":
            raise DataError("int8 needs calibration inputs: --calibration DIR")
        log.warning("%s", UNCALIBRATED_GATE)
        return _Data([], _synthetic(reference, SYNTHETIC_BATCHES), [], [], "random")
    split = split_files(spec.calibration, spec.holdout)
    if all(is_tensor_file(p) for p in split.calibration + split.holdout):
        return _Data(
            load_tensors(split.calibration, names),
            load_tensors(split.holdout, names),
            [],
            [],
            f"{len(split.calibration)} + {len(split.holdout)} tensor files",
        )
    if spec.service is None or spec.model_name is None:
        # request bodies (images...) need the service that turns them into inputs
        load_tensors(split.calibration + split.holdout, names)  # raises, saying so
        raise DataError("calibration and held-out folders must hold the same kind of files")
    captured, _ = capture_inputs(spec.service, split.calibration, engine_threads=spec.threads)
    held, answers = capture_inputs(spec.service, split.holdout, engine_threads=spec.threads)
    if not captured.get(spec.model_name) or not held.get(spec.model_name):
        raise DataError(
            f"the service never ran model {spec.model_name!r} on these requests "
            "(calibration and held-out sets must exercise it)"
        )
    return _Data(
        captured[spec.model_name],
        held[spec.model_name],
        split.holdout,
        answers,
        f"{len(split.calibration)} + {len(split.holdout)} requests through the service",
    )


class _Builder:
    def __init__(self, spec: BuildSpec, workdir: Path) -> None:
        import onnxruntime as ort

        # Graph rewrites (unused initialisers, QDQ folding) warn by the hundred: keep errors.
        ort.set_default_logger_severity(3)
        self.spec = spec
        self.workdir = workdir
        # The fp32 reference is the very graph the precision is applied to: folded, named,
        # and at the opset the precision needs (13 for int8's Q/DQ, 22 for bf16).
        source = upgrade_opset(onnx.load(spec.model_path), required_opset(spec.precision))
        self.source = name_nodes(fold_constants(source))
        self.source_path = workdir / "fp32.onnx"
        onnx.save(self.source, self.source_path)
        self.reference = _load_engine(spec, self.source_path, "fp32")
        self.data = _load_data(spec, self.reference)
        self.reference_outputs = run_batches(self.reference, self.data.holdout)
        self.attempts = 0

    def attempt(self, keep: Sequence[str]) -> tuple[Path, onnx.ModelProto, GateResult]:
        """Prepare with ``keep`` in fp32, load it on the backend, gate it."""
        self.attempts += 1
        resolved = resolve_keep(self.source, keep)
        prepared = apply_precision(
            self.source,
            self.spec.precision,
            resolved,
            self.data.calibration,
            self.workdir / "calibration-ranges.json",
            self.spec.int8_ops,
            self.spec.backend,
        )
        path = self.workdir / f"attempt-{self.attempts}" / "model.onnx"
        path.parent.mkdir()
        onnx.save(prepared, path)
        try:
            engine = _load_engine(self.spec, path)
        except Exception as exc:  # the backend lacks kernels for this precision
            raise PrecisionError(
                f"the {self.spec.backend} backend cannot load the {self.spec.precision} graph "
                f"on {device_name(self.spec.backend, self.spec.options)}: {exc}"
                + (
                    " (bf16 needs a GPU backend: tensorrt, or onnxruntime with CUDA)"
                    if self.spec.precision == "bf16"
                    else ""
                )
            ) from None
        outputs = compare_engines(self.reference_outputs, run_batches(engine, self.data.holdout))
        agreement = None
        if self.spec.service is not None and self.data.holdout_files:
            agreement = self._service_agreement(path)
        result = GateResult(self.spec.gate_tolerance, outputs, agreement, self.spec.min_agreement)
        return path, prepared, result

    def _service_agreement(self, path: Path) -> Any:
        from splitserve.runtime.inprocess import InProcessService

        assert self.spec.service is not None and self.spec.model_name is not None
        service = InProcessService(
            self.spec.service,
            engine_threads=self.spec.threads,
            artifacts={self.spec.model_name: path},
        )
        answers = [answer_of(service, p) for p in self.data.holdout_files]
        return service_agreement(service.service.agreement, self.data.reference_answers, answers)

    def ranked_candidates(self, candidate: onnx.ModelProto) -> list[str]:
        nodes = changed_nodes(self.source, self.spec.precision, self.spec.int8_ops)
        batches = (self.data.calibration or self.data.holdout)[:RANKING_BATCHES]
        from splitserve.engines.onnxruntime import default_providers

        # ONNX Runtime on the build's device (for TensorRT builds: its CUDA provider)
        providers = self.spec.options.get("providers") or default_providers()
        ranked = rank_layers(self.source, candidate, batches, nodes, providers)
        if self.spec.search == "op-types":
            ranked = group_by_op_type(self.source, ranked)
        fixed = set(self.spec.fixed_keep)
        return [name for name, _ in ranked if name not in fixed]


def _key_fields(spec: BuildSpec, data_digest: str) -> dict[str, Any]:
    return {
        "model": model_hash(spec.model_path),
        "precision": spec.precision,
        "keep_fp32": sorted(spec.keep_fp32),
        "search": spec.search,
        "int8_ops": spec.int8_ops if spec.precision == "int8" else None,
        "backend": spec.backend,
        # TensorRT's profile comes from these; other backends take any batch
        "max_batch_size": spec.max_batch_size if spec.backend == "tensorrt" else None,
        "shapes": spec.options.get("shapes") if spec.backend == "tensorrt" else None,
        "device": device_name(spec.backend, spec.options),
        "versions": cache.library_versions(),
        "data": data_digest,
        "tolerance": spec.gate_tolerance,
        "min_agreement": spec.min_agreement if spec.service else None,
        "service": f"{spec.service.__module__}:{spec.service.__qualname__}/{spec.model_name}"
        if spec.service
        else None,
    }


def model_hash(path: Path) -> str:
    """The hash of an ONNX model and of the external data files it names (exporters write
    large weights beside the graph, ``model.onnx.data``): new weights, a new cache entry."""
    graph = onnx.load(path, load_external_data=False).graph
    tensors = [*graph.initializer]
    tensors += [a.t for n in graph.node for a in n.attribute if a.type == a.TENSOR]
    locations = sorted(
        {
            entry.value
            for tensor in tensors
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )
    digests = [cache.file_hash(path), *(cache.file_hash(path.parent / loc) for loc in locations)]
    return digests[0] if len(digests) == 1 else cache.cache_key({"files": digests})


def _data_digest(spec: BuildSpec) -> str:
    if spec.calibration is None:
        return "synthetic"
    split = split_files(spec.calibration, spec.holdout)
    return files_digest(split.calibration) + ":" + files_digest(split.holdout)


def _entry(spec: BuildSpec, root: Path | None) -> tuple[dict[str, Any], Path]:
    """The cache key's fields for ``spec`` and the entry folder they name."""
    fields = _key_fields(spec, _data_digest(spec))
    directory = cache.entry_dir(spec.model_path.stem, spec.precision, cache.cache_key(fields), root)
    return fields, directory


def _cached(directory: Path) -> Artifact | None:
    report = cache.read_report(directory)
    if report is None or not (directory / "model.onnx").exists():
        return None
    return Artifact(directory / "model.onnx", directory, report, reused=True)


def find_cached(spec: BuildSpec, root: Path | None = None) -> Artifact | None:
    return _cached(_entry(spec, root)[1])


def build(spec: BuildSpec, *, root: Path | None = None, force: bool = False) -> Artifact:
    """The engine for ``spec``: from the cache, or built, gated and cached now.

    Processes asking for the same entry at once build it once (a lock per entry); the
    others wait and reuse it. Raises ``GateRejected`` (with the report) when no engine
    meets the tolerance.
    """
    fields, directory = _entry(spec, root)
    with cache.entry_lock(directory):
        if not force:
            cached = _cached(directory)
            if cached is not None:
                log.info("engine cache: reusing %s", cached.directory)
                return cached
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=directory.parent))
        try:
            report = _build_into(spec, staging, fields)
            report["build_s"] = round(time.monotonic() - started, 2)
            if not report["gate"]["passed"]:
                rejected = directory.with_name(directory.name + ".rejected.json")
                cache.write_report(rejected, report)
                note = report["gate"].get("note")
                raise GateRejected(
                    f"{spec.model_path.name} at {spec.precision} fails the accuracy gate: "
                    + "; ".join(report["gate"]["failures"])
                    + (f"\nnote: {note}" if note else "")
                    + f"\n(report: {rejected})",
                    report,
                )
            shutil.rmtree(staging / "work")  # the fp32 copy, every attempt: not the engine
            cache.write_report(staging / cache.REPORT, report)
            cache.publish(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("engine cache: built %s in %.1fs", directory, report["build_s"])
    return Artifact(directory / "model.onnx", directory, report, reused=False)


def _build_into(spec: BuildSpec, staging: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    work = staging / "work"
    work.mkdir()
    builder = _Builder(spec, work)
    path, prepared, result = builder.attempt(spec.fixed_keep)
    log.info("%s %s: %s", spec.model_path.name, spec.precision, result.summary())
    keep = list(spec.fixed_keep)
    search: dict[str, Any] | None = None
    if not result.passed and spec.auto:
        found_path: dict[str, Any] = {}

        def attempt(extra: list[str]) -> tuple[bool, str, onnx.ModelProto]:
            p, built, r = builder.attempt([*spec.fixed_keep, *extra])
            if r.passed:
                found_path[tuple(extra)] = (p, r)
            return r.passed, r.summary(), built

        def rank(built: onnx.ModelProto, kept: set[str]) -> list[str]:
            return [n for n in builder.ranked_candidates(built) if n not in kept]

        found = search_keep(attempt, rank, prepared)
        search = {"mode": spec.search, "probes": [vars(p) for p in found.probes]}
        if found.passed:
            path, result = found_path[tuple(found.extra)]
            keep = [*spec.fixed_keep, *found.extra]
    final = staging / "model.onnx"
    _save_optimised(spec, path, final)
    engine = _load_engine(spec, final)
    batches = builder.data.holdout
    fp32_ms, new_ms = compare_latency(builder.reference, engine, batches)
    kept_nodes = resolve_keep(builder.source, keep).node_names(builder.source)
    return {
        "model": str(spec.model_path),
        "service": fields["service"],
        "precision": spec.precision,
        "int8_ops": fields["int8_ops"],
        "backend": spec.backend,
        "device": fields["device"],
        "versions": fields["versions"],
        "key": cache.cache_key(fields),
        "data": builder.data.description,
        "keep_fp32_request": list(spec.keep_fp32),
        "kept_fp32": keep,
        "kept_fp32_nodes": len(kept_nodes),
        "nodes": len(builder.source.graph.node),
        "search": search,
        "gate": {
            **result.as_dict(),
            "inputs": builder.data.description,
            "note": UNCALIBRATED_GATE if builder.data.description == "random" else None,
        },
        "latency": {
            "batches": len(batches),
            "threads": spec.threads,
            "fp32_ms": round(fp32_ms, 3),
            "engine_ms": round(new_ms, 3),
            "speedup": round(fp32_ms / new_ms, 3) if new_ms > 0 else None,
        },
    }


def _save_optimised(spec: BuildSpec, source: Path, target: Path) -> None:
    """The artifact with ONNX Runtime's graph optimisations applied, saved (so engines
    skip that work on load); TensorRT optimises in its own builder from the plain graph."""
    if spec.backend != "onnxruntime" or not device_name(spec.backend, spec.options).startswith(
        "cpu:"
    ):  # GPU providers fuse differently: they optimise at load
        os.replace(source, target)
        return
    import onnxruntime as ort

    so = ort.SessionOptions()
    # Extended, not all: the saved graph stays free of layout changes tied to one CPU's
    # instruction set; those are redone (cheaply) at load.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), sess_options=so, providers=["CPUExecutionProvider"])
