"""RabbitMQ's disk alarm blocks publishers: handled, bounded and surfaced (issue #16).

On the private node (the alarm blocks every publisher of a node: the shared one must not
get it), `rabbitmqctl set_disk_free_limit` far above the free disk raises the disk alarm and
the default limit clears it, always, in a `finally`. RabbitMQ blocks a connection when it
reads a publish during the alarm (it sends `connection.blocked` "low on disk" then, and reads
nothing more from it until the alarm clears).

- The publisher: the publish that meets the alarm times out after `blocked_timeout`
  unconfirmed (its email is on the wire); the publisher now knows the reason, and a publish
  during the alarm sends nothing, waits `blocked_timeout` and raises `BrokerBlockedError`
  (not enqueued, and still absent after the alarm). Publishes begun just before the alarm
  clears complete; afterwards the same Publisher publishes again, and every confirmed email
  is in the queue exactly once, as published.
- The worker: a retry copy it publishes during the alarm waits (the original stays unacked),
  `emailworker_broker_blocked` reads 1 on its /metrics, then 0 once the alarm clears; the
  email is then retried and delivered.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pytest

from email_worker.publisher import BrokerBlockedError, Publisher
from email_worker.routing import RetryPolicy, RetryTier
from email_worker.smtp import SmtpConfig
from email_worker.topology import Topology
from email_worker.worker import Worker, WorkerConfig
from emailqueue_testbed import rabbit
from tests.integration.support import message_id_of, smtp_relay

from ..exposition import sample_values

pytestmark = pytest.mark.integration

TOPOLOGY = Topology(retry=RetryPolicy(tiers=(RetryTier(1),), max_retries=3))
HUGE_LIMIT = "100000GB"     # far above any free disk: the alarm goes up at once
DEFAULT_LIMIT = "50MB"      # the test bed's disk_free_limit.absolute (rabbit.py)
BLOCKED_TIMEOUT = 2.0


def job(job_id: str, to: str = "user@example.com") -> dict[str, Any]:
    return {"id": job_id, "to": to, "from": "app@example.com", "subject": f"alarm {job_id}", "text": "hello"}


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def alarm_vhost(private_rabbitmq: Any) -> Iterator[tuple[Any, str, str]]:
    """(broker, fresh vhost, its AMQP URL) on the private node; the disk alarm is cleared after the test."""
    broker = private_rabbitmq
    vhost = f"alarm-{uuid.uuid4().hex[:8]}"
    broker.management().create_vhost(vhost, broker.mgmt_auth[0])
    try:
        yield broker, vhost, broker.amqp_url(vhost)
    finally:
        clear_alarm(broker)
        broker.management().delete_vhost(vhost)


def alarm_raised(broker: Any) -> bool:
    return "disk" in rabbit.ctl(broker.record.facts, "eval", "rabbit_alarm:get_alarms().")


def raise_alarm(broker: Any) -> None:
    rabbit.ctl(broker.record.facts, "set_disk_free_limit", HUGE_LIMIT)
    wait_for(lambda: alarm_raised(broker), 10, "the disk alarm")


def clear_alarm(broker: Any) -> None:
    rabbit.ctl(broker.record.facts, "set_disk_free_limit", DEFAULT_LIMIT)
    wait_for(lambda: not alarm_raised(broker), 10, "the disk alarm to clear")


def drain(url: str, queue: str) -> list[tuple[str, dict[str, Any]]]:
    """(message_id, body) of every message in `queue`, consumed."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        found = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((str(properties.message_id), json.loads(body)))
    finally:
        connection.close()


def ready_count(url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """(what `call` returned or raised, seconds it took)."""
    started = time.monotonic()
    try:
        outcome = call()
    except Exception as exc:  # the outcome under test
        outcome = exc
    return outcome, time.monotonic() - started


def test_publisher_during_disk_alarm_fails_within_blocked_timeout_and_loses_no_confirmed_email(
        alarm_vhost: tuple[Any, str, str]) -> None:
    broker, _, url = alarm_vhost
    queue = TOPOLOGY.work_queue
    publisher = Publisher(url, declare_topology=TOPOLOGY, blocked_timeout=BLOCKED_TIMEOUT)
    published: dict[str, dict[str, Any]] = {}  # confirmed: id -> job

    def publish(publisher: Publisher, job_id: str) -> None:
        publisher.publish(job(job_id))
        published[job_id] = job(job_id)

    for n in range(5):
        publish(publisher, f"before-{n}")
    late: dict[str, tuple[Any, float]] = {}
    try:
        raise_alarm(broker)
        assert publisher.blocked is None, "nothing tells a publisher of the alarm before it publishes"

        # The publish that meets the alarm: RabbitMQ blocks the connection while reading it.
        error, seconds = timed(lambda: publisher.publish(job("meets-alarm")))
        assert isinstance(error, BrokerBlockedError), error
        assert BLOCKED_TIMEOUT - 0.2 < seconds < BLOCKED_TIMEOUT + 3, seconds
        assert error.sent and error.reason == "low on disk", error
        assert "NOT confirmed" in str(error)
        assert publisher.blocked == "low on disk"

        # Known blocked: nothing is sent, the publish waits blocked_timeout, then says so.
        error, seconds = timed(lambda: publisher.publish(job("refused")))
        assert isinstance(error, BrokerBlockedError), error
        assert BLOCKED_TIMEOUT - 0.2 < seconds < BLOCKED_TIMEOUT + 3, seconds
        assert not error.sent
        assert "low on disk" in str(error) and "NOT enqueued" in str(error), error
        assert broker.record.facts["password"] not in str(error)
        assert publisher.blocked == "low on disk"
        assert ready_count(url, queue) == 5, "only the emails confirmed before the alarm are in the queue"

        # Publishes begun during the alarm by a publisher that knows of it and by a fresh one:
        # both wait, and complete once the alarm clears.
        patient = Publisher(url, blocked_timeout=30)
        publisher.blocked_timeout = 30  # a new connection takes it as pika's blocked_connection_timeout
        threads = [threading.Thread(target=lambda p=p, i=i: late.__setitem__(i, timed(lambda: publish(p, i))))
                   for p, i in ((publisher, "late-known"), (patient, "late-fresh"))]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        assert not late, f"a publish returned during the alarm: {late}"
    finally:
        clear_alarm(broker)
    for thread in threads:
        thread.join(30)
    patient.close()
    assert set(late) == {"late-known", "late-fresh"}
    for job_id, (outcome, seconds) in late.items():
        assert outcome is None, (job_id, outcome)
        assert seconds < 10, (job_id, seconds)
    assert publisher.blocked is None

    # The same Publisher object publishes normally again.
    publisher.blocked_timeout = BLOCKED_TIMEOUT
    for n in range(5):
        publish(publisher, f"after-{n}")
    publisher.close()

    time.sleep(0.5)
    consumed = drain(url, queue)
    ids = Counter(message_id for message_id, _ in consumed)
    assert "refused" not in ids, "an email refused during the alarm was enqueued"
    missing = set(published) - set(ids)
    assert not missing, f"confirmed emails lost: {sorted(missing)}"
    assert all(ids[job_id] == 1 for job_id in published), ids
    # The one unconfirmed email may have been enqueued when the alarm cleared (the broker held it).
    assert set(ids) - set(published) <= {"meets-alarm"}, ids
    for message_id, body in consumed:
        if message_id in published:
            assert {k: body[k] for k in published[message_id]} == published[message_id]


@dataclass
class Relay:
    """aiosmtpd handler: 451 for the first attempt of each email, 250 afterwards."""

    accepted: list[str] = field(default_factory=list)
    deferred: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message_id = message_id_of(envelope.content)
        with self.lock:
            if message_id not in self.deferred:
                self.deferred.add(message_id)
                return "451 4.3.0 try again later"
            self.accepted.append(message_id)
        return "250 OK"


@pytest.fixture
def relay() -> Iterator[tuple[Relay, int]]:
    handler = Relay()
    with smtp_relay(handler) as port:
        yield handler, port


def blocked_gauge(worker: Worker) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5) as resp:
        values = sample_values(resp.read().decode(), "emailworker_broker_blocked")
    return values[0] if values else None


def test_worker_retry_during_disk_alarm_waits_unacked_and_the_gauge_goes_1_then_0(
        alarm_vhost: tuple[Any, str, str], relay: tuple[Relay, int]) -> None:
    broker, vhost, url = alarm_vhost
    smtp, port = relay
    with Publisher(url, declare_topology=TOPOLOGY) as publisher:
        publisher.publish(job("retried"))
    worker = Worker(WorkerConfig(
        amqp_url=url, topology=TOPOLOGY, concurrency=1, metrics_host="127.0.0.1", metrics_port=0,
        grace_seconds=5, heartbeat_seconds=10,
        smtp=SmtpConfig(host="127.0.0.1", port=port, timeout=5, message_id_domain="alarm.test.example")))
    thread = threading.Thread(target=worker.run, name="worker-under-test", daemon=True)
    try:
        raise_alarm(broker)
        thread.start()
        # The 451 makes the worker publish a retry copy: the broker blocks it, the gauge says so.
        wait_for(lambda: worker.metrics_port is not None and blocked_gauge(worker) == 1, 20,
                 "emailworker_broker_blocked 1")
        assert smtp.deferred and not smtp.accepted
        assert worker.counters.retried == 0, "the retry copy cannot be confirmed during the alarm"

        def held_unacked() -> bool:  # the queue's figures lag a few seconds
            listing = rabbit.ctl(broker.record.facts, "list_queues", "-p", vhost, "--no-table-headers", "--quiet",
                                 "name", "messages_ready", "messages_unacknowledged")
            return f"{TOPOLOGY.work_queue}\t0\t1" in listing.splitlines()
        wait_for(held_unacked, 15, "the original held unacked while its retry copy waits")
        assert blocked_gauge(worker) == 1 and worker.counters.retried == 0
    finally:
        clear_alarm(broker)
    try:
        wait_for(lambda: blocked_gauge(worker) == 0, 10, "emailworker_broker_blocked 0")
        wait_for(lambda: bool(smtp.accepted), 20, "the retried email delivered")
        assert worker.counters.retried == 1
    finally:
        worker.stop()
        thread.join(30)
    assert len(smtp.accepted) == 1
    assert ready_count(url, TOPOLOGY.work_queue) == 0
