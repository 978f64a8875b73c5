"""Where a failed send goes: retry tier, or the dead queue with a reason."""
from __future__ import annotations

import smtplib

import pytest
from hypothesis import given, settings, strategies as st

from email_worker.routing import (
    DEAD_EXHAUSTED,
    DEAD_REJECTED,
    RetryPolicy,
    RetryTier,
    SmtpSessionError,
    classify_failure,
    parse_tiers,
    route_failure,
)

POLICY = RetryPolicy(tiers=(RetryTier(10), RetryTier(60), RetryTier(600)), max_retries=5)


@pytest.mark.parametrize("failure, expected", [
    (421, "temporary"),                                         # service shutting down
    (451, "temporary"),                                         # greylisting / local error
    (454, "temporary"),                                         # provider throttling
    (550, "permanent"),                                         # mailbox does not exist
    (554, "permanent"),                                         # rejected as spam
    (smtplib.SMTPDataError(452, b"out of storage"), "temporary"),
    (smtplib.SMTPDataError(552, b"message too big"), "permanent"),
    # MAIL FROM refused for good is about our sender (relay, SPF), not this email: circuit, not dead.
    (smtplib.SMTPSenderRefused(553, b"sender rejected", "a@b.c"), "sender"),
    (smtplib.SMTPSenderRefused(451, b"try later", "a@b.c"), "temporary"),
    (smtplib.SMTPRecipientsRefused({"a@b.c": (550, b"no"), "d@e.f": (551, b"no")}), "permanent"),
    (smtplib.SMTPRecipientsRefused({"a@b.c": (550, b"no"), "d@e.f": (450, b"busy")}), "temporary"),
    (smtplib.SMTPServerDisconnected("gone"), "temporary"),
    (ConnectionRefusedError(111, "refused"), "temporary"),
    (TimeoutError("timed out"), "temporary"),
    # Our own credentials or HELO being refused is never the message's fault: do not dead-letter.
    (smtplib.SMTPAuthenticationError(535, b"bad credentials"), "sender"),
    (smtplib.SMTPHeloError(501, b"bad helo"), "sender"),
    (smtplib.SMTPConnectError(554, b"go away"), "sender"),
    # Anything failing while the session opens (connect, EHLO, STARTTLS, AUTH) is sender-side.
    (SmtpSessionError("connect", ConnectionRefusedError(111, "refused")), "sender"),
    (SmtpSessionError("STARTTLS", smtplib.SMTPNotSupportedError("STARTTLS not offered")), "sender"),
    (SmtpSessionError("AUTH", smtplib.SMTPAuthenticationError(535, b"bad")), "sender"),
    # Mid-transaction: per message. SMTPUTF8 missing is about this email's addresses.
    (smtplib.SMTPNotSupportedError("SMTPUTF8 not supported"), "temporary"),
    (RuntimeError("bug"), "temporary"),                         # bounded by max_retries, never lost
])
def test_classification(failure: int | BaseException, expected: str) -> None:
    assert classify_failure(failure).failure_class == expected


def test_temporary_failures_walk_the_tiers_then_stay_on_the_last() -> None:
    tiers = [route_failure(attempts, 451, POLICY).tier for attempts in range(5)]
    assert [t.name for t in tiers if t] == ["10s", "60s", "600s", "600s", "600s"]
    assert route_failure(2, 451, POLICY).attempts == 3


def test_exhausted_retries_go_to_the_dead_queue() -> None:
    route = route_failure(5, 451, POLICY)
    assert (route.action, route.dead_reason, route.attempts) == ("dead", DEAD_EXHAUSTED, 6)


def test_a_5xx_is_dead_at_once_whatever_the_attempt_count() -> None:
    route = route_failure(0, smtplib.SMTPDataError(550, b"5.1.1 no such user"), POLICY)
    assert (route.action, route.dead_reason) == ("dead", DEAD_REJECTED)
    assert "550" in route.failure.detail and "no such user" in route.failure.detail


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=50), st.integers(min_value=400, max_value=599),
       st.integers(min_value=0, max_value=10))
def test_routing_invariants(attempts: int, code: int, max_retries: int) -> None:
    policy = RetryPolicy(tiers=(RetryTier(1), RetryTier(2)), max_retries=max_retries)
    route = route_failure(attempts, code, policy)
    assert route.attempts == attempts + 1
    if route.action == "retry":
        assert code < 500 and route.attempts <= max_retries and route.tier in policy.tiers
    else:
        assert route.dead_reason in (DEAD_REJECTED, DEAD_EXHAUSTED)
        assert code >= 500 or route.attempts > max_retries


@pytest.mark.parametrize("failure", [
    smtplib.SMTPSenderRefused(550, b"5.7.1 sender not allowed to relay", "app@example.com"),
    SmtpSessionError("AUTH", smtplib.SMTPAuthenticationError(535, b"5.7.8 bad credentials")),
    SmtpSessionError("connect", OSError(101, "network unreachable")),
])
def test_sender_side_failures_go_back_to_work_without_costing_an_attempt(failure: BaseException) -> None:
    # A relay misconfiguration must not dead-letter the queue at full speed, nor walk the
    # job through its retry budget: the job goes back as it was, the circuit pauses the worker.
    for attempts in (0, 3, 50):
        route = route_failure(attempts, failure, POLICY)
        assert (route.action, route.attempts, route.dead_reason, route.tier) == ("requeue", attempts, None, None)
        assert route.failure.failure_class == "sender"


def test_per_recipient_and_data_5xx_stay_permanent() -> None:
    refused = smtplib.SMTPRecipientsRefused({"a@b.c": (550, b"5.1.1 no such user")})
    assert route_failure(0, refused, POLICY).dead_reason == DEAD_REJECTED
    assert route_failure(0, smtplib.SMTPDataError(554, b"5.7.1 spam"), POLICY).dead_reason == DEAD_REJECTED


def test_parse_tiers_units_and_errors() -> None:
    assert [t.delay_seconds for t in parse_tiers("1s, 2.5, 10m, 500ms, 1h")] == [1, 2.5, 600, 0.5, 3600]
    assert [t.name for t in parse_tiers("10s,60s,600s")] == ["10s", "60s", "600s"]
    assert parse_tiers("500ms")[0].name == "500ms"
    for bad in ("", "ten", "0s", "-1s"):
        with pytest.raises(ValueError):
            parse_tiers(bad)


def test_policy_refuses_two_tiers_with_the_same_ttl() -> None:
    with pytest.raises(ValueError, match="distinct"):
        RetryPolicy(tiers=(RetryTier(10), RetryTier(10)))
