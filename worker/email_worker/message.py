"""The message contract: strict, pure parsing of a queued email job, and its MIME rendering.

This module owns what an `EmailJob` is and which bodies are acceptable on the work queue
(documented in docs/message-contract.md and message.schema.json). It does no I/O and reads
no clock: `parse_message` takes the AMQP body and properties and returns a frozen
`EmailJob` or raises `InvalidMessage(reason)`; `build_email` renders a job to an
`email.message.Message` with a Message-ID derived from the job id, so a redelivered
job is recognisable downstream.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from email.header import Header
from email.headerregistry import Address
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr
from types import MappingProxyType
from typing import Any, Protocol

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_RECIPIENTS = 100
# RFC 5322 recommends 78, mandates 998 characters per line; a longer subject is a bug upstream.
MAX_SUBJECT_CHARS = 998
MAX_ID_CHARS = 128

ACCEPTED_CONTENT_TYPES = frozenset({"application/json"})
ACCEPTED_CONTENT_ENCODINGS = frozenset({"", "identity", "utf-8", "utf8"})
KNOWN_FIELDS = frozenset({
    "id", "to", "cc", "bcc", "from", "reply_to", "subject", "text", "html", "headers", "metadata",
    "created_at",
})
# Headers the worker writes itself; letting a producer set them would allow spoofing or
# break threading/dedup downstream.
RESERVED_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "reply-to", "subject", "message-id", "date", "mime-version",
    "content-type", "content-transfer-encoding", "sender", "return-path", "received",
})
ATTEMPTS_HEADER = "x-attempts"
ENVELOPE_HEADER = "x-envelope-recipients"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
_FIELD_NAME_RE = re.compile(r"^[!-9;-~]+$")  # printable ASCII without colon (RFC 5322 ftext)
_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+)*$")
_DOMAIN_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?$")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_NAME_ADDR_RE = re.compile(r"^(?P<display>.*?)\s*<(?P<addr>[^<>]*)>$", re.DOTALL)
_PHRASE_SPECIALS = frozenset('<>@,;:"()[]\\')


class InvalidMessage(ValueError):
    """The body cannot become an email. `reason` is safe to log: it never quotes the body."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AmqpProperties(Protocol):
    """The subset of pika.BasicProperties the parser reads (duck-typed to stay pika-free)."""

    content_type: str | None
    content_encoding: str | None
    message_id: str | None
    timestamp: int | None
    headers: Mapping[str, Any] | None


@dataclass(frozen=True)
class ParseOptions:
    """Limits and defaults applied while parsing."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest AMQP body accepted, in bytes (attachments belong in object storage)."""
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    """Largest to+cc+bcc count; bulk mail should be one job per recipient."""
    default_from: str | None = None
    """Sender used when the job has no `from`; None makes `from` mandatory."""


DEFAULT_OPTIONS = ParseOptions()


@dataclass(frozen=True)
class EmailJob:
    """One email to send, validated. Addresses are display strings ("Name <a@b.c>" or "a@b.c")."""

    id: str
    to: tuple[str, ...]
    from_: str
    subject: str
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()
    text: str | None = None
    html: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    created_at: datetime | None = None
    enqueued_at: float | None = None
    """AMQP `timestamp` property (epoch seconds) when the publisher set one."""
    attempts: int = 0
    """Temporary failures so far (the `x-attempts` header the worker sets on retry)."""
    only_recipients: tuple[str, ...] = ()
    """When set (`x-envelope-recipients` header), RCPT TO only these: the rest of the job's
    recipients already got it (a retry after a partial refusal)."""

    @property
    def all_recipients(self) -> tuple[str, ...]:
        """Bare addresses of to, cc and bcc (bcc never appears in headers)."""
        return tuple(split_address(a)[1] for a in (*self.to, *self.cc, *self.bcc))

    @property
    def envelope_recipients(self) -> tuple[str, ...]:
        """Bare addresses for RCPT TO."""
        return self.only_recipients or self.all_recipients

    @property
    def envelope_sender(self) -> str:
        return split_address(self.from_)[1]


def parse_message(body: bytes, properties: AmqpProperties | None = None,
                  options: ParseOptions = DEFAULT_OPTIONS) -> EmailJob:
    """Validate an AMQP delivery and return the job; raise InvalidMessage(reason) otherwise."""
    _check_properties(properties)
    if len(body) > options.max_body_bytes:
        raise InvalidMessage(f"body too large: {len(body)} bytes > limit {options.max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"body is not UTF-8 (byte {exc.start})") from None
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except (json.JSONDecodeError, _DuplicateKey, ValueError) as exc:
        raise InvalidMessage(f"body is not JSON: {_json_error(exc)}") from None
    if not isinstance(document, dict):
        raise InvalidMessage(f"body must be a JSON object, got {type(document).__name__}")
    unknown = sorted(set(document) - KNOWN_FIELDS)
    if unknown:
        raise InvalidMessage(f"unknown field(s): {', '.join(_clip(k) for k in unknown)}")

    job_id = _job_id(document.get("id"), properties, body)
    if "to" not in document:
        raise InvalidMessage("missing field: to")
    to = _addresses(document["to"], "to", required=True)
    cc = _addresses(document.get("cc"), "cc")
    bcc = _addresses(document.get("bcc"), "bcc")
    reply_to = _addresses(document.get("reply_to"), "reply_to")
    if len(to) + len(cc) + len(bcc) > options.max_recipients:
        raise InvalidMessage(f"too many recipients: {len(to) + len(cc) + len(bcc)} > {options.max_recipients}")
    sender_raw = document.get("from", options.default_from)
    if sender_raw is None:
        raise InvalidMessage("missing field: from")
    from_ = _address(sender_raw, "from")

    subject = document.get("subject", "")
    if not isinstance(subject, str):
        raise InvalidMessage("subject must be a string")
    _no_line_breaks(subject, "subject")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise InvalidMessage(f"subject too long: {len(subject)} > {MAX_SUBJECT_CHARS} characters")

    text_body, html_body = document.get("text"), document.get("html")
    for name, value in (("text", text_body), ("html", html_body)):
        if value is not None and not isinstance(value, str):
            raise InvalidMessage(f"{name} must be a string")
    if text_body is None and html_body is None:
        raise InvalidMessage("missing body: text and/or html is required")

    job = EmailJob(
        id=job_id, to=to, cc=cc, bcc=bcc, reply_to=reply_to, from_=from_, subject=subject,
        text=text_body, html=html_body, headers=_headers(document.get("headers")),
        metadata=_metadata(document.get("metadata")), created_at=_created_at(document.get("created_at")),
        enqueued_at=_timestamp(properties), attempts=_attempts(properties),
    )
    only = _only_recipients(properties, job.all_recipients)
    return replace(job, only_recipients=only) if only else job


def build_email(job: EmailJob, *, message_id_domain: str, date: datetime) -> Message:
    """Render the job as a MIME message ready for smtplib. Bcc is never written.

    Built with the compat32 classes (MIMEText, Header) rather than EmailMessage: the header
    registry parses every address again and costs ~15x more CPU per email, which shows up
    directly in worker throughput. Inputs are already validated, so nothing needs re-parsing;
    non-ASCII display names, subjects and header values become RFC 2047 encoded words.
    """
    if job.text is not None and job.html is not None:
        msg: Message = MIMEMultipart("alternative")
        msg.attach(MIMEText(job.text, "plain", "utf-8"))
        msg.attach(MIMEText(job.html, "html", "utf-8"))
    elif job.text is not None:
        msg = MIMEText(job.text, "plain", "utf-8")
    else:
        msg = MIMEText(job.html or "", "html", "utf-8")
    msg["Message-ID"] = message_id_for(job.id, message_id_domain)
    msg["Date"] = format_datetime(job.created_at or date)
    msg["From"] = _address_header((job.from_,))
    msg["To"] = _address_header(job.to)
    if job.cc:
        msg["Cc"] = _address_header(job.cc)
    if job.reply_to:
        msg["Reply-To"] = _address_header(job.reply_to)
    _set_text_header(msg, "Subject", job.subject)
    for name, value in job.headers:
        _set_text_header(msg, name, value)
    return msg


def _address_header(addresses: tuple[str, ...]) -> str:
    return ", ".join(formataddr(split_address(a), charset="utf-8") for a in addresses)


def _set_text_header(msg: Message, name: str, value: str) -> None:
    """ASCII as is; anything else as a compat32 Header, which the generator writes as encoded words."""
    if value.isascii():
        msg[name] = value
    else:
        # compat32 messages take Header values (that is what Header is for); typeshed types the MIME
        # classes as Message[str, str], so the assignment needs this one targeted ignore.
        msg[name] = Header(value, "utf-8")  # type: ignore[assignment]


def message_id_for(job_id: str, domain: str) -> str:
    """The RFC 5322 Message-ID for a job: stable across redeliveries so duplicates are recognisable."""
    return f"<{job_id}@{domain}>"


# -- helpers ---------------------------------------------------------------------------------------

class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys are ambiguous (which "to" wins?) and a classic smuggling trick.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"duplicate key {_clip(key)!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_error(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return str(exc)


def _clip(value: str, limit: int = 40) -> str:
    # Reasons end up in headers and logs: keep them short and on one line.
    # Every non-printable character (CR, LF, NEL, U+2028, other controls) is escaped.
    flat = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in value)
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _check_properties(properties: AmqpProperties | None) -> None:
    if properties is None:
        return
    content_type = (getattr(properties, "content_type", None) or "").strip()
    if content_type:
        media, _, params = content_type.partition(";")
        if media.strip().lower() not in ACCEPTED_CONTENT_TYPES:
            raise InvalidMessage(f"unknown content type: {_clip(content_type)}")
        charset = re.search(r"charset\s*=\s*\"?([^\";\s]+)", params, re.IGNORECASE)
        if charset and charset.group(1).lower() not in ("utf-8", "utf8"):
            raise InvalidMessage(f"unsupported charset: {_clip(charset.group(1))}")
    encoding = (getattr(properties, "content_encoding", None) or "").strip().lower()
    if encoding not in ACCEPTED_CONTENT_ENCODINGS:
        raise InvalidMessage(f"unsupported content encoding: {_clip(encoding)}")


def _job_id(raw: Any, properties: AmqpProperties | None, body: bytes) -> str:
    if raw is None:
        raw = getattr(properties, "message_id", None) if properties is not None else None
    if raw is None:
        # Deterministic, so a redelivered id-less job still gets the same Message-ID.
        return "sha256-" + hashlib.sha256(body).hexdigest()[:32]
    if not isinstance(raw, str):
        raise InvalidMessage("id must be a string")
    if len(raw) > MAX_ID_CHARS or not _ID_RE.match(raw):
        raise InvalidMessage(f"invalid id (1-{MAX_ID_CHARS} of A-Z a-z 0-9 . _ -): {_clip(raw)!r}")
    return raw


def _no_line_breaks(value: str, name: str) -> None:
    # CR/LF in a header value lets the producer inject headers (e.g. a hidden Bcc).
    if "\r" in value or "\n" in value:
        raise InvalidMessage(f"header injection: CR/LF in {_clip(name)}")
    # Other C0 controls and Unicode line separators (\x1c-\x1e, \x85, \u2028...) are line
    # breaks to Python's email package too; refuse them here rather than fail at send time.
    if _CONTROL_RE.search(value) or len(value.splitlines()) > 1:
        raise InvalidMessage(f"control character in {_clip(name)}")


def _addresses(raw: Any, name: str, required: bool = False) -> tuple[str, ...]:
    if raw is None:
        if required:
            raise InvalidMessage(f"missing field: {name}")
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise InvalidMessage(f"{name} must be an address or a list of addresses")
    if required and not items:
        raise InvalidMessage(f"{name} is empty")
    return tuple(_address(item, name) for item in items)


def _address(raw: Any, name: str) -> str:
    if not isinstance(raw, str):
        raise InvalidMessage(f"{name} must be an address string")
    _no_line_breaks(raw, name)
    try:
        display, addr_spec = split_address(raw)
    except ValueError:
        raise InvalidMessage(f"invalid address in {name}: {_clip(raw)!r}") from None
    if not _valid_addr_spec(addr_spec):
        raise InvalidMessage(f"invalid address in {name}: {_clip(raw)!r}")
    if display:
        # Re-render so quoting is ours, not the producer's.
        local, _, domain = addr_spec.rpartition("@")
        return str(Address(display_name=display, username=local, domain=domain))
    return addr_spec


def split_address(raw: str) -> tuple[str, str]:
    """Split "Name <a@b.c>" or "a@b.c" into (display name, addr-spec); ValueError if ambiguous.

    Stricter than email.utils.parseaddr, which silently keeps the first of several
    addresses ("a@b.c, evil@x.y") and so would let a producer smuggle recipients.
    """
    text = raw.strip()
    match = _NAME_ADDR_RE.match(text)
    if match is None:
        if any(ch in text for ch in _PHRASE_SPECIALS - {"@"}) or any(ch.isspace() for ch in text):
            raise ValueError("not a single address")
        return "", text
    display, addr_spec = match.group("display").strip(), match.group("addr").strip()
    if len(display) >= 2 and display[0] == display[-1] == '"':
        inner = display[1:-1]
        if re.search(r'(?<!\\)"', inner):
            raise ValueError("unbalanced quotes in display name")
        display = re.sub(r"\\(.)", r"\1", inner)
    elif any(ch in _PHRASE_SPECIALS for ch in display):
        raise ValueError("special characters in an unquoted display name")
    return display, addr_spec


def _valid_addr_spec(addr_spec: str) -> bool:
    if len(addr_spec) > 254 or addr_spec.count("@") != 1:
        return False
    local, domain = addr_spec.split("@")
    if not local or len(local) > 64 or not _LOCAL_RE.match(local):
        return False
    labels = domain.split(".")
    return len(labels) >= 1 and all(_DOMAIN_LABEL_RE.match(label) for label in labels)


def _headers(raw: Any) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise InvalidMessage("headers must be an object of name -> string")
    result = []
    for name, value in raw.items():
        if not _FIELD_NAME_RE.match(name) or len(name) > 76:
            raise InvalidMessage(f"invalid header name: {_clip(name)!r}")
        if name.lower() in RESERVED_HEADERS:
            raise InvalidMessage(f"header {name} is set by the worker and cannot be overridden")
        if not isinstance(value, str):
            raise InvalidMessage(f"header {name} must be a string")
        _no_line_breaks(value, f"header {name}")
        result.append((name, value))
    return tuple(result)


def _metadata(raw: Any) -> Mapping[str, Any]:
    if raw is None:
        return MappingProxyType({})
    if not isinstance(raw, dict):
        raise InvalidMessage("metadata must be an object")
    return MappingProxyType(dict(raw))


def _created_at(raw: Any) -> datetime | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InvalidMessage("created_at must be an RFC 3339 string")
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidMessage(f"created_at is not RFC 3339: {_clip(raw)!r}") from None
    if parsed.tzinfo is None:
        raise InvalidMessage("created_at needs a timezone offset (e.g. Z or +00:00)")
    return parsed


def _timestamp(properties: AmqpProperties | None) -> float | None:
    value = getattr(properties, "timestamp", None) if properties is not None else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _only_recipients(properties: AmqpProperties | None, recipients: tuple[str, ...]) -> tuple[str, ...]:
    headers = getattr(properties, "headers", None) if properties is not None else None
    value = (headers or {}).get(ENVELOPE_HEADER)
    if value is None:
        return ()
    if isinstance(value, (bytes, str)):
        value = [value]
    items = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value] \
        if isinstance(value, list) else None
    if not items or not all(isinstance(v, str) for v in items):
        raise InvalidMessage(f"{ENVELOPE_HEADER} must be a non-empty list of addresses")
    known = {r.lower() for r in recipients}
    if any(v.lower() not in known for v in items):
        # Only ever a subset of the job's own recipients: the header must not add any.
        raise InvalidMessage(f"{ENVELOPE_HEADER} names an address that is not a recipient of the job")
    return tuple(items)


def _attempts(properties: AmqpProperties | None) -> int:
    headers = getattr(properties, "headers", None) if properties is not None else None
    value = (headers or {}).get(ATTEMPTS_HEADER, 0)
    # A malformed counter must not make the job unsendable; treat it as a first attempt.
    return value if isinstance(value, int) and value >= 0 else 0
