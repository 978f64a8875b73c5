"""The message contract: what a producer may put on the work queue, and what the worker sends."""
from __future__ import annotations

import email
import email.policy
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from email_worker.message import (
    KNOWN_FIELDS,
    EmailJob,
    InvalidMessage,
    ParseOptions,
    build_email,
    message_id_for,
    parse_message,
)

SCHEMA = Path(__file__).resolve().parents[2] / "worker" / "email_worker" / "message.schema.json"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@dataclass
class Props:
    content_type: str | None = "application/json"
    content_encoding: str | None = None
    message_id: str | None = None
    timestamp: int | None = None
    headers: dict[str, Any] | None = None


def body(**fields: Any) -> bytes:
    job = {"id": "job-1", "to": "alice@example.com", "from": "App <app@example.com>", "subject": "Hello",
           "text": "plain body"}
    job.update(fields)
    return json.dumps({k: v for k, v in job.items() if v is not ...}).encode()


def test_a_full_job_parses_into_typed_fields() -> None:
    job = parse_message(body(
        to=["alice@example.com", "Bob Smith <bob@example.org>"], cc="carol@example.com", bcc=["dave@example.net"],
        reply_to="support@example.com", html="<p>hi</p>", headers={"X-Campaign": "spring"},
        metadata={"tenant": 7}, created_at="2026-01-02T03:04:05Z"), Props(timestamp=1767322000))
    assert job.id == "job-1"
    assert job.to == ("alice@example.com", "Bob Smith <bob@example.org>")
    assert job.cc == ("carol@example.com",) and job.bcc == ("dave@example.net",)
    assert job.envelope_recipients == ("alice@example.com", "bob@example.org", "carol@example.com",
                                       "dave@example.net")
    assert job.envelope_sender == "app@example.com"
    assert job.headers == (("X-Campaign", "spring"),)
    assert job.metadata["tenant"] == 7
    assert job.created_at == NOW
    assert job.enqueued_at == 1767322000.0
    assert job.attempts == 0


@pytest.mark.parametrize("raw, props, fragment", [
    # not JSON / not UTF-8 / wrong shape
    (b"not json", Props(), "not JSON"),
    (b"\xff\xfe{}", Props(), "not UTF-8"),
    (b"[1, 2]", Props(), "JSON object"),
    (b'{"to": "a@b.co", "to": "c@d.co", "from": "x@y.co", "text": "t"}', Props(), "duplicate key"),
    (b'{"to": "a@b.co", "from": "x@y.co", "text": NaN}', Props(), "not JSON"),
    # missing or unknown fields
    (body(to=...), Props(), "missing field: to"),
    (body(to=[]), Props(), "to is empty"),
    (body(text=...), Props(), "text and/or html"),
    (body(subjet="typo"), Props(), "unknown field"),
    # header injection: CR or LF in any header value
    (body(subject="Hi\r\nBcc: victim@example.com"), Props(), "CR/LF in subject"),
    (body(subject="Hi\nX: y"), Props(), "CR/LF in subject"),
    (body(to="alice@example.com\r\nBcc: evil@example.com"), Props(), "CR/LF in to"),
    (body(headers={"X-Tag": "a\r\nBcc: evil@example.com"}), Props(), "CR/LF in header X-Tag"),
    (body(headers={"Bad Name": "v"}), Props(), "invalid header name"),
    (body(headers={"Bcc": "evil@example.com"}), Props(), "cannot be overridden"),
    (body(headers={"message-id": "<x@y>"}), Props(), "cannot be overridden"),
    # addresses
    (body(to="not-an-address"), Props(), "invalid address in to"),
    (body(to="alice@"), Props(), "invalid address in to"),
    (body(to="alice@example.com, evil@example.com"), Props(), "invalid address in to"),  # smuggled 2nd rcpt
    (body(to="alice@example.com <evil@example.com>"), Props(), "invalid address in to"),
    (body(cc=["ok@example.com", "bad address@example.com"]), Props(), "invalid address in cc"),
    (body(**{"from": "nobody"}), Props(), "invalid address in from"),
    (body(to=42), Props(), "to must be"),
    # transport properties
    (body(), Props(content_type="text/plain"), "unknown content type"),
    (body(), Props(content_type="application/json; charset=latin-1"), "unsupported charset"),
    (body(), Props(content_encoding="gzip"), "content encoding"),
    # ids and dates
    (body(id="../../etc"), Props(), "invalid id"),
    (body(id="a b"), Props(), "invalid id"),
    (body(id=5), Props(), "id must be a string"),
    (body(created_at="yesterday"), Props(), "created_at"),
    (body(created_at="2026-01-02T03:04:05"), Props(), "timezone"),
    (body(subject="x" * 999), Props(), "subject too long"),
])
def test_bad_input_is_rejected_with_a_reason(raw: bytes, props: Props, fragment: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_message(raw, props)
    assert fragment in caught.value.reason


def test_oversize_body_is_rejected_before_decoding() -> None:
    big = body(text="x" * 2000)
    with pytest.raises(InvalidMessage, match="too large"):
        parse_message(big, Props(), ParseOptions(max_body_bytes=1000))
    assert parse_message(big, Props(), ParseOptions(max_body_bytes=len(big))).text == "x" * 2000


def test_recipient_cap() -> None:
    with pytest.raises(InvalidMessage, match="too many recipients"):
        parse_message(body(to=[f"u{i}@example.com" for i in range(3)]), Props(), ParseOptions(max_recipients=2))


def test_default_from_applies_only_when_from_is_missing() -> None:
    raw = body(**{"from": ...})
    with pytest.raises(InvalidMessage, match="missing field: from"):
        parse_message(raw, Props())
    assert parse_message(raw, Props(), ParseOptions(default_from="noreply@example.com")).from_ == \
        "noreply@example.com"


def test_id_falls_back_to_amqp_message_id_then_to_a_stable_hash() -> None:
    raw = body(id=...)
    assert parse_message(raw, Props(message_id="amqp-7")).id == "amqp-7"
    first, again = parse_message(raw, Props()).id, parse_message(raw, Props()).id
    assert first == again and first.startswith("sha256-")  # a redelivery keeps its Message-ID


def test_missing_properties_and_json_charset_are_accepted() -> None:
    assert parse_message(body(), None).id == "job-1"
    assert parse_message(body(), Props(content_type="application/json; charset=utf-8")).id == "job-1"
    assert parse_message(body(), Props(content_type=None)).id == "job-1"


def test_attempt_counter_comes_from_the_retry_header_and_tolerates_garbage() -> None:
    assert parse_message(body(), Props(headers={"x-attempts": 3})).attempts == 3
    assert parse_message(body(), Props(headers={"x-attempts": "lots"})).attempts == 0


def test_schema_documents_exactly_the_accepted_fields() -> None:
    schema = json.loads(SCHEMA.read_text())
    assert set(schema["properties"]) == KNOWN_FIELDS
    assert schema["additionalProperties"] is False
    assert "to" in schema["required"]


# -- rendering -------------------------------------------------------------------------------

def render(job: EmailJob) -> email.message.EmailMessage:
    raw = build_email(job, message_id_domain="mail.example.com", date=NOW).as_bytes()
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def test_rendered_email_has_stable_message_id_and_never_shows_bcc() -> None:
    job = parse_message(body(cc="carol@example.com", bcc="secret@example.com", html="<b>hi</b>",
                             headers={"X-Campaign": "spring"}), Props())
    msg = render(job)
    assert msg["Message-ID"] == message_id_for("job-1", "mail.example.com") == "<job-1@mail.example.com>"
    assert msg["To"] == "alice@example.com" and msg["Cc"] == "carol@example.com"
    assert msg["Bcc"] is None and b"secret@example.com" not in bytes(msg)
    assert msg["X-Campaign"] == "spring"
    assert msg.get_content_type() == "multipart/alternative"
    assert msg.get_body(("plain",)).get_content().strip() == "plain body"
    assert msg.get_body(("html",)).get_content().strip() == "<b>hi</b>"


def test_html_only_and_unicode_survive_rendering() -> None:
    job = parse_message(body(text=..., html="<p>Grüße ✉</p>", subject="Grüße ✉",
                             to="Zoë Ünal <zoe@example.com>"), Props())
    msg = render(job)
    assert msg.get_content_type() == "text/html"
    assert msg["Subject"] == "Grüße ✉"
    assert msg["To"].addresses[0].display_name == "Zoë Ünal"


# -- properties ------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_either_parse_or_raise_invalid_message(raw: bytes) -> None:
    try:
        parse_message(raw, Props())
    except InvalidMessage as exc:
        assert exc.reason and "\n" not in exc.reason


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80), st.sampled_from(["subject", "to", "from", "reply_to"]), st.sampled_from(["\r", "\n"]))
def test_any_line_break_in_a_header_field_is_rejected(text: str, field_name: str, brk: str) -> None:
    value = text[: len(text) // 2] + brk + text[len(text) // 2:]
    with pytest.raises(InvalidMessage):
        parse_message(body(**{field_name: value}), Props())


@settings(max_examples=200, deadline=None)
@given(subject=st.text(max_size=120), header=st.text(max_size=60))
def test_accepted_jobs_render_without_extra_headers(subject: str, header: str) -> None:
    """Whatever text gets through parsing cannot add a header to the sent email."""
    try:
        job = parse_message(body(subject=subject, headers={"X-Note": header}), Props())
    except InvalidMessage:
        return
    msg = render(job)
    assert sorted(k.lower() for k in msg) == sorted(
        ["message-id", "date", "from", "to", "subject", "x-note", "mime-version", "content-type",
         "content-transfer-encoding"])


def test_long_and_quoted_headers_round_trip() -> None:
    recipients = [f"user{i}@example.com" for i in range(60)]
    subject = "word " * 60
    job = parse_message(body(to=recipients, subject=subject.strip(), **{"from": '"Smith, Bob" <bob@example.org>'}),
                        Props())
    msg = render(job)
    assert [a.addr_spec for a in msg["To"].addresses] == recipients
    assert msg["Subject"] == subject.strip()
    assert msg["From"].addresses[0].display_name == "Smith, Bob"


def test_envelope_override_narrows_recipients_but_never_adds_any() -> None:
    raw = body(to=["a@example.com", "b@example.com"], bcc="c@example.com")
    job = parse_message(raw, Props(headers={"x-envelope-recipients": ["C@example.com"]}))
    assert job.envelope_recipients == ("C@example.com",)
    assert job.all_recipients == ("a@example.com", "b@example.com", "c@example.com")
    with pytest.raises(InvalidMessage, match="not a recipient"):
        parse_message(raw, Props(headers={"x-envelope-recipients": ["intruder@example.com"]}))
    with pytest.raises(InvalidMessage, match="non-empty list"):
        parse_message(raw, Props(headers={"x-envelope-recipients": []}))
