"""Structured JSON logs and credential redaction, for the worker and the operator alike.

One JSON object per line on stderr (`JsonFormatter`: time, level, logger, message, then
structured extras). Callers pass context with `extra={"fields": {...}}`;
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


# The one log schema of the project (worker and operator alike): every line is a JSON object with
# these keys first, then the structured extras. `jq 'select(.level == "error") | .message'` works
# on both.
LOG_KEYS = ("time", "level", "logger", "message")


def rfc3339_utc(created: float) -> str:
    """A record's time as RFC 3339 in UTC with milliseconds: 2026-12-02T01:02:03.456Z."""
    whole = int(created)
    millis = min(int((created - whole) * 1000), 999)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `time` (RFC 3339, UTC), `level` (lower case), `logger`, `message`,
    then the structured extras:

    - the caller's `extra={"fields": {...}}` (a field never replaces one of the keys above);
    - `object`: the Kubernetes object a kopf per-object logger names (its `k8s_ref`:
      apiVersion, kind, namespace, name, uid), as kopf's own JSON format calls it;
    - `error` (`Type: message`, one line to group by) and `exception` (the formatted traceback)
      when the record carries exc_info; `stack` when it carries stack_info.

    Message, error and traceback pass `redact_text`: a URL's password never reaches the log.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact_text(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict) and "object" not in entry:
            entry["object"] = {k: v for k, v in ref.items() if v is not None}
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entry["error"] = f"{type(exc).__name__}: {redact_text(str(exc))}"
            entry["exception"] = redact_text(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = redact_text(self.formatStack(record.stack_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pika logs every frame-level hiccup at warning with full tracebacks; our own messages say it better.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
