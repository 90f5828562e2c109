"""OCR on int8 engines against fp32, same server layout, same load, one run.

1. Documents: a calibration set (seed 1001) for the builds, and a test set (seed 2026,
   with ground truth) that no build sees.
2. Builds (engine cache; reused when present): det and rec at int8 for
   ``examples.ocr.int8:OCRInt8`` (gated: >= 98% character agreement with fp32 on held-out
   pages, i.e. a character error rate against fp32's text of <= 2%; fp32 layers
   searched) and ``OCRInt8Ungated`` (every Conv/MatMul int8). Each build's report (kept
   layers, gate, engine latency) is printed.
3. Each service is served alone in split mode (1 CPU worker, 2 single-thread engine
   replicas: the best fp32 layout measured here), its answers on the test set are
   compared with the fp32 server's (character error rate, CER: the edit distance of
   each page's text, lines in reading order joined by newlines, over its characters;
   and, for reference, whole lines equal) and with the documents' ground truth (CER),
   and it is loaded in a closed loop.
4. A reference for how stable the fp32 pipeline itself is: the fp32 answers on the test
   images with +-1 grey level of noise added, compared the same way.

    python benchmarks/ocr_int8.py [--quick] [--rounds N] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from loadgen import machine
from modes import print_summary, run_configs, summarise
from ocr_modes import CONFIGS

from examples.ocr.compare import character_errors, truth_lines
from examples.ocr.make_images import generate_documents, load_truth
from examples.ocr.service import text_lines_equal

CALIBRATION_DIR = Path(__file__).resolve().parent.parent / "examples" / "ocr" / "calibration"
LAYOUT = CONFIGS["split, 1 CPU worker, 2 engines x 1 thread"]  # the best fp32 layout
SERVICES = {
    "fp32": ("examples.ocr.service:OCRService", "ocr"),
    "int8 gated (auto fp32 layers, >= 98% characters)": ("examples.ocr.int8:OCRInt8", "ocr-int8"),
    "int8 ungated (all Conv/MatMul)": ("examples.ocr.int8:OCRInt8Ungated", "ocr-int8-ungated"),
    "int8 ungated (every layer that can be)": (
        "examples.ocr.int8:OCRInt8AllUngated",
        "ocr-int8-all-ungated",
    ),
}


def build_all(names: list[str]) -> dict[str, Any]:
    """Build (or reuse) every int8 engine the services declare; their reports."""
    from splitserve.compile.artifacts import spec_for
    from splitserve.compile.builder import build
    from splitserve.service import load_service

    reports = {}
    for name in names:
        spec_name, _ = SERVICES[name]
        cls = load_service(spec_name)
        for model_name, model in cls.declared_models().items():
            if not model.needs_build:
                continue
            artifact = build(spec_for(cls, model_name, model))
            r = artifact.report
            reports[f"{name}/{model_name}"] = r
            agreement = r["gate"]["agreement"] or {}
            print(
                f"{name} / {model_name}: {'reused' if artifact.reused else 'built'}; kept fp32 "
                f"{r['kept_fp32_nodes']} of {r['nodes']} nodes; held-out character agreement "
                f"{agreement.get('matching')}/{agreement.get('total')} "
                f"({agreement.get('ratio', float('nan')):.2%}); engine "
                f"{r['latency']['fp32_ms']:.1f} -> {r['latency']['engine_ms']:.1f} ms/batch "
                f"(x{r['latency']['speedup']})",
                flush=True,
            )
    return reports


def answers(url: str, images: list[bytes]) -> list[list[str]]:
    texts = []
    for data in images:
        req = urllib.request.Request(
            url, data=data, method="POST", headers={"Content-Type": "image/jpeg"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            texts.append([r["text"] for r in json.loads(resp.read())["results"]])
    return texts


def cer(reference: list[list[str]], other: list[list[str]]) -> dict[str, Any]:
    """The character error rate of ``other``'s pages against ``reference``'s, over the
    whole set (summed edit distances / summed reference characters)."""
    errors = characters = 0
    for ref, new in zip(reference, other, strict=True):
        e, c = character_errors(ref, new)
        errors, characters = errors + e, characters + c
    return {"errors": errors, "characters": characters, "cer": errors / max(characters, 1)}


def line_agreement(reference: list[list[str]], other: list[list[str]]) -> dict[str, Any]:
    """Whole lines read alike (the earlier, stricter measure), for reference."""
    equal = total = 0
    for ref, new in zip(reference, other, strict=True):
        e, t = text_lines_equal(ref, new)
        equal, total = equal + e, total + t
    return {"lines_equal": equal, "lines": total, "ratio": equal / total if total else 1.0}


def noisy(data: bytes, seed: int) -> bytes:
    """The image with +-1 grey level of uniform noise, saved losslessly (PNG)."""
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)
    img += np.random.default_rng(seed).integers(-1, 2, img.shape, dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--duration", type=float, default=40.0, help="measured seconds")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8])
    parser.add_argument("--images", type=int, default=32, help="test documents (>= 30)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(SERVICES), choices=list(SERVICES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    duration, warmup = (5.0, 2.0) if args.quick else (args.duration, 8.0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("splitserve").setLevel(logging.INFO)

    if not CALIBRATION_DIR.is_dir():
        generate_documents(CALIBRATION_DIR, 16, seed=1001, truth=False)
    reports = build_all([n for n in args.configs if n != "fp32"])

    test_dir = Path(tempfile.mkdtemp(prefix="ocr-int8-test-"))
    paths = generate_documents(test_dir, args.images, seed=2026)
    images = [p.read_bytes() for p in paths]
    truths = [load_truth(p) for p in paths]
    texts: dict[str, list[list[str]]] = {}

    def check(url: str) -> dict[str, Any]:
        name = next(n for n, (_, route) in SERVICES.items() if url.endswith("/" + route))
        texts[name] = answers(url, images)
        if name == "fp32":
            texts["fp32, +-1 grey level noise"] = answers(
                url, [noisy(d, i) for i, d in enumerate(images)]
            )
        return {}

    configs = {name: [SERVICES[name][0], *LAYOUT] for name in args.configs}
    routes = {name: SERVICES[name][1] for name in args.configs}
    rows = run_configs(
        None,
        routes,
        configs,
        images,
        "image/jpeg",
        args.concurrency,
        rounds=args.rounds,
        duration_s=duration,
        warmup_s=warmup,
        check=check,
    )
    summary = summarise(rows)
    print(f"\nmedians over {args.rounds} round(s), {duration:.0f} s measured each")
    print_summary(summary, baseline_prefix="fp32")
    fp32_rps = {r["concurrency"]: r["rps"] for r in summary if r["config"] == "fp32"}
    accuracy = {}
    print(
        "\n| configuration | CER vs fp32 (agreement = 1 - CER) | CER vs ground truth "
        "| lines equal to fp32 |"
    )
    print("|---|---|---|---|")
    truth_texts = [truth_lines(t) for t in truths]
    for name, got in texts.items():
        vs_fp32 = cer(texts["fp32"], got) if "fp32" in texts else {}
        vs_truth = cer(truth_texts, got)
        lines = line_agreement(texts["fp32"], got) if "fp32" in texts else {}
        accuracy[name] = {"vs_fp32": vs_fp32, "vs_truth": vs_truth, "lines": lines}
        print(
            f"| {name} | {vs_fp32.get('cer', float('nan')):.2%} "
            f"({vs_fp32.get('errors')}/{vs_fp32.get('characters')}) "
            f"| {vs_truth['cer']:.2%} ({vs_truth['errors']}/{vs_truth['characters']}) "
            f"| {lines.get('lines_equal')}/{lines.get('lines')} ({lines.get('ratio', 0):.1%}) |"
        )
    for r in summary:
        if r["config"] != "fp32" and r["concurrency"] in fp32_rps:
            print(
                f"{r['config']} c={r['concurrency']}: x{r['rps'] / fp32_rps[r['concurrency']]:.2f}"
                " requests/s vs fp32"
            )
    if args.json:
        out = {
            "machine": machine(),
            "images": len(images),
            "summary": summary,
            "rows": rows,
            "accuracy": accuracy,
            "builds": reports,
            "median_rps": {r["config"]: statistics.median(r["rps_all"]) for r in summary},
        }
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
