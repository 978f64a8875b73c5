"""The SMTP circuit breaker: open on a sender-side failure, probe after a doubling pause, close on success."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from email_worker.circuit import CircuitBreaker


def test_closed_until_a_sender_side_failure_then_open_for_the_initial_delay() -> None:
    breaker = CircuitBreaker(initial_delay=5, max_delay=60)
    assert breaker.state(0) == "closed" and breaker.retry_in(0) == 0
    breaker = breaker.failure(100)
    assert breaker.state(100) == "open" and breaker.retry_in(101) == 4
    assert breaker.state(104.9) == "open"
    assert breaker.state(105) == "half-open" and breaker.retry_in(105) == 0


def test_failures_of_sends_already_under_way_do_not_stretch_the_pause() -> None:
    # With 4 sender threads, one outage produces up to 4 failures at once: one trip, one delay.
    breaker = CircuitBreaker(initial_delay=5, max_delay=60).failure(100)
    assert breaker.failure(101).failure(102) == breaker


def test_a_failed_probe_doubles_the_pause_up_to_the_cap() -> None:
    breaker, now, delays = CircuitBreaker(initial_delay=5, max_delay=60), 0.0, []
    for _ in range(6):
        breaker = breaker.failure(now)
        delays.append(breaker.delay)
        now += breaker.delay  # half-open: the probe fails again
    assert delays == [5, 10, 20, 40, 60, 60]
    assert breaker.trips == 6


def test_a_success_closes_and_resets_the_backoff() -> None:
    breaker = CircuitBreaker(initial_delay=5, max_delay=60).failure(0).failure(5).success()
    assert breaker.state(6) == "closed" and breaker.trips == 0
    assert breaker.failure(10).delay == 5


@pytest.mark.parametrize("initial, maximum", [(0, 10), (-1, 10), (20, 10)])
def test_bad_delays_are_refused(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(initial_delay=initial, max_delay=maximum)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(min_value=0, max_value=1000)), max_size=30))
def test_pause_stays_within_bounds_and_success_always_closes(events: list[tuple[bool, float]]) -> None:
    breaker, now = CircuitBreaker(initial_delay=2, max_delay=100), 0.0
    for failed, elapsed in events:
        now += elapsed
        breaker = breaker.failure(now) if failed else breaker.success()
        if failed:
            assert 2 <= breaker.delay <= 100 and breaker.state(now) == "open"
        else:
            assert breaker.state(now) == "closed"
