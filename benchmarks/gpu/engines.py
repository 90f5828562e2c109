"""Engine-only throughput of the PyTorch backend by precision: fp32 eager against fp16
with CUDA graphs (and fp16 eager, to separate the two effects), at batch 1, 8 and 32.

The network is examples/vision's ResNet-50-like CNN at 224x224. Each configuration runs
in its own child process (a fresh CUDA context; a crash loses one row, not the run),
warms up, then times ``engine.infer`` (host numpy in, host numpy out: the copies a
served batch pays are included) for ``--seconds`` per batch size. Every fp16 engine's
logits are checked against the fp32 engine's on the same inputs (top-1 agreement and
relative error), so a fast but wrong engine shows. Fits in 5 minutes on one H100/H200
(about 2 minutes there); writes ``gpu_engines.json`` and ``gpu_engines.md`` to ``--out``
(or ``$OUT``).

``--dry-run`` runs the same code on the CPU with the tiny CNN (fp32 eager against
bfloat16 eager; CUDA graphs do not exist there), for the tests and for a first look.

    python benchmarks/gpu/engines.py [--dry-run] [--out DIR] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import time_calls  # noqa: E402

BATCHES = (1, 8, 32)
GPU_CONFIGS = {
    "fp32 eager": {"dtype": "float32", "cuda_graphs": False},
    "fp16 eager": {"dtype": "float16", "cuda_graphs": False},
    "fp16 + CUDA graphs": {"dtype": "float16", "cuda_graphs": True, "channels_last": True},
}
CPU_CONFIGS = {
    "fp32 eager": {"dtype": "float32"},
    "bf16 eager": {"dtype": "bfloat16"},
}


def _engine(config: dict[str, Any], dry_run: bool, max_batch: int) -> Any:
    from examples.vision.service import TENSORS
    from splitserve.engines.torch import TorchEngine

    size = 32 if dry_run else 224
    inputs = {"images": {"shape": [None, 3, size, size], "dtype": "float32"}}
    outputs = {"logits": {"shape": [None, 10 if dry_run else 1000], "dtype": "float32"}}
    options = {
        "inputs": inputs if dry_run else TENSORS["inputs"],
        "outputs": outputs if dry_run else TENSORS["outputs"],
        "device": "cpu" if dry_run else "cuda",
        **config,
    }
    target = "examples.vision.model:tiny_resnet" if dry_run else "examples.vision.model:resnet50"
    return TorchEngine(target, options, max_batch_size=max_batch, threads=None)


def child(name: str, dry_run: bool, seconds: float, out: Path) -> None:
    """One configuration, all batch sizes; logits of a fixed batch saved for the check."""
    import numpy as np

    configs = CPU_CONFIGS if dry_run else GPU_CONFIGS
    began = time.monotonic()
    engine = _engine(configs[name], dry_run, max(BATCHES))
    load_s = time.monotonic() - began
    size = 32 if dry_run else 224
    rng = np.random.default_rng(0)
    rows = []
    for batch in BATCHES:
        x = {"images": rng.standard_normal((batch, 3, size, size), dtype=np.float32)}
        times = time_calls(lambda x=x: engine.run_batch(x), seconds, 50_000)
        rows.append(
            {
                "batch": batch,
                "iterations": len(times),
                "median_ms": statistics.median(times) * 1000,
                "images_per_s": batch / statistics.median(times),
            }
        )
    check = np.random.default_rng(1).standard_normal((8, 3, size, size), dtype=np.float32)
    logits = engine.run_batch({"images": check})["logits"]
    np.save(out.with_suffix(".npy"), logits)
    info: dict[str, Any] = {"config": name, "options": configs[name], "load_s": load_s}
    import torch

    info["torch"] = torch.__version__
    if torch.cuda.is_available() and not dry_run:
        info["device"] = torch.cuda.get_device_name(0)
    out.write_text(json.dumps({"info": info, "rows": rows}))


def _agreement(reference: Any, other: Any) -> dict[str, float]:
    import numpy as np

    rel = float(np.linalg.norm(other - reference) / np.linalg.norm(reference))
    top1 = float((other.argmax(1) == reference.argmax(1)).mean())
    return {"relative_l2_vs_fp32": rel, "top1_agree_vs_fp32": top1}


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Engine-only throughput ({report['device']}; images/s, median per call; "
        f"{'DRY RUN on the CPU' if report['dry_run'] else 'GPU'})",
        "",
        "| configuration | " + " | ".join(f"batch {b}" for b in BATCHES) + " | vs fp32 |",
        "|---|" + "---|" * len(BATCHES) + "---|",
    ]
    base = {r["batch"]: r["images_per_s"] for r in report["configs"][0]["rows"]}
    for entry in report["configs"]:
        cells = []
        for row in entry["rows"]:
            ratio = row["images_per_s"] / base[row["batch"]]
            cells.append(f"{row['images_per_s']:.0f} (x{ratio:.2f}, {row['median_ms']:.2f} ms)")
        check = entry.get("check") or {}
        agree = (
            f"rel {check['relative_l2_vs_fp32']:.1e}, top-1 {check['top1_agree_vs_fp32']:.0%}"
            if check
            else "reference"
        )
        lines.append(f"| {entry['info']['config']} | " + " | ".join(cells) + f" | {agree} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny CNN, fp32 vs bf16")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per batch")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (0.3 if args.dry_run else 8.0)
    if args.child:
        child(args.child, args.dry_run, seconds, args.child_out)
        return 0
    out_dir = args.out or Path(os.environ.get("OUT") or "/tmp/gpu-engines")
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = CPU_CONFIGS if args.dry_run else GPU_CONFIGS
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    import numpy as np

    report: dict[str, Any] = {"dry_run": args.dry_run, "configs": [], "failed": {}}
    reference = None
    for name in configs:
        target = out_dir / f"engine_{name.replace(' ', '_').replace('+', 'and')}.json"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--child-out",
            str(target),
            "--seconds",
            str(seconds),
        ] + (["--dry-run"] if args.dry_run else [])
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
        if done.returncode != 0:
            report["failed"][name] = done.stderr[-2000:]
            print(f"{name}: FAILED\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        entry = json.loads(target.read_text())
        logits = np.load(target.with_suffix(".npy"))
        if reference is None:
            reference = logits
        else:
            entry["check"] = _agreement(reference, logits)
        report["configs"].append(entry)
        print(f"{name}: done", file=sys.stderr)
    if not report["configs"]:
        return 1
    report["device"] = report["configs"][0]["info"].get("device", "CPU")
    table = render(report)
    (out_dir / "gpu_engines.json").write_text(json.dumps(report, indent=2))
    (out_dir / "gpu_engines.md").write_text(table)
    print(table)
    return 0 if not report["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
