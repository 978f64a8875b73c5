"""Counter rates: what the operator (prometheus source) and the simulator compute from counters."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from emailqueue_operator.rates import counter_increase, counter_rate, counter_rate_window


@pytest.mark.parametrize(("poll", "window"), [
    (1, 10.0),   # fast polls: never under two 5 s stats ticks
    (3, 10.0),   # the planner's poll for a 30 s start-up
    (5, 10.0),   # CRD default poll: exactly two polls
    (15, 30.0),  # slow polls: two polls
])
def test_window_is_two_polls_and_at_least_10s(poll: float, window: float) -> None:
    assert counter_rate_window(poll) == window


@pytest.mark.parametrize(("samples", "now", "window", "rate"), [
    # steady 10/s sampled every 5 s: (100 - 0) / 10
    ([(0, 0), (5, 50), (10, 100)], 10, 10, 10.0),
    # samples older than the window do not count: from t=10 (the edge) to t=20
    ([(0, 0), (10, 10), (15, 60), (20, 110)], 20, 10, 10.0),
    # the window edge falls between samples: from the newest sample at or before the edge
    ([(0, 0), (3, 30), (6, 60), (9, 90), (12, 120), (15, 150)], 15, 10, 10.0),
    # samples after `now` are ignored
    ([(0, 0), (5, 50), (10, 100), (15, 900)], 10, 10, 10.0),
    # a reset (broker restart): 40 -> 60 (+20), restart, 0 -> 10 (+10), 10 -> 30 (+20)
    ([(0, 40), (2.5, 60), (5, 10), (10, 30)], 10, 10, 5.0),
    # a counter that went back to exactly 0 and stayed there
    ([(0, 500), (5, 0), (10, 0)], 10, 10, 0.0),
    # fewer than two samples: unknown, not zero
    ([(10, 100)], 10, 10, None),
    ([], 10, 10, None),
    # two samples less than half the window apart (a retry): not a rate
    ([(9, 90), (10, 100)], 10, 10, None),
    # the newest sample is older than the window: the counter has not been read lately
    ([(0, 0), (5, 50)], 20, 10, None),
])
def test_counter_rate(samples: list[tuple[float, float]], now: float, window: float, rate: float | None) -> None:
    got = counter_rate(samples, now, window)
    assert got == (None if rate is None else pytest.approx(rate))


def test_counter_increase_treats_a_decrease_as_a_restart_from_zero() -> None:
    assert counter_increase([5, 7, 2, 4]) == pytest.approx(2 + 2 + 2)
    assert counter_increase([3]) == 0


@settings(max_examples=80, deadline=None)
@given(rate=st.floats(0, 1000), poll=st.sampled_from([1, 2, 3, 5, 10]), offset=st.floats(0, 1e6),
       reset_at=st.integers(27, 30))  # inside every window tried
def test_a_linear_counter_reads_its_slope_even_across_a_reset(rate: float, poll: int, offset: float,
                                                              reset_at: int) -> None:
    window = counter_rate_window(poll)
    times = [k * poll for k in range(31)]
    # The counter restarts from 0 at the reset_at-th sample (just after the sample before it).
    values = [offset + rate * t if k < reset_at else rate * (t - times[reset_at - 1])
              for k, t in enumerate(times)]
    got = counter_rate(list(zip(times, values, strict=True)), times[-1], window)
    assert got == pytest.approx(rate, rel=1e-6, abs=1e-6)
