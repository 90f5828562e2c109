"""The front's admission estimate (pure logic; the served behaviour is in test_overload)."""

from __future__ import annotations

import pytest

from splitserve.runtime.admission import MIN_QUEUE_WAIT_S, AdmissionEstimate


def test_nothing_is_refused_before_any_job_finished() -> None:
    estimate = AdmissionEstimate()
    assert estimate.refusal(position=100, slots=1, remaining_s=0.01) is None
    assert estimate.start_in(5, 4) == 0.0


def test_a_request_that_would_finish_after_its_deadline_is_refused() -> None:
    estimate = AdmissionEstimate()
    for _ in range(20):
        estimate.observe(2.0)  # every job holds its slot 2 s
    assert estimate.service_s == pytest.approx(2.0)
    # 4 slots: the next in line starts after ~0.5 s and finishes after ~2.5 s
    assert estimate.start_in(1, 4) == pytest.approx(0.5)
    assert estimate.refusal(1, 4, remaining_s=3.0) is None
    assert "deadline" in estimate.refusal(1, 4, remaining_s=2.4)
    assert estimate.latest_start(deadline=10.0) == pytest.approx(8.0)


def test_the_queue_holds_one_turnover_of_the_slots() -> None:
    estimate = AdmissionEstimate()
    for _ in range(20):
        estimate.observe(4.0)
    slots = 8  # a slot frees every 0.5 s: a 4 s queue is eight requests long
    admitted = [p for p in range(1, 40) if estimate.refusal(p, slots, remaining_s=60) is None]
    assert admitted == list(range(1, slots + 1))
    fast = AdmissionEstimate()
    fast.observe(0.001)
    assert fast.max_queue_wait() == MIN_QUEUE_WAIT_S  # fast services keep a burst queue


def test_varying_jobs_widen_the_margin_and_the_mean_follows_the_load() -> None:
    estimate = AdmissionEstimate()
    for held in [1.0, 3.0] * 20:
        estimate.observe(held)
    assert 1.5 < estimate.service_s < 2.5
    assert estimate.service_high_s > estimate.service_s + 1.0
    for _ in range(60):
        estimate.observe(5.0)  # the load grew: jobs now share the engines with more
    assert estimate.service_s == pytest.approx(5.0, rel=0.05)


def test_bad_observations_are_ignored() -> None:
    estimate = AdmissionEstimate()
    estimate.observe(float("nan"))
    estimate.observe(-1.0)
    assert estimate.service_s is None
    with pytest.raises(ValueError):
        AdmissionEstimate(weight=0)
