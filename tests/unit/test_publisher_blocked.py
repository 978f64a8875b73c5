"""The publisher's side of a RabbitMQ resource alarm, without a broker (tests/integration/test_broker_alarm.py
drives the real disk alarm): the timeout reaches pika, the state follows connection.blocked/unblocked with
one log line per change, and the error says what became of the email."""
from __future__ import annotations

import logging
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec
import pytest

from email_worker import publisher as publisher_module
from email_worker.publisher import BrokerBlockedError, Publisher, PublishError, watch_blocked

URL = "amqp://app:s3cret-pw@broker.example:5672/mail"


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_blocked_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="blocked_timeout"):
        Publisher(URL, blocked_timeout=timeout)


def test_blocked_timeout_becomes_pikas_blocked_connection_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def refuse(parameters: Any) -> None:
        seen.extend(parameters)
        raise pika.exceptions.AMQPConnectionError("refused")

    monkeypatch.setattr(publisher_module.pika, "BlockingConnection", refuse)
    with pytest.raises(PublishError, match="cannot connect"):
        Publisher(URL + ",amqp://app:s3cret-pw@other.example/mail", blocked_timeout=2.5).publish_raw(b"{}")
    assert [p.blocked_connection_timeout for p in seen] == [2.5, 2.5]  # every node of the list
    assert Publisher(URL).blocked_timeout == 30.0


def test_blocked_state_follows_the_broker_with_one_log_line_per_change(caplog: pytest.LogCaptureFixture) -> None:
    publisher = Publisher(URL)
    assert publisher.blocked is None
    with caplog.at_level(logging.INFO, logger="email_worker.publisher"):
        publisher._on_blocked("low on disk")
        publisher._on_blocked("low on disk")  # a new connection blocked again during the same alarm
        assert publisher.blocked == "low on disk"
        publisher._on_unblocked()
        publisher._on_unblocked()  # a confirm after the unblock
    assert publisher.blocked is None
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "broker blocks publishing (resource alarm): publishes wait for it to clear, then fail"),
        ("INFO", "broker accepts publishes again")]
    assert "s3cret-pw" not in str(caplog.records[0].__dict__)


@pytest.mark.parametrize(("sent", "says"), [
    (False, "the email was NOT enqueued"),   # known blocked: nothing left the publisher
    (True, "the email was NOT confirmed"),   # the publish that met the alarm: on the wire, unconfirmed
])
def test_blocked_error_names_the_reason_and_the_emails_fate(sent: bool, says: str) -> None:
    publisher = Publisher(URL, blocked_timeout=5)
    publisher._on_blocked("low on disk")
    error = publisher._blocked_error(sent=sent)
    assert isinstance(error, PublishError)
    assert (error.reason, error.sent) == ("low on disk", sent)
    text = str(error)
    assert "(low on disk)" in text and "within 5s" in text and says in text
    assert "s3cret-pw" not in text


def test_watch_blocked_reports_as_soon_as_the_frames_arrive() -> None:
    class Impl:
        """What BlockingConnection drives underneath: it calls these while any call does I/O."""

        def add_on_connection_blocked_callback(self, callback: Any) -> None:
            self.blocked = callback

        def add_on_connection_unblocked_callback(self, callback: Any) -> None:
            self.unblocked = callback

    class Connection:
        _impl = Impl()

    events: list[str | None] = []
    connection = Connection()
    watch_blocked(connection, events.append, lambda: events.append(None))
    connection._impl.blocked(connection._impl, pika.frame.Method(0, pika.spec.Connection.Blocked("low on disk")))
    connection._impl.blocked(connection._impl, pika.frame.Method(0, pika.spec.Connection.Blocked("")))
    connection._impl.unblocked(connection._impl, pika.frame.Method(0, pika.spec.Connection.Unblocked()))
    assert events == ["low on disk", "unknown", None]


def test_blocked_error_is_a_publish_error() -> None:
    assert issubclass(BrokerBlockedError, PublishError)


def test_worker_gauge_and_log_follow_the_blocked_connection(caplog: pytest.LogCaptureFixture) -> None:
    from email_worker.worker import Worker, WorkerConfig

    worker = Worker(WorkerConfig(amqp_url=URL, metrics_port=None))

    def gauge() -> float | None:
        return worker.metrics.registry.get_sample_value("emailworker_broker_blocked")

    assert gauge() == 0
    with caplog.at_level(logging.INFO, logger="email_worker.worker"):
        worker._broker_blocked("low on disk")
        worker._broker_blocked("low on disk")
        assert gauge() == 1
        worker._broker_unblocked()
        assert gauge() == 0
        worker._broker_blocked("low on memory")
        worker._broker_unblocked(connection_ended=True)  # pika dropped it: nothing known, nothing claimed
    assert gauge() == 0
    assert [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records] == [
        ("WARNING", "broker blocks publishing (resource alarm)"), ("INFO", "broker accepts publishes again"),
        ("WARNING", "broker blocks publishing (resource alarm)")]
    assert "s3cret-pw" not in " ".join(str(r.__dict__) for r in caplog.records)
