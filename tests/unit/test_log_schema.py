"""One log schema for the project: the worker's JSON lines and the operator's (`run --log-format=json`)
carry the same keys for the same record, and a failure's traceback is in the line."""
from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from email_worker.logs import LOG_KEYS, JsonFormatter, rfc3339_utc, setup_logging
from emailqueue_operator.runner import configure_logging


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Setup functions replace the root logger's handlers and level: give them back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _installed_formatter(setup: Callable[[], None]) -> logging.Formatter:
    """The formatter a setup function leaves on the root logger's handler."""
    root = logging.getLogger()
    root.handlers[:] = [logging.StreamHandler(io.StringIO())]  # what basicConfig gives the operator
    setup()
    formatter = root.handlers[0].formatter
    assert formatter is not None
    return formatter


def _failing_record(**attrs: Any) -> logging.LogRecord:
    def connect() -> None:
        raise ConnectionError("cannot reach amqp://operator:hunter2@rabbit:5672/")

    try:
        connect()
    except ConnectionError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("emailqueue_operator.poller", logging.ERROR, __file__, 42,
                               "probe %s failed", ("orders",), exc_info)
    record.created, record.msecs = 1_790_000_000.25, 250.0
    for name, value in attrs.items():
        setattr(record, name, value)
    return record


@pytest.mark.usefixtures("root_logging")
def test_worker_and_operator_write_the_same_keys_and_values() -> None:
    worker = _installed_formatter(lambda: setup_logging("info"))
    operator = _installed_formatter(lambda: configure_logging("json", verbose=False))
    record = _failing_record(fields={"queue": "orders", "attempts": 3})

    worker_line, operator_line = json.loads(worker.format(record)), json.loads(operator.format(record))

    assert worker_line == operator_line
    assert tuple(worker_line)[:4] == LOG_KEYS == ("time", "level", "logger", "message")
    assert worker_line["time"] == "2026-09-21T14:13:20.250Z"
    assert worker_line["level"] == "error" and worker_line["logger"] == "emailqueue_operator.poller"
    assert worker_line["message"] == "probe orders failed"
    assert worker_line["queue"] == "orders" and worker_line["attempts"] == 3  # structured extras, flat


@pytest.mark.usefixtures("root_logging")
def test_an_exception_keeps_its_traceback_without_the_password() -> None:
    operator = _installed_formatter(lambda: configure_logging("json", verbose=False))
    line = operator.format(_failing_record())
    entry = json.loads(line)

    assert entry["error"] == "ConnectionError: cannot reach amqp://operator:***@rabbit:5672/"
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert "in connect" in entry["exception"]  # the frame that raised, not only the message
    assert entry["exception"].rstrip().endswith("ConnectionError: cannot reach amqp://operator:***@rabbit:5672/")
    assert "hunter2" not in line
    assert "\n" not in line  # one line per record, whatever the traceback


@pytest.mark.usefixtures("root_logging")
def test_stack_info_and_the_kopf_object_reference_are_kept() -> None:
    operator = _installed_formatter(lambda: configure_logging("json", verbose=False))
    ref = {"apiVersion": "emailqueue.dev/v1alpha1", "kind": "EmailQueue", "name": "orders",
           "uid": "u-1", "namespace": "mail"}
    record = logging.LogRecord("kopf.objects", logging.INFO, __file__, 7, "scaled", None, None)
    record.stack_info = "Stack (most recent call last):\n  File \"x.py\", line 1, in <module>"
    record.k8s_ref = ref  # what kopf's per-object logger attaches

    entry = json.loads(operator.format(record))

    assert entry["object"] == ref
    assert entry["stack"].startswith("Stack (most recent call last):")
    assert "exception" not in entry and "error" not in entry


def test_a_field_never_replaces_a_schema_key() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.log_schema.fields")
    logger.addHandler(handler)
    logger.propagate = False
    logger.warning("real message", extra={"fields": {"message": "spoofed", "level": "debug", "job_id": "j1"}})
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "real message" and entry["level"] == "warning" and entry["job_id"] == "j1"


@pytest.mark.parametrize("created", [0.0, 1_790_000_000.0, 1_790_000_000.9996, 1_790_000_000.123456])
def test_time_is_rfc3339_utc_with_milliseconds(created: float) -> None:
    text = rfc3339_utc(created)
    assert len(text) == len("2026-09-21T14:13:20.250Z") and text.endswith("Z")
    parsed = datetime.fromisoformat(text)
    assert parsed.tzinfo == UTC
    assert 0 <= created - parsed.timestamp() < 0.001  # truncated to the millisecond, never rounded up
