"""Structured JSON logs and credential redaction.

One JSON object per line on stderr. Callers pass context with `extra={"fields": {...}}`;
only ids, counts, codes and reasons belong there, never a message body or a password.
`redact_url` strips the password from AMQP/SMTP URLs before they reach a log or an error.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_URL_IN_TEXT = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://)([^/\s:@]*):([^@\s]*)@")


def redact_url(url: str) -> str:
    """amqp://user:secret@host/vh -> amqp://user:***@host/vh (unparseable input is masked whole)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:***@{host}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:
        return "<unparseable url>"


def redact_text(text: str) -> str:
    """Mask passwords of any URLs embedded in free text (exception messages)."""
    return _URL_IN_TEXT.sub(lambda m: f"{m.group(1)}{m.group(2)}:***@", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_text(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entry["error"] = f"{type(exc).__name__}: {redact_text(str(exc))}"
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pika logs every frame-level hiccup at warning with full tracebacks; our own messages say it better.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
