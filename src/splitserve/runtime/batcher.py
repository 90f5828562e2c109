"""Dynamic batching next to the engine: one ``Batcher`` per model in an engine process.

The contract:

- A request's rows (its inputs' axis 0) count toward ``max_batch_size``; a request with
  more rows than that is split over several batches and answered once all its rows ran.
- A batch is formed as soon as ``max_batch_size`` compatible rows wait, or as many
  requests as the senders can have in flight (``max_senders``), or when the oldest
  request has waited ``max_delay_s``, or at once when the average gap between arrivals
  says none is expected before then, or when none came for two such gaps, or on
  ``close``: a lone client, or a burst whose senders all wait on this batch, pays no
  batching delay, while a steady stream still fills the batch.
- Requests are compatible when their inputs agree in dtype and in every axis but the
  batch axis and the model's declared ``pad_axes``; along those, smaller inputs are
  padded with ``pad_value`` to the largest in the batch. ``pad_bucket`` (> 0) cuts a
  pad axis into fixed buckets (sizes 1..b, b+1..2b, ...): only sizes in one bucket
  share a batch. Incompatible requests wait for a batch of their own, in arrival order.
- The queue is bounded (``max_queue`` requests; ``submit`` raises ``Overloaded``), and
  requests whose deadline passed are handed back unrun by ``next_batch``.

No I/O happens here: the engine process feeds it and runs what it returns, which keeps
this logic unit-testable.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitserve.errors import BadRequest, Overloaded


@dataclass(eq=False)
class PendingRequest:
    """One inference request waiting in (or running through) the batcher."""

    key: Any  # opaque to the batcher: whoever answers the request knows it
    inputs: Mapping[str, np.ndarray]
    deadline: float
    arrived: float = field(default_factory=time.monotonic)
    rows: int = 0
    signature: tuple = ()
    taken: int = 0
    done: int = 0
    failed: bool = False
    parts: list[tuple[int, dict[str, np.ndarray]]] = field(default_factory=list)
    outputs: dict[str, np.ndarray] | None = None
    stages: list[Any] | None = None  # a traced request's stages, filled by whoever runs it


@dataclass(eq=False)
class Batch:
    inputs: dict[str, np.ndarray]
    # (request, first row of the request, row count, first row in this batch)
    parts: list[tuple[PendingRequest, int, int, int]]
    size: int
    formed: float = field(default_factory=time.monotonic)

    @property
    def requests(self) -> list[PendingRequest]:
        return list(dict.fromkeys(p[0] for p in self.parts))

    def complete(self, outputs: Mapping[str, np.ndarray]) -> list[PendingRequest]:
        """Hand each request its rows of ``outputs``; returns the requests now finished."""
        finished = []
        for req, start, count, offset in self.parts:
            if req.failed:
                continue
            req.parts.append((start, {k: v[offset : offset + count] for k, v in outputs.items()}))
            req.done += count
            if req.done == req.rows:
                req.outputs = _merge_parts(req.parts)
                req.parts = []
                finished.append(req)
        return finished

    def fail(self) -> list[PendingRequest]:
        """Mark every request of the batch failed (their other rows will not run)."""
        failed = [r for r in self.requests if not r.failed]
        for req in failed:
            req.failed = True
        return failed


def _merge_parts(parts: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0][1]
    parts.sort(key=lambda p: p[0])
    return {name: stack_padded([p[1][name] for p in parts]) for name in parts[0][1]}


def stack_padded(arrays: list[np.ndarray], pad_value: float = 0.0) -> np.ndarray:
    """Concatenate along axis 0, padding the other axes to the largest where they differ."""
    shape = [sum(a.shape[0] for a in arrays)] + [
        max(d) for d in zip(*(a.shape[1:] for a in arrays), strict=True)
    ]
    if all(a.shape[1:] == tuple(shape[1:]) for a in arrays):
        return np.concatenate(arrays)
    out = np.full(shape, pad_value, dtype=arrays[0].dtype)
    row = 0
    for a in arrays:
        out[(slice(row, row + a.shape[0]), *(slice(0, d) for d in a.shape[1:]))] = a
        row += a.shape[0]
    return out


class Batcher:
    def __init__(
        self,
        max_batch_size: int,
        max_delay_s: float,
        pad_axes: Mapping[str, tuple[int, ...]] | None = None,
        pad_value: float = 0.0,
        max_queue: int = 1024,
        pad_bucket: int = 0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.pad_axes = {k: frozenset(v) for k, v in (pad_axes or {}).items()}
        self.pad_value = pad_value
        self.pad_bucket = pad_bucket
        self.max_queue = max_queue
        self._queue: deque[PendingRequest] = deque()
        self._cond = threading.Condition()
        self._closed = False
        # Exponential average of the time between arrivals: waiting for more rows pays
        # only while requests keep arriving at about that pace.
        self._gap_s = float("inf")
        self._last_arrival = 0.0
        # How many requests can be pending at most (the senders' capacities), when known:
        # once that many wait, no other can arrive, so waiting cannot pay.
        self.max_senders: int | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def _signature(self, inputs: Mapping[str, np.ndarray]) -> tuple[tuple, int]:
        rows = {a.shape[0] if a.ndim else -1 for a in inputs.values()}
        if len(rows) != 1 or min(rows) < 1:
            raise BadRequest(
                "every input needs the same batch size (axis 0) of at least 1, got "
                + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in inputs.items())
            )
        sig = tuple(
            (
                name,
                arr.dtype.str,
                tuple(
                    self._axis_key(name, axis, d) for axis, d in enumerate(arr.shape) if axis > 0
                ),
            )
            for name, arr in sorted(inputs.items())
        )
        return sig, rows.pop()

    def _axis_key(self, name: str, axis: int, size: int) -> int:
        """What must match along an axis to share a batch: the size, or its pad bucket."""
        if axis not in self.pad_axes.get(name, ()):
            return size
        return -1 - (size - 1) // self.pad_bucket if self.pad_bucket else -1

    def submit(self, request: PendingRequest) -> None:
        """Queue a request (``BadRequest`` for malformed inputs, ``Overloaded`` when full)."""
        request.signature, request.rows = self._signature(request.inputs)
        with self._cond:
            if self._closed:
                raise Overloaded("engine is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"engine queue is full ({self.max_queue} requests)")
            if self._last_arrival:
                gap = min(request.arrived - self._last_arrival, 1.0)
                first = self._gap_s == float("inf")
                self._gap_s = gap if first else 0.8 * self._gap_s + 0.2 * gap
            self._last_arrival = request.arrived
            self._queue.append(request)
            self._cond.notify()

    def cancel(self, key: Any) -> PendingRequest | None:
        """Drop the queued request with ``key`` whose caller gave up; returns it, or None
        when no such request waits (it is answered, or it runs in a batch now).

        A request split over batches loses its rows not yet taken; the rows already in a
        batch ran on copies of its inputs, so its caller may reuse them at once.
        """
        with self._cond:
            for req in self._queue:
                if req.key == key and not req.failed:
                    req.failed = True
                    self._queue.remove(req)
                    return req
        return None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def next_batch(self, timeout: float | None = None) -> tuple[Batch | None, list[PendingRequest]]:
        """Wait up to ``timeout`` for a batch; returns (batch or None, expired requests)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                expired = self._drop_dead(now)
                wait_until = end
                if self._queue:
                    head = self._queue[0]
                    ready_rows = sum(
                        r.rows - r.taken for r in self._queue if r.signature == head.signature
                    )
                    due = head.arrived + self.max_delay_s
                    # No arrival for two average gaps: the burst is over (the clients
                    # may all be waiting on this very batch), so waiting cannot pay.
                    quiet_at = self._last_arrival + 2 * self._gap_s
                    if (
                        ready_rows >= self.max_batch_size
                        or (self.max_senders is not None and len(self._queue) >= self.max_senders)
                        or now >= due
                        or now >= quiet_at
                        or self._last_arrival + self._gap_s > due  # none expected in time
                        or self._closed
                    ):
                        return self._form(head.signature), expired
                    wait_until = min(due, quiet_at) if end is None else min(due, quiet_at, end)
                if expired or self._closed:
                    return None, expired
                if end is not None and now >= end:
                    return None, []
                self._cond.wait(None if wait_until is None else max(0.0, wait_until - now))

    def _drop_dead(self, now: float) -> list[PendingRequest]:
        """Remove failed requests and return those whose deadline passed."""
        if not any(r.failed or r.deadline <= now for r in self._queue):
            return []
        expired = [r for r in self._queue if r.deadline <= now and not r.failed]
        self._queue = deque(r for r in self._queue if not r.failed and r.deadline > now)
        for r in expired:
            r.failed = True
        return expired

    def _form(self, signature: tuple) -> Batch:
        parts: list[tuple[PendingRequest, int, int, int]] = []
        size = 0
        keep: deque[PendingRequest] = deque()
        for req in self._queue:
            room = self.max_batch_size - size
            if room and req.signature == signature:
                count = min(room, req.rows - req.taken)
                parts.append((req, req.taken, count, size))
                req.taken += count
                size += count
                if req.taken < req.rows:
                    keep.append(req)
            else:
                keep.append(req)
        self._queue = keep
        return Batch(self._assemble(parts, size), parts, size)

    def _assemble(
        self, parts: list[tuple[PendingRequest, int, int, int]], size: int
    ) -> dict[str, np.ndarray]:
        first = parts[0][0]
        if len(parts) == 1 and parts[0][2] == first.rows:
            return dict(first.inputs)  # the whole of one request: no copy
        batch: dict[str, np.ndarray] = {}
        for name in first.inputs:
            slices = [req.inputs[name][start : start + count] for req, start, count, _ in parts]
            batch[name] = stack_padded(slices, self.pad_value)
        return batch
