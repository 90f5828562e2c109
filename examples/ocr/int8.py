"""The OCR service on int8 detector and recogniser engines built by ``splitserve build``.

Two declarations of the same pipeline, differing only in what the accuracy gate asks:

- ``OCRInt8``: det and rec at int8 with ``keep_fp32=("auto",)`` and the default gate: on
  held-out pages, at least 98% character agreement with fp32 engines (1 - the character
  error rate against fp32's text). The search keeps in fp32 whatever layers that takes.
- ``OCRInt8Ungated``: every convolution and matrix product in int8, nothing kept, the
  gate only recording what it measures (tolerance and agreement set to accept
  anything); ``OCRInt8AllUngated``: the same with every layer int8 that can be
  (``int8_ops="all"``), the fastest. What they change is in docs/benchmarks.md.

Both calibrate on a folder of generated documents, run through the service itself so
the recogniser calibrates on real text-line crops::

    python -m examples.ocr.make_images examples/ocr/calibration --count 16 --seed 1001 --no-truth
    splitserve serve examples.ocr.int8:OCRInt8      # builds (minutes) or reuses the cache

Without the folder the server stops at start and says how to make it.
"""

from __future__ import annotations

import dataclasses
import math

from examples.ocr.service import OCRService
from splitserve.service import Model

CALIBRATION = "calibration"  # relative to this folder; generated, not committed


def _int8(model: Model, **gate: object) -> Model:
    return dataclasses.replace(model, precision="int8", calibration=CALIBRATION, **gate)


class OCRInt8(OCRService):
    """int8 det + rec, gated: >= 98% character agreement with fp32, fp32 layers searched."""

    name = "ocr-int8"
    models = {
        **OCRService.models,
        "det": _int8(OCRService.models["det"], keep_fp32=("auto",), tolerance=math.inf),
        "rec": _int8(OCRService.models["rec"], keep_fp32=("auto",), tolerance=math.inf),
    }


class OCRInt8Ungated(OCRService):
    """int8 det + rec with every Conv/MatMul quantised; the gate records, never refuses."""

    name = "ocr-int8-ungated"
    models = {
        **OCRService.models,
        "det": _int8(OCRService.models["det"], tolerance=math.inf, min_agreement=0.0),
        "rec": _int8(OCRService.models["rec"], tolerance=math.inf, min_agreement=0.0),
    }


class OCRInt8AllUngated(OCRService):
    """int8 det + rec with every quantisable layer int8 (not only Conv/MatMul); ungated."""

    name = "ocr-int8-all-ungated"
    models = {
        **OCRService.models,
        "det": _int8(
            OCRService.models["det"], tolerance=math.inf, min_agreement=0.0, int8_ops="all"
        ),
        "rec": _int8(
            OCRService.models["rec"], tolerance=math.inf, min_agreement=0.0, int8_ops="all"
        ),
    }
