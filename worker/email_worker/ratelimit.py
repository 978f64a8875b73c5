"""A pure token bucket: the per-worker send-rate limit.

Values in, values out: the caller passes the current time (monotonic seconds) and gets a
new bucket plus how long to wait before sending. The worker keeps the bucket behind a lock
and sleeps; tests drive it with made-up clocks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up. rate <= 0 means unlimited."""

    rate: float
    burst: float = 1.0
    tokens: float | None = None
    """Tokens available at `updated_at`; None = a full bucket (fresh worker may burst)."""
    updated_at: float | None = None

    def __post_init__(self) -> None:
        if self.burst < 1:
            raise ValueError("burst must be >= 1 (one send needs one token)")

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def reserve(self, now: float) -> tuple[TokenBucket, float]:
        """Take one token. Returns the new bucket and the seconds to wait before using it.

        Reservations may drive the balance negative: concurrent senders queue up behind each
        other instead of all waking at once and overshooting the rate.
        """
        if self.unlimited:
            return self, 0.0
        available = self._available(now)
        remaining = available - 1.0
        wait = 0.0 if remaining >= 0 else -remaining / self.rate
        return replace(self, tokens=remaining, updated_at=now), wait

    def _available(self, now: float) -> float:
        if self.tokens is None or self.updated_at is None:
            return self.burst
        elapsed = max(0.0, now - self.updated_at)  # a clock that steps back must not mint tokens
        return min(self.burst, self.tokens + elapsed * self.rate)
