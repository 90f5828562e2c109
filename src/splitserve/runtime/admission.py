"""Deadline-aware admission: take a request only if it can still start and finish in time.

The front holds a bounded pool of job slots (every CPU worker's ``--worker-concurrency``).
A slot turns over every ``service_s`` seconds on average (measured: an exponential
average of how long each finished job held its slot), so with ``slots`` slots busy the
k-th request in the queue gets one after about ``k * service_s / slots`` seconds, and
finishes ``service_s`` later. A request whose deadline comes before that is refused at
once (503 with a Retry-After of when the queue will have drained), instead of waiting
out its deadline and taking the slot of one that could have made it: under any load the
queue holds only requests that will be served, and the slots do only useful work.

The estimate learns from every job, so it follows the load: a slot's service time grows
when more jobs share the engines. Until the first jobs finish nothing is known and only
the queue bound applies. Pure logic, no I/O: unit-tested on its own.
"""

from __future__ import annotations

import math

# Weight of the newest job in the averages: about the last ten jobs count, so the
# estimate follows a change of load within a few turnovers of the slots.
EWMA_WEIGHT = 0.1
# A request is admitted only if it can finish within its deadline even when its job
# runs this many mean deviations longer than the mean (jobs vary: OCR pages differ).
SPREAD_MARGIN = 2.0
# The longest a request may be expected to wait for a slot, as a share of one job's
# service time. One turnover of every slot: the queue then refills each slot once, so
# the slots never idle under overload, a closed loop of up to twice as many clients as
# slots is served without refusals, and what is admitted is answered within about two
# service times (the unloaded latency of such a loop), also right after an overload.
QUEUE_WAIT_SHARE = 1.0
# ...but at least this long, so that fast services keep a queue that absorbs bursts.
MIN_QUEUE_WAIT_S = 0.5


class AdmissionEstimate:
    """How long a job holds a slot, and when a queued request would start and finish."""

    def __init__(self, weight: float = EWMA_WEIGHT) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self.weight = weight
        self.service_s: float | None = None  # mean; None until a job finished
        self.spread_s = 0.0  # mean absolute deviation from the mean

    def observe(self, held_s: float) -> None:
        """A job held its slot for ``held_s`` seconds (whatever its answer)."""
        if held_s < 0 or math.isnan(held_s):
            return
        if self.service_s is None:
            self.service_s = held_s
            return
        deviation = held_s - self.service_s
        self.service_s += self.weight * deviation
        self.spread_s += self.weight * (abs(deviation) - self.spread_s)

    @property
    def service_high_s(self) -> float:
        """A job's service time with margin: the mean plus ``SPREAD_MARGIN`` deviations."""
        return (self.service_s or 0.0) + SPREAD_MARGIN * self.spread_s

    def max_queue_wait(self) -> float:
        return max(MIN_QUEUE_WAIT_S, QUEUE_WAIT_SHARE * (self.service_s or 0.0))

    def start_in(self, position: int, slots: int) -> float:
        """Seconds until the request ``position`` places in the queue (1 = next) starts."""
        if self.service_s is None or slots < 1:
            return 0.0
        return position * self.service_s / slots

    def refusal(self, position: int, slots: int, remaining_s: float) -> str | None:
        """Why a request that would queue at ``position`` should be refused now, or None.

        Refused when it would wait longer than ``max_queue_wait()`` (unless it is next in
        line: a queue of one only refills the slot that frees next) or could not finish,
        with margin, within the ``remaining_s`` seconds to its deadline.
        """
        wait = self.start_in(position, slots)
        if position > 1 and wait > self.max_queue_wait():  # the next in line may always wait
            return f"about {wait:.1f}s of queue ahead (the server is at capacity)"
        if wait + self.service_high_s > remaining_s:
            return (
                f"it would finish in about {wait + self.service_high_s:.1f}s, after its "
                f"deadline in {remaining_s:.1f}s"
            )
        return None

    def latest_start(self, deadline: float) -> float:
        """The last moment a request can start and still finish, with margin, by ``deadline``."""
        return deadline - self.service_high_s
