"""The shared retry schedule (email_worker.backoff): bounds, jitter range, reset."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, strategies as st

from email_worker.backoff import Backoff, backoff_delay


@pytest.mark.parametrize("failures, expected", [
    (0, 0.0),     # nothing failed: no wait
    (-1, 0.0),
    (1, 0.5),     # the first failure waits the base
    (2, 1.0),
    (3, 2.0),
    (7, 30.0),    # 0.5 * 64 = 32, capped at 30
    (10_000, 30.0),  # a day-long outage still yields the cap, not an overflow
])
def test_doubles_from_base_up_to_the_cap(failures: int, expected: float) -> None:
    assert backoff_delay(failures, base=0.5, cap=30.0) == expected


@given(failures=st.integers(1, 200), base=st.floats(0.01, 10), extra=st.floats(0, 100),
       jitter=st.floats(0, 0.99), draw=st.floats(0, 1))
def test_jitter_stays_within_its_band_around_the_capped_delay(failures: int, base: float, extra: float,
                                                              jitter: float, draw: float) -> None:
    cap = base + extra
    plain = backoff_delay(failures, base, cap)
    assert base <= plain <= cap
    # `uniform` stands in for random.uniform, drawing at a chosen point of its range.
    jittered = backoff_delay(failures, base, cap, jitter, uniform=lambda a, b: a + (b - a) * draw)
    assert plain * (1 - jitter) - 1e-9 <= jittered <= plain * (1 + jitter) + 1e-9


def test_jitter_spreads_a_fleet() -> None:
    rng = random.Random(7)
    delays = {backoff_delay(3, 0.5, 30.0, jitter=0.2, uniform=rng.uniform) for _ in range(50)}
    assert len(delays) == 50 and min(delays) >= 1.6 and max(delays) <= 2.4


@pytest.mark.parametrize("base, cap, jitter", [
    (0.0, 1.0, 0.0),   # no base: a busy loop
    (2.0, 1.0, 0.0),   # cap below base
    (1.0, 2.0, 1.0),   # jitter 1 could draw a zero wait
    (1.0, 2.0, -0.1),
])
def test_rejects_settings_that_would_spin(base: float, cap: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(1, base, cap, jitter)
    with pytest.raises(ValueError):
        Backoff(base, cap, jitter)


def test_backoff_holds_off_then_resets_on_success() -> None:
    now = [100.0]
    backoff = Backoff(base=1.0, cap=4.0, clock=lambda: now[0])
    assert backoff.remaining() == 0
    for expected in (1.0, 2.0, 4.0, 4.0):
        assert backoff.failed("refused") == expected
        assert backoff.remaining() == expected
        now[0] += expected / 2
        assert backoff.remaining() == expected / 2
        now[0] += expected / 2
        assert backoff.remaining() == 0
    assert (backoff.failures, backoff.last_error) == (4, "refused")
    backoff.succeeded()
    assert (backoff.failures, backoff.remaining(), backoff.last_error) == (0, 0, "")
    assert backoff.failed() == 1.0  # back to the base after a success
