"""Rates from counters sampled over time (pure: values in, values out).

A counter is sampled as (t, value) pairs in the caller's clock; `counter_rate` turns the
samples into a per-second rate over a window the way Prometheus' `rate()` does without
extrapolation: a value lower than the one before it means the counter was reset, and the
new value is the increase since the reset.

`counter_rate_window(poll_seconds)` is the window the operator (prometheus metrics source)
and the simulator (`sim.py`, observation mode `prometheus`) both average counters over.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

# The two samples a rate is taken between must lie at least this fraction of the window
# apart: a rate over a sliver of the window (two scrapes a second apart) is mostly noise.
MIN_SPAN_FRACTION = 0.5

# A counter rate spans at least this many polls, so one late or lost scrape still leaves a
# rate, ...
RATE_WINDOW_POLLS = 2
# ... and never less than this: RabbitMQ refreshes queue counters on its 5 s stats tick
# (`collect_statistics_interval`), so a shorter window sees one tick's jump or nothing.
RATE_WINDOW_MIN_SECONDS = 10.0


def counter_rate_window(poll_seconds: float) -> float:
    """Seconds a counter rate is taken over at this poll interval: max(2 × poll, 10 s)."""
    return max(RATE_WINDOW_POLLS * float(poll_seconds), RATE_WINDOW_MIN_SECONDS)


def counter_increase(values: Sequence[float]) -> float:
    """Total increase along successive counter values; a decrease is a reset to zero."""
    total = 0.0
    for before, after in itertools.pairwise(values):
        total += after - before if after >= before else after
    return total


def counter_rate(samples: Sequence[tuple[float, float]], now: float, window: float) -> float | None:
    """Per-second rate of a counter over the `window` seconds ending at `now`.

    `samples` are (t, value) in ascending t. The rate runs from the newest sample at or
    before `now - window` (else the oldest sample) to the newest sample at or before `now`.
    None — unknown, not zero — when fewer than two samples are usable, when they span less
    than MIN_SPAN_FRACTION of the window, or when the newest sample is older than the window
    (the counter has not been read lately).
    """
    usable = [(t, v) for t, v in samples if t <= now]
    if len(usable) < 2 or window <= 0:
        return None
    end_t = usable[-1][0]
    cutoff = now - window
    if end_t <= cutoff:
        return None
    start = 0
    for i, (t, _) in enumerate(usable):
        if t <= cutoff:
            start = i
        else:
            break
    span = end_t - usable[start][0]
    if span <= 0 or span < window * MIN_SPAN_FRACTION:
        return None
    return counter_increase([v for _, v in usable[start:]]) / span
