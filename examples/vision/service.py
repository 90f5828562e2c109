"""Image classification: 1080p JPEG in, a ResNet-50-like CNN on the GPU, top-5 out.

The classic vision service the split architecture is for: the CPU decodes a full-HD
JPEG (the largest cost per request), resizes and normalises it; the GPU runs the CNN in
fp16; the CPU takes the top-5 of the logits. Which model runs is chosen when the module
is imported, by environment variables that the server's processes inherit:

- ``SPLITSERVE_VISION_BACKEND``: ``torch`` (default; the CNN of ``examples/vision/model.py``
  on PyTorch) or ``simulated`` (splitserve's simulated accelerator: no GPU, no torch,
  every answer says so; what ``benchmarks/gpu/run.py --dry-run`` uses);
- ``SPLITSERVE_VISION_DEVICE``: ``cuda`` (default: fp16, CUDA graphs, channels-last) or
  ``cpu`` (fp32, eager; slow, for checks on machines without a GPU);
- ``SPLITSERVE_VISION_LATENCY_MS``: ``a,b`` for the simulated model's
  ``t(batch) = a + b * batch`` (default below; ``benchmarks/gpu/run.py`` measures it).

    SPLITSERVE_VISION_BACKEND=simulated splitserve serve examples.vision.service:Classify
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

import splitserve

SIZE = 224  # the network's input
RESIZE = 256  # the shorter side before the centre crop (the usual ImageNet evaluation)
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
NUM_CLASSES = 1000
TOP_K = 5
MAX_BATCH = 32
# ResNet-50 fp16 on a data-centre GPU, a placeholder until benchmarks/gpu/run.py measures it.
DEFAULT_LATENCY_MS = (1.0, 0.2)

BACKEND = os.environ.get("SPLITSERVE_VISION_BACKEND", "torch")
DEVICE = os.environ.get("SPLITSERVE_VISION_DEVICE", "cuda")
if BACKEND not in ("torch", "simulated"):
    raise ValueError(f"SPLITSERVE_VISION_BACKEND must be 'torch' or 'simulated', got {BACKEND!r}")


def _latency_ms() -> list[float]:
    raw = os.environ.get("SPLITSERVE_VISION_LATENCY_MS")
    if not raw:
        return list(DEFAULT_LATENCY_MS)
    a, b = (float(v) for v in raw.split(","))
    return [a, b]


TENSORS = {
    "inputs": {"images": {"shape": [None, 3, SIZE, SIZE], "dtype": "float32"}},
    "outputs": {"logits": {"shape": [None, NUM_CLASSES], "dtype": "float32"}},
}
ON_GPU = DEVICE != "cpu"
TORCH_MODEL = splitserve.Model(
    "examples.vision.model:resnet50",
    backend="torch",
    max_batch_size=MAX_BATCH,
    max_delay_ms=2.0,
    options={
        **TENSORS,
        "device": DEVICE,
        "dtype": "float16" if ON_GPU else "float32",
        "cuda_graphs": ON_GPU,
        "channels_last": ON_GPU,
    },
)
SIMULATED_MODEL = splitserve.Model(
    backend="simulated",
    max_batch_size=MAX_BATCH,
    max_delay_ms=2.0,
    options={**TENSORS, "latency_ms": _latency_ms()},
)


class Classify(splitserve.Service):
    name = "vision"
    model = TORCH_MODEL if BACKEND == "torch" else SIMULATED_MODEL

    def preprocess(self, request: splitserve.Request) -> dict[str, np.ndarray]:
        img = Image.fromarray(request.image(mode="RGB"))  # pixel limit checked, then decoded
        scale = RESIZE / min(img.size)
        width, height = round(img.width * scale), round(img.height * scale)
        img = img.resize((width, height), Image.BILINEAR)
        left, top = (width - SIZE) // 2, (height - SIZE) // 2
        img = img.crop((left, top, left + SIZE, top + SIZE))
        x = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD
        return {"images": np.ascontiguousarray(x.transpose(2, 0, 1))[None]}

    def postprocess(self, outputs: splitserve.Tensors, request: splitserve.Request) -> Any:
        logits = outputs["logits"][0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argpartition(-probs, TOP_K)[:TOP_K]
        top = top[np.argsort(-probs[top])]
        return {
            "backend": self.model.backend if self.model else "",
            "simulated_accelerator": BACKEND == "simulated",
            "top5": [{"class": int(i), "score": round(float(probs[i]), 6)} for i in top],
        }


def photo(seed: int, size: tuple[int, int] = (1920, 1080), quality: int = 90) -> bytes:
    """A photo-like full-HD JPEG (smooth light, shapes, sensor noise), a few hundred KB."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    light = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2
    tint = rng.uniform(60, 200, size=3).astype(np.float32)
    base = light[..., None] * tint + (1 - light[..., None]) * tint[::-1] * 0.5
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(24):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(40, w // 3)), y0 + int(rng.integers(40, h // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()
