"""The built-in OCR service: RapidOCR's PP-OCRv4 pipeline (detect, classify, recognise).

It gives the answer of ``rapidocr_onnxruntime.RapidOCR()(image_bytes)`` with its default
configuration (bit-identical when each rec call runs at its own width), but the three
models run in engine processes, where the recogniser batches the text lines of many
requests together by zero-padding their widths, while all image work runs here in the
CPU workers. Such padding is not free: SVTR mixes the whole width, so wider padding can
add or drop a space between words and move scores by a few hundredths (measured: 160 px
more changed spaces in 8 of 71 lines, scores by up to 0.04; 8 px: none, 0.005).

Why rapidocr's code is loaded file by file: importing any ``rapidocr_onnxruntime``
submodule runs the package ``__init__``, which imports onnxruntime (and PyYAML, tqdm...).
Measured (Python 3.11, numpy 2.4, onnxruntime 1.32): a worker with numpy + cv2 is
50.6 MiB RSS; + ``import rapidocr_onnxruntime`` is 80.9 MiB (+30 MiB per worker);
the helper files used here (DB post-processing with pyclipper + shapely, CTC decoding,
resizing) cost +4.4 MiB. Those files import nothing from the package, so they are
executed directly from their paths, and the exact upstream code is reused; the few
pieces that live in onnxruntime-importing modules (box ordering and filtering, crops,
cls/rec input building) are ported below, line for line where the result depends on it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np

from splitserve.errors import Unprocessable
from splitserve.service import InferFn, Model, Request, Service


def _rapidocr_dir() -> Path:
    """rapidocr's package folder, located without importing it (that loads onnxruntime)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the OCR example needs rapidocr-onnxruntime==1.4.4: pip install 'splitserve[ocr]'"
        )
    return Path(spec.submodule_search_locations[0]).resolve()


RAPIDOCR_DIR = _rapidocr_dir()
MODELS_DIR = RAPIDOCR_DIR / "models"
DET_MODEL = MODELS_DIR / "ch_PP-OCRv4_det_infer.onnx"
CLS_MODEL = MODELS_DIR / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
REC_MODEL = MODELS_DIR / "ch_PP-OCRv4_rec_infer.onnx"

# RapidOCR 1.4.4's default config.yaml.
TEXT_SCORE = 0.5
MIN_HEIGHT = 30
WIDTH_HEIGHT_RATIO = 8
MAX_SIDE_LEN = 2000
MIN_SIDE_LEN = 30
DET_LIMIT_SIDE_LEN = 736  # limit_type "min"
DET_POSTPROCESS = {
    "thresh": 0.3,
    "box_thresh": 0.5,
    "max_candidates": 1000,
    "unclip_ratio": 1.6,
    "use_dilation": True,
    "score_mode": "fast",
}
CLS_SHAPE = (3, 48, 192)
CLS_BATCH = 32  # crops per cls call: the engine's max_batch_size (all pad to 192 wide)
CLS_THRESH = 0.9
CLS_LABELS = ("0", "180")
REC_SHAPE = (3, 48, 320)
REC_BATCH = 6  # rapidocr's rec_batch_num: a group shares its padded width

# uint8 -> normalised float32, bit-identical to rapidocr's arithmetic, applied with
# cv2.LUT (about 15x faster than the float64 expression it replaces).
# Det: (x.astype(float32) * (1/255) - 0.5) / 0.5 with float64 mean/std, cast to float32.
_DET_LUT = (
    (np.arange(256, dtype=np.uint8).astype(np.float32) * (1 / 255.0) - np.array(0.5))
    / np.array(0.5)
).astype(np.float32)
# Cls/rec: float32 throughout: x / 255, -= 0.5, /= 0.5.
_CR_LUT = np.arange(256, dtype=np.uint8).astype(np.float32) / 255
_CR_LUT -= 0.5
_CR_LUT /= 0.5


def _load_rapidocr_file(relpath: str) -> ModuleType:
    """Execute one self-contained rapidocr source file without its package ``__init__``."""
    name = "_splitserve_rapidocr_" + relpath.removesuffix(".py").replace("/", "_")
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, RAPIDOCR_DIR / relpath)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {relpath} from {RAPIDOCR_DIR}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def onnx_metadata(path: Path) -> dict[str, str]:
    """An ONNX model's ``metadata_props`` (the graph is parsed, no session is created)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def sorted_boxes(dt_boxes: np.ndarray) -> list[np.ndarray]:
    """Reading order, top to bottom then left to right (RapidOCR.sorted_boxes)."""
    boxes = sorted(dt_boxes, key=lambda x: (x[0][1], x[0][0]))
    for i in range(len(boxes) - 1):
        for j in range(i, -1, -1):
            below, above = boxes[j + 1][0], boxes[j][0]
            if abs(below[1] - above[1]) < 10 and below[0] < above[0]:
                boxes[j], boxes[j + 1] = boxes[j + 1], boxes[j]
            else:
                break
    return boxes


def order_points_clockwise(pts: np.ndarray) -> np.ndarray:
    """Top-left, top-right, bottom-right, bottom-left (TextDetector.order_points_clockwise)."""
    x_sorted = pts[np.argsort(pts[:, 0]), :]
    left, right = x_sorted[:2, :], x_sorted[2:, :]
    tl, bl = left[np.argsort(left[:, 1]), :]
    tr, br = right[np.argsort(right[:, 1]), :]
    return np.array([tl, tr, br, bl], dtype="float32")


def filter_boxes(dt_boxes: np.ndarray, height: int, width: int) -> list[np.ndarray]:
    """Order, clip to the image and drop slivers (TextDetector.filter_tag_det_res)."""
    kept = []
    for raw in dt_boxes:
        box = order_points_clockwise(raw)
        # clip_det_res: int() truncation of the clamped float, as upstream.
        box[:, 0] = np.trunc(np.clip(box[:, 0], 0, width - 1))
        box[:, 1] = np.trunc(np.clip(box[:, 1], 0, height - 1))
        if int(np.linalg.norm(box[0] - box[1])) <= 3 or int(np.linalg.norm(box[0] - box[3])) <= 3:
            continue
        kept.append(box)
    return kept


def crop_box(img: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Perspective-crop one text box, upright if tall (RapidOCR.get_rotate_crop_image)."""
    crop_w = int(max(np.linalg.norm(points[0] - points[1]), np.linalg.norm(points[2] - points[3])))
    crop_h = int(max(np.linalg.norm(points[0] - points[3]), np.linalg.norm(points[1] - points[2])))
    pts_std = np.array([[0, 0], [crop_w, 0], [crop_w, crop_h], [0, crop_h]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(points, pts_std)
    dst = cv2.warpPerspective(
        img, matrix, (crop_w, crop_h), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC
    )
    if dst.shape[0] * 1.0 / dst.shape[1] >= 1.5:
        dst = np.rot90(dst)
    return dst


def _put_normalised(dst: np.ndarray, img: np.ndarray, height: int, max_width: int) -> None:
    """Resize a crop to ``height`` keeping its aspect (at most ``max_width``), normalise it
    and write it at the left of ``dst`` (C, H, W); the rest stays 0.0, rapidocr's padding.
    """
    h, w = img.shape[:2]
    ratio = w / float(h)
    resized_w = min(math.ceil(height * ratio), max_width)
    resized = cv2.resize(img, (resized_w, height))
    dst[:, :, :resized_w] = cv2.LUT(resized, _CR_LUT).transpose(2, 0, 1)


def _only(outputs: dict[str, np.ndarray]) -> np.ndarray:
    return next(iter(outputs.values()))


def text_lines_equal(reference: Sequence[str], candidate: Sequence[str]) -> tuple[int, int]:
    """(lines equal in both, lines in the longer list), aligned in reading order."""
    import difflib

    matcher = difflib.SequenceMatcher(a=list(reference), b=list(candidate), autojunk=False)
    equal = sum(block.size for block in matcher.get_matching_blocks())
    return equal, max(len(reference), len(candidate))


class OCRService(Service):
    """Text detection + angle classification + recognition; JSON boxes, texts, scores."""

    name = "ocr"
    models = {
        "det": Model(path=str(DET_MODEL), max_batch_size=4, max_delay_ms=2.0),
        "cls": Model(path=str(CLS_MODEL), max_batch_size=CLS_BATCH, max_delay_ms=2.0),
        "rec": Model(
            path=str(REC_MODEL),
            # One group per batch on the CPU: this recogniser costs more per row in larger
            # batches there (measured with 1 intra-op thread at width 960: 71 ms/row at
            # batch 1, 88 at 6, 94 at 24); on a GPU raise it to batch across requests.
            max_batch_size=REC_BATCH,
            max_delay_ms=3.0,
            # Groups of different requests share a batch by zero-padding their width with
            # 0.0, rapidocr's own padding value in normalised space; only groups whose
            # widths fall in one 8 px bucket (1-8, 9-16, ...: padding under 8 px, which
            # changed no text, see the docstring).
            pad_axes={"x": (3,)},
            pad_value=0.0,
            pad_bucket=8,
        ),
    }

    def setup(self) -> None:
        """Build rapidocr's pre/post-processing objects once per worker."""
        self._img_ops: Any = _load_rapidocr_file("utils/process_img.py")
        det_utils: Any = _load_rapidocr_file("ch_ppocr_det/utils.py")
        rec_utils: Any = _load_rapidocr_file("ch_ppocr_rec/utils.py")
        self._det_pre: Any = det_utils.DetPreProcess(
            DET_LIMIT_SIDE_LEN, "min", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
        )
        self._det_post: Any = det_utils.DBPostProcess(**DET_POSTPROCESS)
        # As OrtInferSession.get_character_list: the model's "character" metadata.
        characters = onnx_metadata(REC_MODEL)["character"].splitlines()
        self._ctc: Any = rec_utils.CTCLabelDecode(character=characters)

    async def handle(self, request: Request, infer: InferFn) -> dict[str, Any]:
        img = request.image()
        raw_h, raw_w = img.shape[:2]
        try:
            img, ratio_h, ratio_w = self._limit_sides(img)
        except self._img_ops.ResizeImgError:
            raise Unprocessable(
                f"image of {raw_w}x{raw_h} pixels has too extreme an aspect ratio for OCR"
            ) from None
        img, pad_top = self._letterbox(img)

        boxes = await self._detect(img, infer)
        if not boxes:
            return {"results": []}
        crops = [crop_box(img, box) for box in boxes]
        crops = await self._classify(crops, infer)
        texts = await self._recognize(crops, infer)

        points = self._original_points(boxes, pad_top, ratio_h, ratio_w, raw_h, raw_w)
        results = [
            {"box": box, "text": text, "score": score}
            for box, (text, score) in zip(points.tolist(), texts, strict=True)
            if score >= TEXT_SCORE
        ]
        return {"results": results}

    def agreement(self, reference: Any, candidate: Any) -> tuple[int, int]:
        """Text lines read the same, as (equal lines, lines): the int8 build's gate.

        Lines are aligned in reading order (a line found by only one side counts as a
        miss); a line matches only if its whole text is equal, spaces included.
        """
        return text_lines_equal(
            [r["text"] for r in reference["results"]], [r["text"] for r in candidate["results"]]
        )

    def _limit_sides(self, img: np.ndarray) -> tuple[np.ndarray, float, float]:
        """RapidOCR.preprocess (the min-side ratios replace the max-side ones, as upstream)."""
        ratio_h = ratio_w = 1.0
        if max(img.shape[:2]) > MAX_SIDE_LEN:
            img, ratio_h, ratio_w = self._img_ops.reduce_max_side(img, MAX_SIDE_LEN)
        if min(img.shape[:2]) < MIN_SIDE_LEN:
            img, ratio_h, ratio_w = self._img_ops.increase_min_side(img, MIN_SIDE_LEN)
        return img, ratio_h, ratio_w

    def _letterbox(self, img: np.ndarray) -> tuple[np.ndarray, int]:
        """RapidOCR.maybe_add_letterbox: pad very flat images top and bottom."""
        h, w = img.shape[:2]
        if h <= MIN_HEIGHT or w / h > WIDTH_HEIGHT_RATIO:
            new_h = max(int(w / WIDTH_HEIGHT_RATIO), MIN_HEIGHT) * 2
            pad = int(abs(new_h - h) / 2)
            return self._img_ops.add_round_letterbox(img, (pad, pad, 0, 0)), pad
        return img, 0

    async def _detect(self, img: np.ndarray, infer: InferFn) -> list[np.ndarray]:
        """TextDetector + RapidOCR.sorted_boxes: text boxes in letterboxed coordinates."""
        h, w = img.shape[:2]
        resized = self._det_pre.resize(img)
        if resized is None:
            return []
        rh, rw = resized.shape[:2]
        planar = np.ascontiguousarray(resized.transpose(2, 0, 1)).reshape(3 * rh, rw)
        tensor = cv2.LUT(planar, _DET_LUT).reshape(1, 3, rh, rw)
        pred = _only(await infer("det", {"x": tensor}))
        dt_boxes, _ = self._det_post(pred, (h, w))
        kept = filter_boxes(dt_boxes, h, w)
        return sorted_boxes(np.array(kept)) if kept else []

    async def _classify(self, crops: list[np.ndarray], infer: InferFn) -> list[np.ndarray]:
        """TextClassifier: turn the crops the model reads as upside down (180, > 0.9)."""
        c, ch, cw = CLS_SHAPE
        order = np.argsort(np.array([im.shape[1] / float(im.shape[0]) for im in crops]))
        batch = np.zeros((len(crops), c, ch, cw), dtype=np.float32)
        for row, idx in enumerate(order):
            _put_normalised(batch[row], crops[idx], ch, cw)
        chunks = (batch[i : i + CLS_BATCH] for i in range(0, len(crops), CLS_BATCH))
        outs = await asyncio.gather(*(infer("cls", {"x": chunk}) for chunk in chunks))
        probs = np.concatenate([_only(o) for o in outs])
        labels = probs.argmax(axis=1)
        crops = list(crops)
        for row, idx in enumerate(order):
            label = int(labels[row])
            if CLS_LABELS[label] == "180" and probs[row, label] > CLS_THRESH:
                crops[idx] = cv2.rotate(crops[idx], 1)
        return crops

    async def _recognize(
        self, crops: Sequence[np.ndarray], infer: InferFn
    ) -> list[tuple[str, float]]:
        """TextRecognizer: groups of 6 by aspect ratio, each padded to its widest, concurrently."""
        c, h, w = REC_SHAPE
        ratios = np.array([im.shape[1] / float(im.shape[0]) for im in crops])
        order = np.argsort(ratios)
        groups = [order[i : i + REC_BATCH] for i in range(0, len(crops), REC_BATCH)]
        calls = []
        for group in groups:
            max_wh_ratio = max(w / h, *(float(ratios[i]) for i in group))
            batch = np.zeros((len(group), c, h, int(h * max_wh_ratio)), dtype=np.float32)
            for row, idx in enumerate(group):
                _put_normalised(batch[row], crops[idx], h, batch.shape[3])
            calls.append(infer("rec", {"x": batch}))
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        for group, out in zip(groups, await asyncio.gather(*calls), strict=True):
            for idx, res in zip(group, self._ctc(_only(out)), strict=True):
                results[idx] = res
        return results

    @staticmethod
    def _original_points(
        boxes: list[np.ndarray],
        pad_top: int,
        ratio_h: float,
        ratio_w: float,
        raw_h: int,
        raw_w: int,
    ) -> np.ndarray:
        """RapidOCR._get_origin_points: undo the letterbox, then the resize; clip."""
        pts = np.array(boxes).astype(np.float32)
        pts[:, :, 1] -= pad_top
        pts[:, :, 0] *= ratio_w
        pts[:, :, 1] *= ratio_h
        pts = np.where(pts < 0, 0, pts)
        pts[..., 0] = np.where(pts[..., 0] > raw_w, raw_w, pts[..., 0])
        pts[..., 1] = np.where(pts[..., 1] > raw_h, raw_h, pts[..., 1])
        return pts
