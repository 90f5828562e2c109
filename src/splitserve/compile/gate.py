"""The accuracy gate: a built engine against fp32 on held-out inputs.

Per output, over all held-out batches at once: largest and mean absolute error, the
relative error that the tolerance bounds, and cosine similarity. The relative error is
``RMS(new - ref) / max(RMS(ref), ABS_FLOOR)``: relative to the reference's scale, so one
number serves logits, maps and embeddings, with an absolute floor, so an output that is
all but zero (a text detector's probability map on an image without text) is judged by
how far it moved, not by a ratio of two roundings. With a service that defines
``agreement`` (OCR: 1 - the character error rate against fp32's text), the gate also
runs the whole service on held-out requests, fp32 against the candidate, and requires
the agreement ratio.
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

# Default tolerances (relative error of every output) when the build names none:
# what each number format's rounding leaves on well-conditioned networks.
DEFAULT_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2, "int8": 0.1}


# The floor of the scale the relative error divides by. Below it the reference carries
# no signal that a ratio could measure: 1e-3 is fp16's step at 1.0 (2**-10), the
# rounding every output of order one sees at fp16, and networks' outputs (probabilities,
# logits, normalised maps) are of order one. An output whose RMS is below the floor is
# judged on absolute error: its RMS error must stay under tolerance * 1e-3.
ABS_FLOOR = 1e-3


@dataclass
class OutputError:
    max_abs: float
    mean_abs: float
    rel_l2: float  # RMS(new - ref) / max(RMS(ref), ABS_FLOOR)
    cosine: float
    scale: float = 1.0  # RMS(ref): what rel_l2 is relative to, unless below the floor
    problem: str = ""  # an output no error measures: NaN/inf where fp32 has none, shapes

    @property
    def floored(self) -> bool:
        """The reference is all but zero: the error is measured against ``ABS_FLOOR``."""
        return self.scale < ABS_FLOOR

    @property
    def finite(self) -> bool:
        return not self.problem


def output_error(ref: np.ndarray, new: np.ndarray) -> OutputError:
    """How far ``new`` is from ``ref`` (both of one output, any shape, same size)."""
    a = np.asarray(ref, dtype=np.float64).ravel()
    b = np.asarray(new, dtype=np.float64).ravel()
    if a.shape != b.shape:
        problem = f"{b.size} values where fp32 has {a.size}"
        return OutputError(math.inf, math.inf, math.inf, 0.0, problem=problem)
    # Non-finite values must be where fp32 has them, and the same (a log-probability
    # of -inf may be meant); any other NaN/inf (an fp16 overflow) fails the output.
    finite = np.isfinite(a)
    same = np.array_equal(a[~finite], b[~finite], equal_nan=True)
    if not same or not np.isfinite(b[finite]).all():
        problem = "NaN or inf where fp32 has finite values (an overflow)"
        return OutputError(math.inf, math.inf, math.inf, 0.0, problem=problem)
    a, b = a[finite], b[finite]
    if not a.size:
        return OutputError(0.0, 0.0, 0.0, 1.0, scale=0.0)
    diff = b - a
    rms_a = float(np.sqrt(np.mean(a * a)))
    rms_d = float(np.sqrt(np.mean(diff * diff)))
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cosine = float(a @ b / (norm_a * norm_b)) if norm_a > 0 and norm_b > 0 else float(rms_d == 0)
    return OutputError(
        float(np.abs(diff).max()),
        float(np.abs(diff).mean()),
        rms_d / max(rms_a, ABS_FLOOR),
        cosine,
        scale=rms_a,
    )


def run_batches(engine: Engine, batches: Sequence[Batch]) -> list[dict[str, np.ndarray]]:
    return [engine.run_batch(batch) for batch in batches]


def compare_engines(
    reference: Sequence[dict[str, np.ndarray]], candidate: Sequence[dict[str, np.ndarray]]
) -> dict[str, OutputError]:
    """Per output, the error of ``candidate``'s results over all batches together (one
    scale per output: a batch whose output is near zero is judged on the set's scale)."""
    refs: dict[str, list[np.ndarray]] = {}
    news: dict[str, list[np.ndarray]] = {}
    errors: dict[str, OutputError] = {}
    for ref, new in zip(reference, candidate, strict=True):
        for name, value in ref.items():
            value, got = np.asarray(value), np.asarray(new[name])
            if value.size != got.size:
                errors.setdefault(name, output_error(value, got))
            refs.setdefault(name, []).append(value.ravel())
            news.setdefault(name, []).append(got.ravel())
    for name in refs:
        if name not in errors:
            errors[name] = output_error(np.concatenate(refs[name]), np.concatenate(news[name]))
    return errors


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
    """The service's own measure summed over held-out requests. ``matching`` may be
    negative (OCR: more character errors than fp32 read characters, on a page where the
    candidate invents text)."""

    matching: int
    total: int

    @property
    def ratio(self) -> float:
        if not self.total:
            return 1.0 if self.matching >= 0 else 0.0
        return self.matching / self.total


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
            if err.problem:
                self.failures.append(f"output {name!r}: {err.problem}")
            elif err.rel_l2 > self.tolerance:
                self.failures.append(
                    f"output {name!r} relative error {err.rel_l2:.4g} > {self.tolerance:.4g}"
                    + (
                        f" (its values are near zero, RMS {err.scale:.2g}: the error is "
                        f"relative to the floor {ABS_FLOOR:g})"
                        if err.floored
                        else ""
                    )
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
        bound = (
            f"tolerance {self.tolerance:.4g}"
            if math.isfinite(self.tolerance)
            else "not gated: the service's agreement decides"
        )
        text = f"worst relative error {worst:.4g} ({bound})"
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
            "outputs": {
                name: {**asdict(err), "floored": err.floored} for name, err in self.outputs.items()
            },
            "abs_floor": ABS_FLOOR,
            "agreement": None
            if self.agreement is None
            else {**asdict(self.agreement), "ratio": self.agreement.ratio},
            "min_agreement": self.min_agreement,
        }
