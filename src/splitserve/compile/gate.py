"""The accuracy gate: a built engine against fp32 on held-out inputs.

Per output: largest and mean absolute error, relative L2 error (``||new - ref|| /
||ref||``, the tolerance's measure: scale-free, so one number serves logits, maps and
embeddings) and cosine similarity. With a service that defines ``agreement`` (OCR:
equal text lines), the gate also runs the whole service on held-out requests, fp32
against the candidate, and requires the agreement ratio.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from splitserve.compile.data import Batch
from splitserve.engines.base import Engine
from splitserve.service import DEFAULT_MIN_AGREEMENT

# Default tolerances (relative L2 error of every output) when the build names none:
# what each number format's rounding leaves on well-conditioned networks.
DEFAULT_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2, "int8": 0.1}


@dataclass
class OutputError:
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.rel_l2)


def output_error(ref: np.ndarray, new: np.ndarray) -> OutputError:
    """How far ``new`` is from ``ref`` (both of one output, any shape, same size)."""
    a = np.asarray(ref, dtype=np.float64).ravel()
    b = np.asarray(new, dtype=np.float64).ravel()
    if a.shape != b.shape:
        return OutputError(math.inf, math.inf, math.inf, 0.0)
    # Non-finite values must be where fp32 has them, and the same (a log-probability
    # of -inf may be meant); any other NaN/inf (an fp16 overflow) fails the output.
    finite = np.isfinite(a)
    same = np.array_equal(a[~finite], b[~finite], equal_nan=True)
    if not same or not np.isfinite(b[finite]).all():
        return OutputError(math.inf, math.inf, math.inf, 0.0)
    a, b = a[finite], b[finite]
    diff = b - a
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    norm_d = float(np.linalg.norm(diff))
    rel = norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else math.inf)
    cosine = float(a @ b / (norm_a * norm_b)) if norm_a > 0 and norm_b > 0 else float(norm_d == 0)
    return OutputError(
        float(np.abs(diff).max(initial=0.0)),
        float(np.abs(diff).mean()) if diff.size else 0.0,
        rel,
        cosine,
    )


def merge_errors(errors: Sequence[OutputError]) -> OutputError:
    """The worst of several batches' errors (mean absolute error averaged)."""
    return OutputError(
        max(e.max_abs for e in errors),
        float(np.mean([e.mean_abs for e in errors])),
        max(e.rel_l2 for e in errors),
        min(e.cosine for e in errors),
    )


def run_batches(engine: Engine, batches: Sequence[Batch]) -> list[dict[str, np.ndarray]]:
    return [engine.run_batch(batch) for batch in batches]


def compare_engines(
    reference: Sequence[dict[str, np.ndarray]], candidate: Sequence[dict[str, np.ndarray]]
) -> dict[str, OutputError]:
    """Per output, the worst error of ``candidate``'s results over all batches."""
    per_output: dict[str, list[OutputError]] = {}
    for ref, new in zip(reference, candidate, strict=True):
        for name, value in ref.items():
            per_output.setdefault(name, []).append(output_error(value, new[name]))
    return {name: merge_errors(errs) for name, errs in per_output.items()}


def compare_latency(
    reference: Engine, candidate: Engine, batches: Sequence[Batch], rounds: int = 5
) -> tuple[float, float]:
    """Mean ms per batch of each engine: medians over ``rounds`` passes, the two engines
    alternating pass by pass so that a busy moment of a shared machine hits both."""
    times: dict[int, list[float]] = {0: [], 1: []}
    engines = (reference, candidate)
    for engine in engines:
        engine.run_batch(batches[0])
    for _ in range(rounds):
        for index, engine in enumerate(engines):
            started = time.perf_counter()
            for batch in batches:
                engine.run_batch(batch)
            times[index].append((time.perf_counter() - started) / len(batches) * 1000)
    return float(np.median(times[0])), float(np.median(times[1]))


@dataclass
class Agreement:
    matching: int
    total: int

    @property
    def ratio(self) -> float:
        return self.matching / self.total if self.total else 1.0


def service_agreement(
    agree: Callable[[Any, Any], tuple[int, int] | None],
    reference: Sequence[Any],
    candidate: Sequence[Any],
) -> Agreement | None:
    """The service's own comparison summed over held-out requests (None: it has none)."""
    matching = total = 0
    for ref, new in zip(reference, candidate, strict=True):
        counted = agree(ref, new)
        if counted is None:
            return None
        matching += counted[0]
        total += counted[1]
    return Agreement(matching, total)


@dataclass
class GateResult:
    """What the gate measured, and whether the build passes."""

    tolerance: float
    outputs: dict[str, OutputError]
    agreement: Agreement | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name, err in self.outputs.items():
            if not err.finite:
                self.failures.append(f"output {name!r} is not finite (overflow or NaN)")
            elif err.rel_l2 > self.tolerance:
                self.failures.append(
                    f"output {name!r} relative L2 error {err.rel_l2:.4g} > {self.tolerance:.4g}"
                )
        if self.agreement is not None and self.agreement.ratio < self.min_agreement:
            self.failures.append(
                f"service agreement {self.agreement.matching}/{self.agreement.total} = "
                f"{self.agreement.ratio:.2%} < {self.min_agreement:.2%}"
            )

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        worst = max((e.rel_l2 for e in self.outputs.values()), default=0.0)
        text = f"worst relative L2 error {worst:.4g} (tolerance {self.tolerance:.4g})"
        if self.agreement is not None:
            text += (
                f", service agreement {self.agreement.matching}/{self.agreement.total} "
                f"({self.agreement.ratio:.2%}, need {self.min_agreement:.0%})"
            )
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "failures": self.failures,
            "outputs": {name: asdict(err) for name, err in self.outputs.items()},
            "agreement": None
            if self.agreement is None
            else {**asdict(self.agreement), "ratio": self.agreement.ratio},
            "min_agreement": self.min_agreement,
        }
