"""Calibration and held-out inputs for a build, read from folders.

A folder holds either tensors (``.npy``: a batch for a one-input model; ``.npz``: a
batch per input name) or request bodies (images, JSON...) that the service itself turns
into model inputs: the service runs in-process on fp32 engines and every input its
model receives is captured, so a pipeline's later models (OCR's recogniser) calibrate
on exactly what they see when served. In a folder of images, the other files (each
page's ground truth, written beside it by examples/ocr/make_images.py) are skipped.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splitserve.media import content_type, file_image_type

if TYPE_CHECKING:
    from splitserve.service import Service

Batch = dict[str, np.ndarray]
TENSOR_SUFFIXES = (".npy", ".npz")
HOLDOUT_EVERY = 4  # without --holdout, every 4th file of the calibration folder is held out

log = logging.getLogger("splitserve.compile")


class DataError(ValueError):
    """Calibration or held-out data that cannot be used (says what to provide)."""


@dataclass
class Split:
    """Files to calibrate on and files the accuracy gate judges with (never both)."""

    calibration: list[Path]
    holdout: list[Path]


def list_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist (see the service's docs)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder} holds no files")
    images = [p for p in files if file_image_type(p)]
    if images and len(images) < len(files) and not any(is_tensor_file(p) for p in files):
        others = Counter(p.suffix.lower() or "(no extension)" for p in files if p not in images)
        kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(others.items()))
        _note_skipped(folder, len(images), kinds)
        return images
    return files


@functools.cache
def _note_skipped(folder: Path, images: int, kinds: str) -> None:
    """Say once per folder which files a build leaves out (the folder is listed again
    for the cache key and for the data)."""
    log.info("%s: using its %d images, skipping %s", folder, images, kinds)


def split_files(calibration: Path, holdout: Path | None) -> Split:
    """The calibration folder's files, and the held-out ones (their own folder, or 1 in 4)."""
    files = list_files(calibration)
    if holdout is not None:
        return Split(files, list_files(holdout))
    if len(files) < 2:
        raise DataError(f"{calibration} needs >= 2 files to hold some out (or pass --holdout)")
    held = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1] or files[-1:]
    return Split([f for f in files if f not in held], held)


def files_digest(files: Sequence[Path]) -> str:
    """A hash of the files' names and contents (part of an engine's cache key)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def is_tensor_file(path: Path) -> bool:
    return path.suffix.lower() in TENSOR_SUFFIXES


def load_tensors(files: Sequence[Path], input_names: Sequence[str]) -> list[Batch]:
    """One batch per file: ``.npy`` for a one-input model, ``.npz`` keyed by input name."""
    batches = []
    for path in files:
        if path.suffix.lower() == ".npy":
            if len(input_names) != 1:
                raise DataError(
                    f"{path.name}: a .npy file feeds a one-input model; this one has inputs "
                    f"{list(input_names)} (use .npz with those keys)"
                )
            batches.append({input_names[0]: np.load(path)})
        elif path.suffix.lower() == ".npz":
            with np.load(path) as npz:
                missing = set(input_names) - set(npz.files)
                if missing:
                    raise DataError(f"{path.name} lacks inputs {sorted(missing)}")
                batches.append({name: npz[name] for name in input_names})
        else:
            raise DataError(
                f"{path.name} is not a tensor file (.npy/.npz); request bodies such as images "
                "need the service that turns them into inputs (--service module:Class)"
            )
    return batches


def capture_inputs(
    cls: type[Service],
    files: Sequence[Path],
    *,
    artifacts: Mapping[str, Path] | None = None,
    engine_threads: int | None = None,
) -> tuple[dict[str, list[Batch]], list[Any]]:
    """Run the service on ``files``: every model's inputs, and each file's decoded answer.

    A request the service rejects is an error: calibration data must be valid input.
    """
    from splitserve.runtime.inprocess import InProcessService

    captured: dict[str, list[Batch]] = {}

    def observe(model: str, inputs: Mapping[str, np.ndarray]) -> None:
        captured.setdefault(model, []).append({k: np.array(v) for k, v in inputs.items()})

    service = InProcessService(
        cls, engine_threads=engine_threads, artifacts=artifacts, observe=observe
    )
    answers = [answer_of(service, path) for path in files]
    return captured, answers


def answer_of(service: Any, path: Path) -> Any:
    """``service``'s decoded answer to the body in ``path``; a failed request is an error."""
    import json

    reply = service.call(path.read_bytes(), content_type(path))
    if reply.status != 200:
        raise DataError(f"{path.name}: the service answered {reply.status}: {reply.body[:200]!r}")
    if reply.content_type.startswith("application/json"):
        return json.loads(reply.body)
    return reply.body
