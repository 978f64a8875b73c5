"""Circuit breaker for sender-side SMTP failures (pure: the clock is an argument).

A sender-side failure (MAIL FROM refused with a 5xx, AUTH, TLS, HELO, connect: see
`routing`) is about our relay session, not about one email, so pushing more email at it
only churns the queue. The worker feeds every outcome into a `CircuitBreaker`:

    closed ──failure──► open (pause `delay`) ──delay over──► half-open
       ▲                  ▲                                      │
       └──── success ─────┼──────────────────────────────────────┤
                          └──── failure (delay doubles, capped) ─┘

While open the worker consumes nothing and reports not-ready; in half-open it consumes
again and the first outcome decides. A success anywhere closes the circuit and resets
the delay. Failures that are about one email (4xx, RCPT/DATA 5xx) are not reported here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

State = Literal["closed", "open", "half-open"]


@dataclass(frozen=True)
class CircuitBreaker:
    initial_delay: float = 5.0
    """Pause after the first sender-side failure, seconds."""
    max_delay: float = 60.0
    """Cap of the doubling pause."""
    opened_at: float | None = None
    """When the current pause began (None: closed)."""
    delay: float = 0.0
    """Length of the current pause (0 when closed)."""
    trips: int = 0
    """Consecutive openings without a success in between."""

    def __post_init__(self) -> None:
        if not 0 < self.initial_delay <= self.max_delay:
            raise ValueError("circuit delays need 0 < initial_delay <= max_delay")

    def state(self, now: float) -> State:
        if self.opened_at is None:
            return "closed"
        return "open" if now < self.opened_at + self.delay else "half-open"

    def retry_in(self, now: float) -> float:
        """Seconds until half-open (0 when closed or already half-open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.delay - now)

    def failure(self, now: float) -> CircuitBreaker:
        """A sender-side failure: open, or re-open with a doubled delay if the last probe failed."""
        state = self.state(now)
        if state == "open":
            return self  # failures of sends already under way when it opened: one trip, one delay
        delay = min(self.max_delay, self.initial_delay * 2 ** min(self.trips, 32))
        return replace(self, opened_at=now, delay=delay, trips=self.trips + 1)

    def success(self) -> CircuitBreaker:
        """The relay accepted an email (or refused it for a reason about that email): close."""
        return replace(self, opened_at=None, delay=0.0, trips=0)
