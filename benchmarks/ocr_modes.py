"""OCR demo: threaded mode against split mode, same images, same load, one run.

Each server configuration is started, checked (its answers must equal RapidOCR's on
the benchmark images), loaded in a closed loop at each concurrency, and stopped before
the next one starts, so they never share the cores.

    python benchmarks/ocr_modes.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadgen import machine
from modes import print_summary, run_configs, summarise

from examples.ocr.compare import compare_ocr
from examples.ocr.make_images import generate_documents

OCR = "examples.ocr.service:OCRService"

# name -> extra `splitserve serve` arguments
CONFIGS: dict[str, list[str]] = {
    "threaded, 8 threads": ["--mode", "threaded", "--threads", "8"],
    "threaded, 2 threads": ["--mode", "threaded", "--threads", "2"],
    "split, 1 CPU worker": ["--cpu-workers", "1", "--worker-concurrency", "8"],
    "split, 2 CPU workers": ["--cpu-workers", "2", "--worker-concurrency", "8"],
    "split, 3 CPU workers": ["--cpu-workers", "3", "--worker-concurrency", "6"],
    "split, 2 CPU workers, 2 engines x 1 thread": [
        "--cpu-workers",
        "2",
        "--worker-concurrency",
        "8",
        "--engine-replicas",
        "2",
        "--engine-threads",
        "1",
    ],
    "split, 1 CPU worker, 2 engines x 1 thread": [
        "--cpu-workers",
        "1",
        "--worker-concurrency",
        "16",
        "--engine-replicas",
        "2",
        "--engine-threads",
        "1",
    ],
}


def check_answers(url: str, images: list[bytes], references: list[Any]) -> float:
    """Every image's answer equals RapidOCR's; returns the largest score difference."""
    worst = 0.0
    for data, ref in zip(images, references, strict=True):
        req = urllib.request.Request(
            url, data=data, method="POST", headers={"Content-Type": "image/jpeg"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            diff = compare_ocr(json.loads(resp.read()), ref)
        if not diff["equivalent"]:
            raise AssertionError(f"answer differs from RapidOCR: {diff}")
        worst = max(worst, diff["max_score_diff"])
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    duration, warmup = (4.0, 2.0) if args.quick else (args.duration, 5.0)

    from rapidocr_onnxruntime import RapidOCR

    paths = generate_documents(Path(tempfile.mkdtemp(prefix="ocr-bench-")), args.images, seed=11)
    images = [p.read_bytes() for p in paths]
    reference_engine = RapidOCR()
    references = [reference_engine(data) for data in images]
    del reference_engine

    rows = run_configs(
        OCR,
        "ocr",
        {name: CONFIGS[name] for name in args.configs},
        images,
        "image/jpeg",
        args.concurrency,
        rounds=args.rounds,
        duration_s=duration,
        warmup_s=warmup,
        check=lambda url: {"max_score_diff": check_answers(url, images, references)},
    )
    summary = summarise(rows)
    print(f"\nmedians over {args.rounds} round(s), {duration:.0f} s measured each")
    print_summary(summary)
    print(f"largest score difference from RapidOCR: {max(r['max_score_diff'] for r in rows):.5f}")
    if args.json:
        out = {"machine": machine(), "images": len(images), "summary": summary, "rows": rows}
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
