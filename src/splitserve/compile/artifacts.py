"""The engines a server's services ask for, built or reused before engines load."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from splitserve.compile.builder import BuildSpec, GateRejected, build
from splitserve.layout import Declaration
from splitserve.service import Model, Service

log = logging.getLogger("splitserve.compile")


def spec_for(cls: type[Service], name: str, model: Model) -> BuildSpec:
    """The build a service's model declares (paths relative to the service's module)."""
    return BuildSpec(
        model_path=cls.model_path(model),
        precision=model.precision,
        backend=model.backend,
        calibration=cls.model_path(model, model.calibration) if model.calibration else None,
        keep_fp32=model.keep_fp32,
        tolerance=model.tolerance,
        min_agreement=model.min_agreement,
        int8_ops=model.int8_ops,
        service=cls,
        model_name=name,
        threads=model.threads,
        max_batch_size=model.max_batch_size,
        options=model.options,
    )


def build_engines(models: Mapping[str, Declaration]) -> dict[str, str]:
    """Build or reuse (engine cache) every engine the served models ask for, before any
    loads: ``service/model`` -> the file its engine loads.

    A build the accuracy gate refuses stops the server with the reason: a server never
    falls back to fp32 quietly.
    """
    from splitserve.compile.data import DataError
    from splitserve.compile.precision import PrecisionError
    from splitserve.engines.tensorrt import TensorRTUnavailable

    try:
        return prepare_artifacts(models)
    except (GateRejected, DataError, PrecisionError, TensorRTUnavailable) as exc:
        raise SystemExit(f"splitserve: cannot build an engine: {exc}") from None


def prepare_artifacts(models: Mapping[str, Declaration]) -> dict[str, str]:
    """Build or reuse every engine the models ask for: ``service/model`` -> file."""
    artifacts: dict[str, str] = {}
    for key, decl in models.items():
        model = decl.model
        if model.needs_build:
            spec = spec_for(decl.service, decl.key.model, model)
            artifact = build(spec)
            gate = artifact.report["gate"]
            log.info(
                "%s: %s %s engine %s (%s; kept in fp32: %s)",
                key,
                "reusing cached" if artifact.reused else "built",
                model.precision,
                artifact.directory,
                _gate_line(gate),
                ", ".join(artifact.report["kept_fp32"]) or "nothing",
            )
            artifacts[key] = str(artifact.path)
    return artifacts


def _gate_line(gate: dict) -> str:
    worst = max((float(o["rel_l2"]) for o in gate["outputs"].values()), default=0.0)
    line = f"worst relative error {worst:.3g}"
    if gate.get("agreement"):
        a = gate["agreement"]
        line += f", agreement {a['matching']}/{a['total']}"
    return line
