"""Fuzzing the message parser beyond tests/unit/test_message.py (issue 8: bad input).

test_message.py already covers arbitrary bytes, a CR/LF in one header field, and
subject/X-Note text rendering. Here: whole jobs of arbitrary JSON shape in every field,
header names and values built from the characters that split headers (CR, LF, NEL, the
Unicode line/paragraph separators, NUL, colon), address lists, non-UTF-8 encodings and
sizes around the limit. What a user relies on: the parser either returns a job or raises
`InvalidMessage` with a one-line reason (never another exception, never a crash of the
worker), and an accepted job renders an email with exactly the headers it asked for.
"""
from __future__ import annotations

import email
import email.policy
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from email_worker.message import InvalidMessage, ParseOptions, build_email, parse_message

from .test_message import Props

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASE_HEADERS = {"message-id", "date", "from", "to", "subject", "mime-version", "content-type",
                "content-transfer-encoding", "cc", "reply-to"}
# Characters that end a header line somewhere (SMTP, Python's email, mail clients).
SPLITTERS = ["\r", "\n", "\r\n", "\x85", "\u2028", "\u2029", "\x0b", "\x0c", "\x00", ":", " ", "\t"]



json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10)
hostile_text = st.lists(st.text(max_size=8) | st.sampled_from(SPLITTERS), max_size=8).map("".join)


def _outcome(raw: bytes, options: ParseOptions = ParseOptions()) -> Any:
    """parse → render; anything but a job or InvalidMessage fails the test."""
    try:
        job = parse_message(raw, Props(), options)
    except InvalidMessage as exc:
        assert exc.reason and "\n" not in exc.reason and "\r" not in exc.reason
        return None
    rendered = build_email(job, message_id_domain="mail.example.com", date=NOW).as_bytes()
    return job, email.message_from_bytes(rendered, policy=email.policy.default)


@FUZZ
@given(st.dictionaries(st.sampled_from(["id", "to", "from", "subject", "text", "html", "cc", "bcc", "reply_to",
                                        "headers", "metadata", "created_at", "unknown_field"]),
                       json_values, max_size=10))
def test_any_json_shape_in_any_field_parses_or_is_rejected_with_a_reason(fields: dict[str, Any]) -> None:
    _outcome(json.dumps(fields).encode())


@FUZZ
@given(name=hostile_text, value=hostile_text, subject=hostile_text, to=hostile_text)
def test_header_injection_never_adds_a_header(name: str, value: str, subject: str, to: str) -> None:
    job = {"id": "j", "to": f"a{to}@example.com", "from": "app@example.com", "subject": subject, "text": "x",
           "headers": {name: value}}
    result = _outcome(json.dumps(job).encode())
    if result is None:
        return
    parsed_job, msg = result
    # Exactly the base headers plus the custom ones the job carried: nothing smuggled in.
    expected = BASE_HEADERS | {k.lower() for k, _ in parsed_job.headers}
    assert {k.lower() for k in msg} <= expected
    assert len(msg.get_all("To") or []) == 1 and len(msg.get_all("Subject") or []) == 1
    assert msg.get_all("Bcc") is None


@FUZZ
@given(st.lists(hostile_text, min_size=1, max_size=5))
def test_hostile_recipient_lists_never_reach_the_envelope_unvalidated(addresses: list[str]) -> None:
    job = {"id": "j", "to": addresses, "from": "app@example.com", "subject": "s", "text": "x"}
    result = _outcome(json.dumps(job).encode())
    if result is None:
        return
    parsed_job, _ = result
    for rcpt in parsed_job.envelope_recipients:
        assert not any(c in rcpt for c in "\r\n\x00<>, ") and rcpt.count("@") == 1, rcpt


@FUZZ
@given(st.text(min_size=1, max_size=60).filter(lambda s: any(ord(c) > 127 for c in s)),
       st.sampled_from(["latin-1", "utf-16", "utf-32", "cp1252", "shift_jis"]))
def test_non_utf8_payloads_are_rejected_or_parsed_never_crash(subject: str, encoding: str) -> None:
    doc = json.dumps({"id": "j", "to": "a@example.com", "from": "app@example.com", "subject": subject, "text": "x"},
                     ensure_ascii=False)
    try:
        raw = doc.encode(encoding)
    except UnicodeEncodeError:
        return
    result = _outcome(raw)
    if result is not None and encoding not in ("utf-16", "utf-32"):
        # Only bytes that are also valid UTF-8 may pass, and then they mean what UTF-8 says.
        assert raw.decode("utf-8")


@pytest.mark.parametrize("extra, accepted", [
    (0, True),     # exactly at the limit
    (1, False),    # one byte over
    (10_000_000, False),  # 10 MB: rejected by size before any decoding
])
def test_payload_size_limit_is_exact(extra: int, accepted: bool) -> None:
    limit = 4096
    base = {"id": "j", "to": "a@example.com", "from": "app@example.com", "subject": "s", "text": ""}
    padding = limit - len(json.dumps(base).encode()) + extra
    raw = json.dumps({**base, "text": "x" * padding}).encode()
    assert len(raw) == limit + extra
    if accepted:
        assert parse_message(raw, Props(), ParseOptions(max_body_bytes=limit)).text == "x" * padding
    else:
        with pytest.raises(InvalidMessage, match="too large"):
            parse_message(raw, Props(), ParseOptions(max_body_bytes=limit))
