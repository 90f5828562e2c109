"""How much of the OCR recogniser's int8 loss is its weights alone.

The recogniser's convolution weights are rounded to int8 (per output channel, as the
int8 builds do) or to fp16, and written back as fp32: activations stay fp32 and nothing
gets faster, so what changes is the rounding of the weights and nothing else. Measured
on generated documents (seed 2026, det and cls in fp32): the recogniser's output
against fp32's (relative L2 error of its probabilities) and the service's text lines
equal to fp32's.

    python benchmarks/ocr_rec_weights.py [--images 12]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnx
from onnx import numpy_helper

from examples.ocr.make_images import generate_documents
from examples.ocr.service import REC_MODEL, OCRService, text_lines_equal
from splitserve.compile.data import capture_inputs
from splitserve.compile.gate import output_error
from splitserve.compile.precision import fold_constants, name_nodes
from splitserve.engines.onnxruntime import OnnxRuntimeEngine


def int8_per_channel(w: np.ndarray) -> np.ndarray:
    scale = np.abs(w).reshape(w.shape[0], -1).max(1).reshape((-1,) + (1,) * (w.ndim - 1))
    scale = np.where(scale == 0, 1, scale / 127)
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)


def fp16(w: np.ndarray) -> np.ndarray:
    return w.astype(np.float16).astype(np.float32)


def with_rounded_conv_weights(model: onnx.ModelProto, rounding, path: Path) -> Path:
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    inits = {i.name: i for i in rounded.graph.initializer}
    for node in rounded.graph.node:
        if node.op_type == "Conv" and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(rounding(w), node.input[1]))
    onnx.save(rounded, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ocr-rec-weights-"))
    docs = generate_documents(work / "docs", args.images, seed=2026, truth=False)
    source = name_nodes(fold_constants(onnx.load(REC_MODEL)))
    fp32_path = work / "rec_fp32.onnx"
    onnx.save(source, fp32_path)
    captured, reference = capture_inputs(OCRService, docs, artifacts={"rec": fp32_path})
    batches = captured["rec"]
    ref_engine = OnnxRuntimeEngine(fp32_path)
    ref_out = [ref_engine.run_batch(b) for b in batches]
    print("| recogniser conv weights | output relative L2 error | lines equal to fp32 |")
    print("|---|---|---|")
    for label, rounding in (("fp16", fp16), ("int8 per channel", int8_per_channel)):
        path = with_rounded_conv_weights(source, rounding, work / f"rec_{label[:4]}.onnx")
        engine = OnnxRuntimeEngine(path)
        errors = [
            output_error(next(iter(r.values())), next(iter(engine.run_batch(b).values()))).rel_l2
            for r, b in zip(ref_out, batches, strict=True)
        ]
        _, answers = capture_inputs(OCRService, docs, artifacts={"rec": path})
        equal = total = 0
        for ref, new in zip(reference, answers, strict=True):
            e, t = text_lines_equal(
                [r["text"] for r in ref["results"]], [r["text"] for r in new["results"]]
            )
            equal, total = equal + e, total + t
        print(
            f"| {label} | {max(errors):.3f} (worst batch) | {equal}/{total} ({equal / total:.1%}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
