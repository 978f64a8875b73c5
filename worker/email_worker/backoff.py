"""Capped exponential backoff with optional jitter: the one retry schedule of the project.

Owns the delay between attempts at something that keeps failing (a broker connection, an
SMTP connection, a broker's HTTP API): `backoff_delay(failures)` is the pure schedule, and
`Backoff` remembers the failures in a row and when the next attempt is allowed, for callers
that refuse attempts instead of sleeping (the operator's broker probes, the SMTP sender).

It lives in the worker library because the worker must not import the operator, and the
operator may depend on the worker library (it already ships in the operator's image).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable

# 2^16 times the base is beyond any cap in use; stopping there keeps the float finite
# however long an outage lasts.
_MAX_DOUBLINGS = 16


def backoff_delay(failures: int, base: float, cap: float, jitter: float = 0.0,
                  uniform: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait after `failures` failures in a row: base·2^(failures-1), at most `cap`,
    then times a factor drawn from [1 - jitter, 1 + jitter] (`uniform(a, b)`), so a fleet
    restarted together does not retry in lockstep. No failure, no wait (0)."""
    if base <= 0 or cap < base:
        raise ValueError(f"backoff needs 0 < base <= cap (got base {base}, cap {cap})")
    if not 0 <= jitter < 1:
        raise ValueError(f"backoff jitter must be in [0, 1) (got {jitter})")
    if failures <= 0:
        return 0.0
    delay = min(cap, base * 2.0 ** min(failures - 1, _MAX_DOUBLINGS))
    return delay * uniform(1 - jitter, 1 + jitter) if jitter else delay


class Backoff:
    """Failures in a row and when the next attempt may start (`backoff_delay` spacing).

    `failed()` after each failure, `succeeded()` after a success (back to no wait);
    `remaining()` is how long the caller should still hold off.
    """

    def __init__(self, base: float, cap: float, jitter: float = 0.0,
                 clock: Callable[[], float] = time.monotonic,
                 uniform: Callable[[float, float], float] = random.uniform) -> None:
        backoff_delay(1, base, cap, jitter, uniform)  # validates the settings now, not at the first failure
        self.base, self.cap, self.jitter = base, cap, jitter
        self.clock, self.uniform = clock, uniform
        self.failures = 0
        self.next_attempt_at = 0.0
        self.last_error = ""
        """What failed last (for messages that say why an attempt is refused)."""

    def failed(self, error: str = "") -> float:
        """Record a failure; returns the delay before the next attempt."""
        self.failures += 1
        self.last_error = error
        delay = backoff_delay(self.failures, self.base, self.cap, self.jitter, self.uniform)
        self.next_attempt_at = self.clock() + delay
        return delay

    def succeeded(self) -> None:
        """Reset: the next failure waits `base` again."""
        self.failures, self.next_attempt_at, self.last_error = 0, 0.0, ""

    def remaining(self) -> float:
        """Seconds until the next attempt is allowed (0: go ahead)."""
        return max(0.0, self.next_attempt_at - self.clock())
