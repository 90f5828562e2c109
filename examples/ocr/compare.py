"""Compare OCR service answers with RapidOCR's, and with the generator's ground truth.

Shared by the equivalence test, the server tests and the benchmarks; it needs neither
rapidocr nor onnxruntime itself.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def reference_results(reference: Any) -> list[dict[str, Any]]:
    """RapidOCR's return value in the service's result format.

    Accepts ``RapidOCR()(...)``'s ``(results | None, elapse | None)`` tuple or its first
    element (a list of ``[box, text, score]``); ``None`` means no text.
    """
    if isinstance(reference, tuple):
        reference = reference[0]
    if reference is None:
        return []
    return [
        {"box": [[float(x), float(y)] for x, y in box], "text": str(text), "score": float(score)}
        for box, text, score in reference
    ]


def _results(ours: Any) -> list[Mapping[str, Any]]:
    """The result list of a whole service answer (``{"results": [...]}``) or the list."""
    if isinstance(ours, Mapping):
        return list(ours["results"])
    return list(ours)


def compare_ocr(
    ours: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    reference: Any,
    *,
    box_tol: float = 1.0,
    score_tol: float = 0.01,
) -> dict[str, Any]:
    """How far the service's results are from RapidOCR's for the same image.

    Returns ``texts_equal`` (same texts in the same order), ``max_box_diff`` (largest
    absolute difference of any box coordinate, in pixels), ``max_score_diff``, the two
    text lists, and ``equivalent``: texts equal and both differences within tolerance.
    When the result counts differ the differences are ``inf``.
    """
    mine = _results(ours)
    ref = reference_results(reference)
    mine_texts = [str(r["text"]) for r in mine]
    ref_texts = [r["text"] for r in ref]
    max_box = max_score = 0.0
    if len(mine) != len(ref):
        max_box = max_score = math.inf
    for a, b in zip(mine, ref, strict=False):
        for (ax, ay), (bx, by) in zip(a["box"], b["box"], strict=True):
            max_box = max(max_box, abs(float(ax) - bx), abs(float(ay) - by))
        max_score = max(max_score, abs(float(a["score"]) - b["score"]))
    texts_equal = mine_texts == ref_texts
    return {
        "texts_equal": texts_equal,
        "count": len(mine),
        "reference_count": len(ref),
        "max_box_diff": max_box,
        "max_score_diff": max_score,
        "equivalent": texts_equal and max_box <= box_tol and max_score <= score_tol,
        "texts": mine_texts,
        "reference_texts": ref_texts,
    }


def _squash(text: str) -> str:
    return "".join(text.split())


def match_truth(texts: Iterable[str], truth: Mapping[str, Any]) -> dict[str, Any]:
    """How many ground-truth lines (from ``make_images.load_truth``) were read exactly.

    ``exact``: the line's text appears verbatim among ``texts``; ``ignoring_spaces``:
    it does once whitespace is removed (the recogniser sometimes drops a space).
    Each recognised text can match one line only.
    """
    found = list(texts)
    exact_pool = Counter(found)
    squashed_pool = Counter(_squash(t) for t in found)
    lines = list(truth["lines"])
    exact = squashed = rotated = rotated_read = 0
    for line in lines:
        text = line["text"]
        hit = exact_pool[text] > 0
        if hit:
            exact_pool[text] -= 1
            exact += 1
        loose = squashed_pool[_squash(text)] > 0
        if loose:
            squashed_pool[_squash(text)] -= 1
            squashed += 1
        if line.get("rotated"):
            rotated += 1
            rotated_read += int(loose)
    return {
        "lines": len(lines),
        "exact": exact,
        "ignoring_spaces": squashed,
        "rotated": rotated,
        "rotated_read": rotated_read,
    }


# --- character error rate ----------------------------------------------------------------


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest character insertions, deletions and substitutions
    that turn ``a`` into ``b``.

    A two-row dynamic programme, O(len(a) * len(b)) after the common prefix and suffix
    are set aside (two builds of one model mostly read alike, so that is most of it);
    written here rather than taken from a library because this is all OCR needs.
    """
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a, end_b = end_a - 1, end_b - 1
    a, b = a[start:end_a], b[start:end_b]
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]


def document_text(lines: Iterable[str]) -> str:
    """A page's text: its lines in reading order, joined by newlines (so a line lost or
    split costs its characters, and a line break one)."""
    return "\n".join(lines)


def character_errors(reference: Iterable[str], candidate: Iterable[str]) -> tuple[int, int]:
    """(edit distance between the two pages' texts, characters of the reference's): summed
    over pages, errors / characters is the character error rate (CER)."""
    ref, new = document_text(reference), document_text(candidate)
    return edit_distance(ref, new), len(ref)


def truth_lines(truth: Mapping[str, Any]) -> list[str]:
    """The ground truth's lines (``make_images.load_truth``) in reading order: top to
    bottom, then left to right, as the service orders its results."""
    lines = sorted(truth["lines"], key=lambda line: (line["box"][1], line["box"][0]))
    return [line["text"] for line in lines]
