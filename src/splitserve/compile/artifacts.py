"""The engines a server's services ask for, built or reused before engines load."""

from __future__ import annotations

import logging

from splitserve.compile.builder import BuildSpec, build
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


def prepare_artifacts(classes: dict[str, type[Service]]) -> dict[str, str]:
    """Build or reuse every engine the services ask for: ``service/model`` -> file.

    Runs before any engine loads; a build the gate rejects stops the server with the
    reason (never a silent fp32 fallback).
    """
    artifacts: dict[str, str] = {}
    for svc, cls in classes.items():
        for name, model in cls.declared_models().items():
            if not model.needs_build:
                continue
            spec = spec_for(cls, name, model)
            artifact = build(spec)
            gate = artifact.report["gate"]
            log.info(
                "%s/%s: %s %s engine %s (%s; kept in fp32: %s)",
                svc,
                name,
                "reusing cached" if artifact.reused else "built",
                model.precision,
                artifact.directory,
                _gate_line(gate),
                ", ".join(artifact.report["kept_fp32"]) or "nothing",
            )
            artifacts[f"{svc}/{name}"] = str(artifact.path)
    return artifacts


def _gate_line(gate: dict) -> str:
    worst = max((float(o["rel_l2"]) for o in gate["outputs"].values()), default=0.0)
    line = f"worst relative error {worst:.3g}"
    if gate.get("agreement"):
        a = gate["agreement"]
        line += f", agreement {a['matching']}/{a['total']}"
    return line
