"""A detector on the SIMULATED accelerator, with heavy Python pre/post-processing.

The shape of many production vision services: decode and resize a photo, run a fast
detector on an accelerator, then decode boxes and run non-maximum suppression in
Python. The accelerator here is splitserve's simulated one (t = a + b * batch, no CPU
while it runs), so the service shows, on any machine, what the split architecture is
for: the Python work spreads over CPU worker processes instead of queueing on one GIL,
and the device sees batches instead of one request at a time.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

import splitserve

SIZE = 320
CANDIDATES = 600  # ~35 ms of Python NMS per request, ~6 ms of decode + resize
SCORE_THRESHOLD = 0.0  # the simulated scores are standard normal: about half pass
IOU_THRESHOLD = 0.5


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(boxes: list[tuple[float, float, float, float]], scores: list[float]) -> list[int]:
    """Greedy non-maximum suppression, in plain Python as many services write it."""
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
    kept: list[int] = []
    for i in order:
        if all(iou(boxes[i], boxes[k]) < IOU_THRESHOLD for k in kept):
            kept.append(i)
    return kept


class SimulatedDetector(splitserve.Service):
    name = "simdet"
    model = splitserve.Model(
        backend="simulated",
        max_batch_size=32,
        max_delay_ms=2.0,
        options={
            "inputs": {"images": {"shape": [None, 3, SIZE, SIZE], "dtype": "float32"}},
            "outputs": {
                "boxes": {"shape": [None, CANDIDATES, 4], "dtype": "float32"},
                "scores": {"shape": [None, CANDIDATES], "dtype": "float32"},
            },
            # a small detector on a data-centre GPU, fp16 (to calibrate: benchmarks/gpu)
            "latency_ms": [3.0, 0.3],
        },
    )

    def preprocess(self, request: splitserve.Request) -> dict[str, np.ndarray]:
        img = Image.fromarray(request.image(mode="RGB")).resize((SIZE, SIZE), Image.BILINEAR)
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        x = (x - 0.45) / 0.225
        return {"images": x[None]}

    def postprocess(self, outputs: splitserve.Tensors, request: splitserve.Request) -> Any:
        raw_boxes = outputs["boxes"][0].tolist()
        raw_scores = outputs["scores"][0].tolist()
        boxes, scores = [], []
        for (cx, cy, w, h), score in zip(raw_boxes, raw_scores, strict=True):
            if score < SCORE_THRESHOLD:
                continue
            cx, cy = (cx + 3) / 6 * SIZE, (cy + 3) / 6 * SIZE
            w, h = abs(w) * SIZE / 8 + 1, abs(h) * SIZE / 8 + 1
            boxes.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
            scores.append(score)
        kept = nms(boxes, scores)
        return {
            "simulated_accelerator": True,
            "detections": [
                {"box": [round(v, 1) for v in boxes[i]], "score": round(scores[i], 4)} for i in kept
            ],
        }


def photo(seed: int, size: tuple[int, int] = (640, 480)) -> bytes:
    """A photo-like JPEG (gradients and noise), for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
    img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG", quality=90)
    return out.getvalue()
