"""How the worker settles a delivery, against a fake channel: sender-side failures open the
circuit and hand the job back uncounted; unsent deliveries are handed back as fresh copies;
a refused copy falls back to a counted nack, never a loss."""
from __future__ import annotations

import smtplib
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import pytest

from email_worker.message import parse_message
from email_worker.routing import SmtpSessionError
from email_worker.worker import Worker, WorkerConfig, _Delivery, _Failed, _NotStarted, _Sent


@dataclass
class FakeChannel:
    refuse_publish: bool = False
    published: list[tuple[str, bytes, Any]] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    nacked: list[int] = field(default_factory=list)

    def basic_publish(self, exchange: str, routing_key: str, body: bytes, properties: Any,
                      mandatory: bool = False) -> None:
        if self.refuse_publish:
            raise pika.exceptions.NackError([])
        self.published.append((routing_key, body, properties))

    def basic_ack(self, tag: int) -> None:
        self.acked.append(tag)

    def basic_nack(self, tag: int, requeue: bool = True) -> None:
        assert requeue
        self.nacked.append(tag)


BODY = b'{"id": "job-1", "to": "u@example.com", "from": "app@example.com", "subject": "s", "text": "t"}'


@pytest.fixture
def worker() -> tuple[Worker, FakeChannel]:
    worker = Worker(WorkerConfig(amqp_url="amqp://localhost", metrics_port=None, circuit_initial_seconds=5))
    channel = FakeChannel()
    worker._channel = channel
    worker.health.ready = True
    return worker, channel


def deliver(worker: Worker, tag: int = 7, headers: dict[str, Any] | None = None) -> _Delivery:
    properties = pika.BasicProperties(message_id="job-1", content_type="application/json", delivery_mode=2,
                                      headers=headers or {"x-delivery-count": 3, "x-attempts": 2})
    delivery = _Delivery(None, worker._generation, tag, properties, BODY, parse_message(BODY, properties))
    worker._in_flight[tag] = delivery
    return delivery


def metric(worker: Worker, name: str, labels: dict[str, str] | None = None) -> float:
    return worker.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@pytest.mark.parametrize("error", [
    smtplib.SMTPSenderRefused(550, b"5.7.1 relay denied", "app@example.com"),
    SmtpSessionError("AUTH", smtplib.SMTPAuthenticationError(535, b"5.7.8 bad credentials")),
    SmtpSessionError("connect", ConnectionRefusedError(111, "refused")),
])
def test_a_sender_side_failure_opens_the_circuit_and_hands_the_job_back_uncounted(
        worker: tuple[Worker, FakeChannel], error: BaseException) -> None:
    worker_, channel = worker
    worker_._settle(deliver(worker_), _Failed(error))
    [(queue, body, properties)] = channel.published
    assert queue == "emails" and body == BODY  # back to work, not to a retry tier or the dead queue
    assert properties.headers["x-attempts"] == 2  # no attempt spent
    assert properties.headers["x-sender-failures"] == 1
    assert "x-delivery-count" not in properties.headers  # the copy starts afresh
    assert properties.message_id == "job-1" and properties.delivery_mode == 2
    assert channel.acked == [7] and channel.nacked == []
    assert worker_.circuit.state(worker_.circuit.opened_at or 0) == "open"
    assert metric(worker_, "emailworker_smtp_circuit_open") == 1 and not worker_.health.ready
    assert worker_.health.reason == "smtp circuit open"
    assert metric(worker_, "emailworker_emails_failed_total", {"class": "sender"}) == 1
    assert metric(worker_, "emailworker_emails_dead_lettered_total", {"reason": "rejected"}) == 0
    assert metric(worker_, "emailworker_emails_requeued_total") == 0  # nothing the broker counts


def test_a_sent_email_closes_the_circuit(worker: tuple[Worker, FakeChannel]) -> None:
    worker_, channel = worker
    worker_._settle(deliver(worker_, 1), _Failed(smtplib.SMTPSenderRefused(550, b"no", "a@b.c")))
    worker_._settle(deliver(worker_, 2), _Sent(0.01, {}))
    assert worker_.circuit.opened_at is None and channel.acked == [1, 2]


def test_a_per_recipient_5xx_is_dead_lettered_and_proves_the_relay_works(worker: tuple[Worker, FakeChannel]) -> None:
    worker_, channel = worker
    worker_._settle(deliver(worker_, 1), _Failed(smtplib.SMTPSenderRefused(550, b"no", "a@b.c")))
    refused = smtplib.SMTPRecipientsRefused({"u@example.com": (550, b"5.1.1 no such user")})
    worker_._settle(deliver(worker_, 2), _Failed(refused))
    assert [queue for queue, _, _ in channel.published] == ["emails", "emails.dead"]
    assert worker_.circuit.opened_at is None


def test_a_delivery_not_started_is_handed_back_not_requeued(worker: tuple[Worker, FakeChannel]) -> None:
    worker_, channel = worker
    worker_._settle(deliver(worker_), _NotStarted())
    assert [queue for queue, _, _ in channel.published] == ["emails"] and channel.acked == [7]
    assert metric(worker_, "emailworker_emails_drain_requeued_total") == 1
    assert metric(worker_, "emailworker_emails_requeued_total") == 0


def test_a_refused_hand_back_falls_back_to_a_nack_never_a_loss(worker: tuple[Worker, FakeChannel]) -> None:
    worker_, channel = worker
    channel.refuse_publish = True  # reject-publish: the work queue is full
    worker_._settle(deliver(worker_), _NotStarted())
    assert channel.acked == [] and channel.nacked == [7]


def test_settlements_are_withheld_while_the_consumer_is_being_cancelled(worker: tuple[Worker, FakeChannel]) -> None:
    worker_, channel = worker
    worker_._consumer_tag = "ctag"
    worker_._settle(deliver(worker_, 1), _Failed(smtplib.SMTPSenderRefused(550, b"no", "a@b.c")))
    worker_._settle(deliver(worker_, 2), _Sent(0.01, {}))
    # No ack reaches the broker (no new credit, nothing more in flight) until the cancel is done.
    assert channel.acked == [] and worker_._holding == [(1, True), (2, True)]


def test_withheld_settlements_are_sent_when_the_circuit_closes_before_the_cancel(
        worker: tuple[Worker, FakeChannel]) -> None:
    worker_, channel = worker
    worker_._consumer_tag = "ctag"
    worker_._settle(deliver(worker_, 1), _Failed(smtplib.SMTPSenderRefused(550, b"no", "a@b.c")))
    worker_._settle(deliver(worker_, 2), _Sent(0.01, {}))  # closes the circuit at once
    assert worker_.circuit.opened_at is None and worker_._holding
    worker_._flush_held(channel)  # what the consume loop does on its next turn
    assert channel.acked == [1, 2] and worker_._holding is None
