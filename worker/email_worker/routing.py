"""What happens to a job whose send failed: which retry tier, the dead queue, or back to work.

Pure: `classify_failure` turns an SMTP reply code or an exception from smtplib/socket into
a `Failure`; `route_failure` combines it with the job's attempt count and the `RetryPolicy`
into a `Route`. The worker executes the route (publish with confirms, then ack).

Three classes: *permanent* (a 5xx about this message or its recipients: RCPT TO, DATA),
*temporary* (4xx, disconnects mid-transaction, timeouts: retry tiers), and *sender* — a
failure that is about our side of the session, not about the email: MAIL FROM refused with
a 5xx (relay or SPF misconfiguration), AUTH, HELO, TLS, or the connection itself. A
sender failure says nothing about the job, so it costs the job no attempt and never
dead-letters it: the job goes back to the work queue and the worker's circuit breaker
pauses consumption (`circuit.py`).
"""
from __future__ import annotations

import smtplib
from dataclasses import dataclass
from typing import Literal

FailureClass = Literal["temporary", "permanent", "sender"]
Action = Literal["retry", "dead", "requeue"]

# Dead-letter reasons are a metric label: keep this set small and fixed.
DEAD_INVALID = "invalid"        # the body breaks the message contract
DEAD_REJECTED = "rejected"      # the SMTP server answered 5xx
DEAD_EXHAUSTED = "exhausted"    # temporary failures outlasted every retry
DEAD_REASONS = (DEAD_INVALID, DEAD_REJECTED, DEAD_EXHAUSTED)


@dataclass(frozen=True)
class RetryTier:
    """A TTL queue that holds a job for `delay_seconds`, then dead-letters it back to work."""

    delay_seconds: float

    def __post_init__(self) -> None:
        if self.delay_seconds <= 0:
            raise ValueError("retry delay must be positive")

    @property
    def name(self) -> str:
        """Suffix used in queue names and metric labels: 10s, 600s, 500ms."""
        if float(self.delay_seconds).is_integer():
            return f"{int(self.delay_seconds)}s"
        return f"{round(self.delay_seconds * 1000)}ms"

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.delay_seconds * 1000))


@dataclass(frozen=True)
class RetryPolicy:
    """Retry tiers in order; after the last tier, further retries reuse it up to `max_retries`."""

    tiers: tuple[RetryTier, ...] = (RetryTier(10), RetryTier(60), RetryTier(600))
    max_retries: int = 8
    """Temporary failures tolerated before dead-lettering (default ≈ 1 h of outage)."""

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError("at least one retry tier is required")
        if len({tier.name for tier in self.tiers}) != len(self.tiers):
            raise ValueError("retry tiers must have distinct delays (one TTL per queue)")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    def tier_for(self, attempts: int) -> RetryTier:
        """The tier for the retry after `attempts` earlier failures."""
        return self.tiers[min(max(attempts, 0), len(self.tiers) - 1)]


@dataclass(frozen=True)
class Failure:
    failure_class: FailureClass
    detail: str
    """One line, safe to log and to put in a header (no body, no credentials)."""
    code: int | None = None


@dataclass(frozen=True)
class Route:
    action: Action
    """retry: next tier; dead: dead queue; requeue: back to the work queue, no attempt counted."""
    failure: Failure
    attempts: int
    """Failure count including this one (goes into the x-attempts header on retry)."""
    tier: RetryTier | None = None
    dead_reason: str | None = None


class SmtpSessionError(OSError):
    """Opening the SMTP session failed (connect, greeting, EHLO, STARTTLS/TLS, AUTH).

    Raised by `smtp.SmtpSender` with the original exception as `__cause__` and in `cause`,
    so classification knows the failure happened before any message was involved.
    """

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause


def classify_failure(failure: int | BaseException) -> Failure:
    """Sender-side (session, MAIL FROM 5xx) is "sender"; other 5xx replies are permanent;
    4xx, disconnects and timeouts mid-transaction are temporary."""
    if isinstance(failure, bool):
        raise TypeError("failure must be an SMTP code or an exception")
    if isinstance(failure, int):
        return _by_code(failure, f"smtp {failure}")
    if isinstance(failure, SmtpSessionError):
        cause = failure.cause
        code = getattr(cause, "smtp_code", None)
        text = _reply_text(cause) if isinstance(cause, smtplib.SMTPResponseException) else _one_line(str(cause))
        return Failure("sender", _one_line(f"{failure.stage} failed: {type(cause).__name__} "
                                           f"{code if code is not None else ''} {text}"), code)
    if isinstance(failure, smtplib.SMTPSenderRefused) and 500 <= failure.smtp_code < 600:
        # MAIL FROM refused for good: the relay does not accept our sender (SPF, relay
        # rights, account suspended). Every other email would fail the same way.
        return Failure("sender", _one_line(f"MAIL FROM refused {failure.smtp_code} {_reply_text(failure)}"),
                       failure.smtp_code)
    if isinstance(failure, smtplib.SMTPRecipientsRefused):
        codes = sorted({code for code, _ in failure.recipients.values()})
        # Retry if any recipient might succeed later; only an all-5xx refusal is final.
        permanent = bool(codes) and all(500 <= code < 600 for code in codes)
        return Failure("permanent" if permanent else "temporary",
                       f"all recipients refused ({', '.join(str(c) for c in codes)})", codes[0] if codes else None)
    if isinstance(failure, (smtplib.SMTPAuthenticationError, smtplib.SMTPConnectError, smtplib.SMTPHeloError)):
        # Our credentials, the server's greeting or our HELO: not this message's
        # fault, so never dead-letter mail because of them; pause and let the alerts shout.
        return Failure("sender", f"{type(failure).__name__} {getattr(failure, 'smtp_code', '')}".strip(),
                       getattr(failure, "smtp_code", None))
    if isinstance(failure, smtplib.SMTPResponseException):
        return _by_code(failure.smtp_code, f"{type(failure).__name__} {failure.smtp_code} {_reply_text(failure)}")
    if isinstance(failure, (smtplib.SMTPException, OSError, TimeoutError)):
        return Failure("temporary", f"{type(failure).__name__}: {_one_line(str(failure))}")
    # Unknown errors (bugs) retry too: bounded by max_retries, then dead-lettered, never lost.
    return Failure("temporary", f"unexpected {type(failure).__name__}: {_one_line(str(failure))}")


def route_failure(attempts: int, failure: int | BaseException,
                  policy: RetryPolicy = RetryPolicy()) -> Route:
    """Decide where a failed job goes. `attempts` = failures before this one."""
    classified = classify_failure(failure)
    if classified.failure_class == "sender":
        return Route("requeue", classified, max(attempts, 0))
    total = max(attempts, 0) + 1
    if classified.failure_class == "permanent":
        return Route("dead", classified, total, dead_reason=DEAD_REJECTED)
    if total > policy.max_retries:
        return Route("dead", classified, total, dead_reason=DEAD_EXHAUSTED)
    return Route("retry", classified, total, tier=policy.tier_for(attempts))


def parse_tiers(text: str) -> tuple[RetryTier, ...]:
    """"10s,60s,10m" or "1,2.5" (seconds) -> tiers; ValueError with the bad item named."""
    tiers = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        for suffix in ("ms", "s", "m", "h"):
            if item.endswith(suffix):
                number, scale = item[: -len(suffix)], units[suffix]
                break
        else:
            number, scale = item, 1.0
        try:
            tiers.append(RetryTier(float(number) * scale))
        except ValueError:
            raise ValueError(f"bad retry tier {item!r}: use e.g. 10s, 60s, 10m") from None
    if not tiers:
        raise ValueError("no retry tiers given")
    return tuple(tiers)


def _by_code(code: int, detail: str) -> Failure:
    if 500 <= code < 600:
        return Failure("permanent", _one_line(detail), code)
    return Failure("temporary", _one_line(detail), code)


def _reply_text(exc: smtplib.SMTPResponseException) -> str:
    message = exc.smtp_error
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return _one_line(text)


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."
