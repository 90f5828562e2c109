"""The batcher's contract, without processes: sizes, delays, splitting, padding, bounds."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from splitserve.errors import BadRequest, Overloaded
from splitserve.runtime.batcher import Batcher, PendingRequest


def req(key, rows: int = 1, width: int = 4, deadline: float = 1e12, fill=None) -> PendingRequest:
    if fill is None:
        fill = key if isinstance(key, int) else 0
    value = np.full((rows, width), fill, dtype=np.float32)
    return PendingRequest(key, {"x": value}, deadline)


def run_identity(batch) -> list[PendingRequest]:
    return batch.complete({"y": batch.inputs["x"] * 1})


def test_a_full_batch_forms_at_once() -> None:
    b = Batcher(max_batch_size=4, max_delay_s=10)
    for k in range(4):
        b.submit(req(k))
    started = time.monotonic()
    batch, expired = b.next_batch(timeout=5)
    assert time.monotonic() - started < 1
    assert expired == [] and batch is not None and batch.size == 4
    assert [r.key for r in batch.requests] == [0, 1, 2, 3]
    done = run_identity(batch)
    assert [r.outputs["y"][0, 0] for r in done] == [0, 1, 2, 3]


def test_a_steady_stream_fills_the_batch_while_it_waits() -> None:
    b = Batcher(max_batch_size=8, max_delay_s=2.0)
    stop = threading.Event()

    def arrivals() -> None:
        for k in range(40):
            if stop.wait(0.01):
                return
            b.submit(req(k))

    feeder = threading.Thread(target=arrivals)
    feeder.start()
    try:
        first, _ = b.next_batch(timeout=5)  # no arrival history yet: goes at once
        second, _ = b.next_batch(timeout=5)
    finally:
        stop.set()
        feeder.join()
    assert first is not None and first.size == 1
    # then it waits, collecting arrivals ~10 ms apart (jitter on a busy machine may
    # end the wait early, never before a few have come)
    assert second is not None and second.size >= 4


def test_a_burst_then_silence_goes_without_the_full_delay() -> None:
    b = Batcher(max_batch_size=8, max_delay_s=1.0)
    for k in range(3):  # e.g. every client's request is in: nobody else can come
        b.submit(req(k))
    started = time.monotonic()
    batch, _ = b.next_batch(timeout=5)
    assert batch is not None and batch.size == 3
    assert time.monotonic() - started < 0.5


def test_a_lone_request_after_a_quiet_spell_goes_at_once() -> None:
    b = Batcher(max_batch_size=8, max_delay_s=0.5)
    b.submit(req(0))
    b.next_batch(timeout=1)
    time.sleep(0.6)  # the arrival gap now exceeds the delay: waiting would not pay
    b.submit(req(1))
    started = time.monotonic()
    batch, _ = b.next_batch(timeout=5)
    assert batch is not None and time.monotonic() - started < 0.4


def test_rows_count_and_big_requests_are_split_then_reassembled() -> None:
    b = Batcher(max_batch_size=4, max_delay_s=0)
    b.submit(req("a", rows=3))
    b.submit(req("b", rows=6))
    sizes, finished = [], {}
    while len(finished) < 2:
        batch, _ = b.next_batch(timeout=1)
        assert batch is not None
        sizes.append(batch.size)
        for r in run_identity(batch):
            finished[r.key] = r.outputs["y"]
    assert sizes == [4, 4, 1]  # a(3)+b(1), b(4), b(1)
    assert finished["a"].shape == (3, 4)
    assert finished["b"].shape == (6, 4)


def test_max_batch_size_one() -> None:
    b = Batcher(max_batch_size=1, max_delay_s=0.01)
    b.submit(req("a", rows=3))
    b.submit(req("b"))
    keys = []
    for _ in range(4):
        batch, _ = b.next_batch(timeout=1)
        assert batch is not None and batch.size == 1
        keys += [r.key for r in run_identity(batch)]
    assert keys == ["a", "b"]


def test_incompatible_shapes_wait_for_their_own_batch() -> None:
    b = Batcher(max_batch_size=8, max_delay_s=0)
    b.submit(req("w4", width=4))
    b.submit(req("w6", width=6))
    b.submit(req("w4b", width=4))
    first, _ = b.next_batch(timeout=1)
    second, _ = b.next_batch(timeout=1)
    assert [r.key for r in first.requests] == ["w4", "w4b"]
    assert [r.key for r in second.requests] == ["w6"]


def test_padding_along_declared_axes() -> None:
    b = Batcher(max_batch_size=8, max_delay_s=0, pad_axes={"x": (1,)}, pad_value=-1)
    b.submit(req("short", width=2, fill=5))
    b.submit(req("long", width=5, fill=7))
    batch, _ = b.next_batch(timeout=1)
    assert batch.inputs["x"].shape == (2, 5)
    assert batch.inputs["x"][0].tolist() == [5, 5, -1, -1, -1]
    assert batch.inputs["x"][1].tolist() == [7] * 5


def test_pad_bucket_limits_how_much_is_padded() -> None:
    b = Batcher(max_batch_size=8, max_delay_s=0, pad_axes={"x": (1,)}, pad_bucket=8)
    for key, width in (("a", 9), ("b", 16), ("c", 17)):
        b.submit(req(key, width=width))
    first, _ = b.next_batch(timeout=1)
    second, _ = b.next_batch(timeout=1)
    assert [r.key for r in first.requests] == ["a", "b"] and first.inputs["x"].shape[1] == 16
    assert [r.key for r in second.requests] == ["c"]


def test_a_lone_whole_request_is_not_copied() -> None:
    b = Batcher(max_batch_size=8, max_delay_s=0)
    r = req("a", rows=2)
    b.submit(r)
    batch, _ = b.next_batch(timeout=1)
    assert batch.inputs["x"] is r.inputs["x"]


def test_expired_requests_come_back_unrun() -> None:
    b = Batcher(max_batch_size=8, max_delay_s=0)
    b.submit(req("late", deadline=time.monotonic() - 1))
    b.submit(req("ok"))
    batch, expired = b.next_batch(timeout=1)
    assert [r.key for r in expired] == ["late"]
    if batch is None:
        batch, _ = b.next_batch(timeout=1)
    assert [r.key for r in batch.requests] == ["ok"]


def test_the_queue_is_bounded_and_inputs_are_checked() -> None:
    b = Batcher(max_batch_size=2, max_delay_s=1, max_queue=2)
    b.submit(req(0))
    b.submit(req(1))
    with pytest.raises(Overloaded):
        b.submit(req(2))
    with pytest.raises(BadRequest, match="same batch size"):
        b.submit(PendingRequest("bad", {"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, 1e12))
    with pytest.raises(BadRequest):
        b.submit(PendingRequest("empty", {"a": np.zeros((0, 3))}, 1e12))


def test_a_failed_batch_drops_the_rest_of_its_requests() -> None:
    b = Batcher(max_batch_size=2, max_delay_s=0)
    b.submit(req("big", rows=5))
    batch, _ = b.next_batch(timeout=1)
    assert [r.key for r in batch.fail()] == ["big"]
    nxt, _ = b.next_batch(timeout=0.05)
    assert nxt is None


def test_next_batch_wakes_on_submit_from_another_thread() -> None:
    b = Batcher(max_batch_size=1, max_delay_s=0)
    threading.Timer(0.1, lambda: b.submit(req("x"))).start()
    batch, _ = b.next_batch(timeout=5)
    assert batch is not None and batch.requests[0].key == "x"


@pytest.mark.parametrize(("size", "delay", "queue"), [(0, 1, 1), (1, -1, 1), (1, 1, 0)])
def test_arguments_are_validated(size: int, delay: float, queue: int) -> None:
    with pytest.raises(ValueError):
        Batcher(max_batch_size=size, max_delay_s=delay, max_queue=queue)


def test_once_every_possible_sender_waits_the_batch_goes() -> None:
    def steady(max_senders: int | None) -> Batcher:
        b = Batcher(max_batch_size=32, max_delay_s=5.0)
        b.max_senders = max_senders
        for k in range(3):
            time.sleep(0.05)  # a steady pace: more arrivals look likely
            b.submit(req(k))
        return b

    batch, _ = steady(None).next_batch(timeout=0)
    assert batch is None  # without the bound, it waits for more
    batch, _ = steady(3).next_batch(timeout=0)  # the connected workers hold 3 jobs at most
    assert batch is not None and batch.size == 3


def test_a_cancelled_request_leaves_the_queue_unless_a_batch_holds_it() -> None:
    batcher = Batcher(max_batch_size=2, max_delay_s=10)
    whole = PendingRequest("whole", {"x": np.ones((2, 3), np.float32)}, time.monotonic() + 60)
    split = PendingRequest("split", {"x": np.ones((3, 3), np.float32)}, time.monotonic() + 60)
    queued = PendingRequest("queued", {"x": np.ones((1, 3), np.float32)}, time.monotonic() + 60)
    for req in (whole, split, queued):
        batcher.submit(req)
    batch, _ = batcher.next_batch(timeout=0)
    assert batch is not None and batch.requests == [whole]
    assert batcher.cancel("whole") is None  # running: it is answered as usual
    batch, _ = batcher.next_batch(timeout=0)
    assert batch is not None and batch.requests == [split]  # 2 of its 3 rows
    assert batcher.cancel("split") is split  # its last row will not run
    assert batcher.cancel("queued") is queued
    assert batcher.cancel("queued") is None
    assert len(batcher) == 0
    batch, expired = batcher.next_batch(timeout=0.05)
    assert batch is None and expired == []
