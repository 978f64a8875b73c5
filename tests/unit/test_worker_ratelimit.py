"""The per-worker token bucket: never more than burst + rate × elapsed sends."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from email_worker.ratelimit import TokenBucket


def test_unlimited_never_waits() -> None:
    bucket = TokenBucket(rate=0)
    for now in range(100):
        bucket, wait = bucket.reserve(float(now) / 1000)
        assert wait == 0


def test_burst_then_one_per_interval() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    waits = []
    for _ in range(5):
        bucket, wait = bucket.reserve(100.0)
        waits.append(round(wait, 6))
    assert waits == [0, 0, 0, 0.1, 0.2]  # queued reservations are spaced, not released together


def test_idle_time_refills_only_up_to_burst() -> None:
    bucket = TokenBucket(rate=1, burst=2)
    bucket, _ = bucket.reserve(0.0)
    bucket, _ = bucket.reserve(0.0)
    bucket, _ = bucket.reserve(3600.0)
    bucket, _ = bucket.reserve(3600.0)
    bucket, wait = bucket.reserve(3600.0)
    assert wait == pytest.approx(1.0)


def test_clock_stepping_back_mints_no_tokens() -> None:
    bucket = TokenBucket(rate=1, burst=1)
    bucket, _ = bucket.reserve(10.0)
    bucket, wait = bucket.reserve(5.0)
    assert wait == pytest.approx(1.0)


def test_burst_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0.5)


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(min_value=0.5, max_value=500), burst=st.integers(min_value=1, max_value=20),
       gaps=st.lists(st.floats(min_value=0, max_value=2), min_size=1, max_size=200))
def test_sends_never_exceed_burst_plus_rate_times_elapsed(rate: float, burst: int, gaps: list[float]) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    now, send_times = 0.0, []
    for gap in gaps:
        now += gap
        bucket, wait = bucket.reserve(now)
        send_times.append(now + wait)
    start = send_times[0]
    for count, at in enumerate(sorted(send_times), start=1):
        assert count <= burst + (at - start) * rate + 1e-6
