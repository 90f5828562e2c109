"""``splitserve build``: prepare, gate and cache an engine at a precision.

Only argparse is imported at parse time; onnx, onnxruntime and the quantiser load when
a build runs.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

DESCRIPTION = """\
Prepare an engine at a precision (fp16/bf16 casts or int8 Q/DQ written into the ONNX
graph), gate it against fp32 on held-out inputs, and store it in the engine cache."""

EPILOG = """\
examples:
  splitserve build model.onnx --precision fp16 --calibration inputs/      # .npy/.npz
  splitserve build --service examples.ocr.service:OCRService --model rec \\
      --precision int8 --calibration pages/ --keep-fp32 auto
  splitserve build model.onnx --precision fp16 --keep-fp32 Softmax LayerNormalization

Every build is compared with fp32 on held-out inputs (--holdout DIR, or 1 file in 4 of
--calibration) and refused when an output's relative error (RMS of the difference over
max(RMS of fp32's output, 1e-3)) exceeds --tolerance or, with --service and request
files, when the service's own agreement (OCR: 1 - CER against fp32) falls under
--min-agreement; the agreement then decides alone unless --tolerance is given. Without
--calibration the gate judges random inputs: it shows the graph runs, no more.
`--keep-fp32 auto` then searches for layers to keep in fp32. The engine lands in the
cache (SPLITSERVE_CACHE_DIR, default ~/.cache/splitserve) with report.json.
A server whose Model declares a precision builds the same entry as
`splitserve build --service module:Class --model NAME` with that declaration, and reuses
it; plain `splitserve build model.onnx` makes engines for --output and inspection."""


HELP = "build a gated fp16/bf16/int8 engine into the engine cache"


def configure(p: argparse.ArgumentParser) -> None:
    """The options of ``splitserve build`` (the subcommand is made by splitserve.cli)."""
    p.add_argument("model", nargs="?", help="ONNX model (or take it from --service/--model)")
    p.add_argument("--service", help="service class module:Class whose model is built")
    p.add_argument("--model", dest="model_name", help="the service's model name")
    p.add_argument("--precision", required=True, choices=["fp32", "fp16", "bf16", "int8"])
    p.add_argument("--backend", default=None, choices=["onnxruntime", "tensorrt", "torch"])
    p.add_argument("--calibration", type=Path, help="folder of .npy/.npz inputs or requests")
    p.add_argument("--holdout", type=Path, help="held-out inputs for the gate (default 1 in 4)")
    p.add_argument(
        "--keep-fp32",
        nargs="*",
        default=None,
        metavar="NODE_OR_OPTYPE",
        help="node names or op types kept in fp32; 'auto' searches for more",
    )
    p.add_argument("--search", choices=["nodes", "op-types"], default="nodes")
    p.add_argument(
        "--int8-ops",
        choices=["compute", "all"],
        default=None,
        help="int8 for Conv/MatMul/Gemm only (default), or for every layer that can be",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        help="largest relative error of any output (default: the precision's, or none "
        "when a service agreement judges the build)",
    )
    p.add_argument("--min-agreement", type=float, default=None, help="service agreement ratio")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads while gating")
    p.add_argument("--output", type=Path, help="also copy the built model here")
    p.add_argument("--report", type=Path, help="also write the JSON report here")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")


def run(args: argparse.Namespace) -> int:
    try:
        from splitserve.compile.builder import BuildSpec, GateRejected, build
    except ModuleNotFoundError as exc:  # the message says which extra to install
        print(f"splitserve build: {exc}", file=sys.stderr)
        return 2
    from splitserve.compile.data import DataError
    from splitserve.compile.precision import PrecisionError
    from splitserve.engines.tensorrt import TensorRTUnavailable

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        spec = _spec(args, BuildSpec)
        artifact = build(spec, force=args.force)
    except GateRejected as exc:
        _write_report(args.report, exc.report)
        print(f"rejected: {exc}", file=sys.stderr)
        return 1
    except (
        PrecisionError,
        DataError,
        TensorRTUnavailable,
        ValueError,
        FileNotFoundError,
        ImportError,
        RuntimeError,  # a backend's own failure (TensorRT parse/build, ONNX Runtime load)
    ) as exc:
        print(f"splitserve build: {exc}", file=sys.stderr)
        return 2
    report = artifact.report
    _write_report(args.report, report)
    if args.output:
        shutil.copyfile(artifact.path, args.output)
    latency = report["latency"]
    print(
        f"{'reused' if artifact.reused else 'built'} {artifact.path}\n"
        f"  kept in fp32: {', '.join(report['kept_fp32']) or 'nothing'} "
        f"({report['kept_fp32_nodes']} of {report['nodes']} nodes)\n"
        f"  gate: {'passed' if report['gate']['passed'] else 'FAILED'}; "
        f"latency {latency['fp32_ms']} -> {latency['engine_ms']} ms per batch "
        f"(x{latency['speedup']})"
    )
    if report["gate"].get("note"):
        print(f"  note: {report['gate']['note']}")
    return 0


def _spec(args: argparse.Namespace, spec_cls: type):
    keep = tuple(args.keep_fp32 or ())
    if args.service:
        from splitserve.compile.artifacts import spec_for
        from splitserve.service import load_service

        cls = load_service(args.service)
        models = cls.declared_models()
        name = args.model_name or (next(iter(models)) if len(models) == 1 else None)
        if name not in models:
            raise ValueError(f"--model must name one of {sorted(models)}")
        spec = spec_for(cls, name, models[name])
        spec.precision = args.precision
        if args.model:
            spec.model_path = Path(args.model)
        if args.backend:
            spec.backend = args.backend
        if args.calibration:
            spec.calibration = args.calibration
        if args.keep_fp32 is not None:
            spec.keep_fp32 = keep
        spec.tolerance = args.tolerance if args.tolerance is not None else spec.tolerance
    else:
        if not args.model:
            raise ValueError("name an ONNX model, or --service module:Class --model NAME")
        spec = spec_cls(
            model_path=Path(args.model),
            precision=args.precision,
            backend=args.backend or "onnxruntime",
            calibration=args.calibration,
            keep_fp32=keep,
            tolerance=args.tolerance,
        )
    spec.holdout = args.holdout
    spec.search = args.search
    if args.int8_ops is not None:
        spec.int8_ops = args.int8_ops
    spec.threads = args.threads if args.threads is not None else spec.threads
    if args.min_agreement is not None:
        spec.min_agreement = args.min_agreement
    spec.__post_init__()  # re-validate after the overrides
    if not spec.model_path.exists():
        raise FileNotFoundError(f"no model at {spec.model_path}")
    return spec


def _write_report(path: Path | None, report: dict) -> None:
    if path is not None:
        from splitserve.compile.cache import write_report

        write_report(path, report)
