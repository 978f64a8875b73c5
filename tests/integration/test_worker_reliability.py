"""The worker's at-least-once guarantees against live RabbitMQ 3.10 and 4.0 (issue #16).

- the topology is at least once end to end (quorum work queue and retry tiers,
  `at-least-once` dead-lettering, `reject-publish`), and a v0.1 topology is recognised,
  consumed and reported (log, metric) while its classic retry tiers drain and are removed;
- a nack (reject-publish at a length limit) is an error the publisher raises, never a loss;
- graceful drains do not spend the quorum `x-delivery-limit`;
- a MAIL FROM 5xx storm dead-letters nothing, opens the circuit (metric, readiness), fires
  EmailSMTPCircuitOpen on a real Prometheus (shipped rules, time compressed), and the mail
  flows once the relay is fixed;
- a redelivered email carries the same Message-ID.

The worker runs in-process (a thread; `Worker.stop()` is what SIGTERM calls) except where
a real SIGKILL is the point. The SMTP server is an in-process aiosmtpd whose MAIL FROM,
DATA and delay answers each test sets; each test has its own vhost.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from email_worker.publisher import Publisher, QueueFullError
from email_worker.routing import RetryPolicy, RetryTier
from email_worker.smtp import SmtpConfig
from email_worker.topology import Topology, declare
from email_worker.worker import Worker, WorkerConfig
from emailqueue_testbed.prometheus import PrometheusServer
from tests.integration.support import message_id_of, smtp_relay
from tests.integration.test_worker_delivery import drain_queue

pytestmark = pytest.mark.integration

DOMAIN = "reliability.test.example"


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(params=["3.10", "4.0"])
def broker(request: pytest.FixtureRequest) -> Any:
    """RabbitMQ 3.10 and 4.0 (the collector-less 3.10 adds nothing to these tests)."""
    return request.getfixturevalue({"3.10": "rabbitmq", "4.0": "rabbitmq4"}[request.param])


def _vhost(broker: Any) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    mgmt = broker.management()
    mgmt.create_vhost(name, broker.mgmt_auth[0])
    yield name
    try:
        mgmt.delete_vhost(name)
    except OSError:
        pass


@pytest.fixture
def vhost_on(broker: Any) -> Iterator[tuple[Any, str, str]]:
    """(broker, vhost name, AMQP URL) on each broker of the pair."""
    for name in _vhost(broker):
        yield broker, name, broker.amqp_url(name)


@pytest.fixture
def vhost310(rabbitmq: Any) -> Iterator[str]:
    for name in _vhost(rabbitmq):
        yield rabbitmq.amqp_url(name)


@dataclass
class Relay:
    """aiosmtpd handler: records accepted mail; MAIL FROM / DATA answers and a delay are settable."""

    mail_from_reply: str | None = None            # e.g. "550 5.7.1 relay denied"; None = accept
    data_reply: str | None = None                  # None = "250 OK"
    delay: float = 0.0
    accepted: list[str] = field(default_factory=list)       # Message-IDs, in order
    seen_at_data: list[str] = field(default_factory=list)   # Message-IDs that reached DATA
    mail_from_refusals: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if self.mail_from_reply is not None:
            with self.lock:
                self.mail_from_refusals += 1
            return self.mail_from_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message_id = message_id_of(envelope.content)
        with self.lock:
            self.seen_at_data.append(message_id)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.data_reply is not None:
            return self.data_reply
        with self.lock:
            self.accepted.append(message_id)
        return "250 OK"

    def counts(self) -> Counter[str]:
        with self.lock:
            return Counter(self.accepted)


@pytest.fixture
def relay() -> Iterator[tuple[Relay, int]]:
    handler = Relay()
    with smtp_relay(handler) as port:
        yield handler, port


class RunningWorker:
    def __init__(self, config: WorkerConfig) -> None:
        self.worker = Worker(config)
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, name="worker-under-test", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.exit_code = self.worker.run()

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.worker.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    def readyz(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.worker.metrics_port}/readyz", timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def stop(self, timeout: float = 30) -> int | None:
        self.worker.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        return self.exit_code


@pytest.fixture
def start_worker() -> Iterator[Callable[..., RunningWorker]]:
    running: list[RunningWorker] = []

    def start(amqp_url: str, smtp_port: int, **overrides: Any) -> RunningWorker:
        settings: dict[str, Any] = dict(
            amqp_url=amqp_url, topology=topology(),
            smtp=SmtpConfig(host="127.0.0.1", port=smtp_port, timeout=5, message_id_domain=DOMAIN),
            concurrency=2, metrics_host="127.0.0.1", metrics_port=0, grace_seconds=5, heartbeat_seconds=10)
        settings.update(overrides)
        worker = RunningWorker(WorkerConfig(**settings))
        running.append(worker)
        return worker

    yield start
    for worker in running:
        if worker.thread.is_alive():
            worker.stop()


def topology(delivery_limit: int = 10) -> Topology:
    return Topology(retry=RetryPolicy(tiers=(RetryTier(1), RetryTier(2)), max_retries=8),
                    delivery_limit=delivery_limit)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def job(n: int) -> dict[str, Any]:
    return {"id": f"job-{n:04d}", "to": f"user{n}@example.com", "from": "app@example.com",
            "subject": f"Message {n}", "text": f"Hello {n}"}


def depth(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def queue_counts(broker: Any, vhost: str, name: str) -> dict[str, Any]:
    return broker.management().queue(vhost, name)


# -- at-least-once topology and the v0.1 migration path ------------------------------------------

def test_topology_is_at_least_once_on_quorum_queues(vhost_on: tuple[Any, str, str]) -> None:
    broker, vhost, url = vhost_on
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        declared = declare(connection.channel(), topology())
        assert not declared.legacy_work_queue and declared.legacy_retry_queues == {}
        assert declare(connection.channel(), topology()) == declared  # idempotent
        for name in ("emails", "emails.retry.v2.1s", "emails.retry.v2.2s"):
            arguments = broker.management().queue(vhost, name)["arguments"]
            assert arguments["x-queue-type"] == "quorum", name
            assert arguments["x-dead-letter-strategy"] == "at-least-once", name
            assert arguments["x-overflow"] == "reject-publish", name
        # The TTL → DLX hop of a quorum retry tier brings a retry back to work.
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", "emails.retry.v2.1s", b'{"to":"a@b.example"}',
                              pika.BasicProperties(delivery_mode=2), mandatory=True)
        wait_until(lambda: depth(url, "emails") == 1, 20, "the expired retry back in the work queue")
        assert depth(url, "emails.retry.v2.1s") == 0
    finally:
        connection.close()


def _declare_v01(url: str, waiting_in_old_tier: int) -> None:
    """What v0.1's `email-worker declare` left behind (classic retry tiers, at-most-once DLX)."""
    old = topology()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.exchange_declare("emails.dlx", exchange_type="direct", durable=True)
        channel.queue_declare("emails.dead", durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_declare("emails", durable=True, arguments=old.legacy_work_queue_arguments())
        for tier in old.retry.tiers:  # spelled out: what v0.1 declared
            channel.queue_declare(old.legacy_retry_queue(tier), durable=True, arguments={
                "x-message-ttl": tier.ttl_ms, "x-dead-letter-exchange": "emails.dlx",
                "x-dead-letter-routing-key": "emails"})
        channel.queue_bind("emails.dead", "emails.dlx", routing_key="emails.dead")
        channel.queue_bind("emails", "emails.dlx", routing_key="emails")
        channel.confirm_delivery()
        with Publisher(url) as publisher:  # a job already in the v0.1 work queue
            publisher.publish(job(0))
        for n in range(1, waiting_in_old_tier + 1):  # and retries parked in the old 2 s tier
            body = json.dumps(job(n)).encode()
            channel.basic_publish("", "emails.retry.2s", body, pika.BasicProperties(
                delivery_mode=2, content_type="application/json", message_id=f"job-{n:04d}"), mandatory=True)
    finally:
        connection.close()


def test_a_v01_topology_is_reported_consumed_and_its_retry_tiers_retired(
        vhost_on: tuple[Any, str, str], relay: tuple[Relay, int], start_worker: Callable[..., RunningWorker],
        caplog: pytest.LogCaptureFixture) -> None:
    broker, vhost, url = vhost_on
    smtp, port = relay
    _declare_v01(url, waiting_in_old_tier=2)

    caplog.set_level(logging.INFO, logger="email_worker")
    worker = start_worker(url, port)
    # Mail keeps flowing: the old work queue is consumed, the old tier drains into it by its TTL.
    wait_until(lambda: len(smtp.counts()) == 3, 30, "the v0.1 queue's and the old tier's jobs delivered")
    assert worker.metric("emailworker_legacy_topology") == 1
    assert worker.readyz() == 200
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "v0.1 arguments" in r.getMessage()]
    assert errors, "the outdated work queue must be reported in the log"
    # The new tiers exist beside the old ones; the old 1 s tier was empty and is gone already.
    assert broker.management().queue(vhost, "emails.retry.v2.2s")["arguments"]["x-queue-type"] == "quorum"
    with pytest.raises(urllib.error.HTTPError, match="404"):
        broker.management().queue(vhost, "emails.retry.1s")
    worker.stop()

    # The next start (a restart, or `email-worker declare`) deletes the drained 2 s tier.
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        declared = declare(connection.channel(), topology())
    finally:
        connection.close()
    assert declared.legacy_work_queue and declared.deleted_legacy_queues == ("emails.retry.2s",)
    assert declared.legacy_retry_queues == {}
    assert depth(url, "emails.dead") == 0 and sorted(smtp.counts()) == [
        f"<job-{n:04d}@{DOMAIN}>" for n in range(3)]


def test_a_quorum_queue_under_a_v01_tier_name_is_left_alone(vhost_on: tuple[Any, str, str]) -> None:
    broker, vhost, url = vhost_on
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare("emails.retry.1s", durable=True, arguments={"x-queue-type": "quorum"})
        declared = declare(connection.channel(), topology())
        assert connection.is_open and declared.deleted_legacy_queues == ()
        assert declared.legacy_retry_queues == {}
    finally:
        connection.close()
    assert broker.management().queue(vhost, "emails.retry.1s")["arguments"] == {"x-queue-type": "quorum"}


def test_the_documented_v01_migration_moves_every_job_to_the_at_least_once_queue(
        vhost_on: tuple[Any, str, str], relay: tuple[Relay, int], start_worker: Callable[..., RunningWorker],
        tmp_path: Path) -> None:
    """docs/message-contract.md#migrating-from-v01, step by step, on a live broker."""
    broker, vhost, url = vhost_on
    smtp, port = relay
    _declare_v01(url, waiting_in_old_tier=0)
    with Publisher(url) as publisher:
        publisher.publish_many(job(n) for n in range(1, 6))  # six jobs wait in the v0.1 queue
    policies = f"/api/policies/{urllib.parse.quote(vhost, safe='')}/emails-freeze"
    # 1. Freeze publishing: the broker nacks new jobs, publishers raise (and keep them).
    broker.management().request("PUT", policies, {"pattern": "^emails$", "apply-to": "queues", "priority": 99,
                                                  "definition": {"max-length": 0, "overflow": "reject-publish"}})
    accepted: list[str] = []  # published before the policy reached the queue: moved like the rest
    with Publisher(url, nack_backoff=0.05) as publisher:
        wait_until(lambda: _refused(publisher, accepted), 15, "publishing to be frozen")
    expected = [f"<job-{n:04d}@{DOMAIN}>" for n in range(6)] + [f"<{job_id}@{DOMAIN}>" for job_id in accepted]
    # 2. (workers scaled to 0: none runs here.) 3. Move the jobs to a holding queue.
    moved = cli("move", "--amqp-url", url, "--create-target", "emails", "emails.migrating")
    assert moved.returncode == 0 and f"moved {len(expected)} from emails" in moved.stdout, moved.stderr
    # 4. Delete the v0.1 queue, declare the new topology.
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_delete("emails")
    finally:
        connection.close()
    declared = cli("declare", "--amqp-url", url, "--retry-tiers", "1s,2s", "--max-retries", "8")
    assert declared.returncode == 0, declared.stdout + declared.stderr
    # 5. Unfreeze, move the jobs back, start the workers.
    broker.management().request("DELETE", policies)
    wait_until(lambda: cli("move", "--amqp-url", url, "emails.migrating", "emails").returncode == 0
               and depth(url, "emails.migrating") == 0, 15, "the jobs moved back")
    worker = start_worker(url, port)
    wait_until(lambda: len(smtp.counts()) == len(expected), 20, "every job delivered")
    assert worker.metric("emailworker_legacy_topology") == 0
    assert broker.management().queue(vhost, "emails")["arguments"]["x-dead-letter-strategy"] == "at-least-once"
    worker.stop()
    assert sorted(smtp.counts()) == sorted(expected)


def _refused(publisher: Publisher, accepted: list[str]) -> bool:
    try:
        accepted.append(publisher.publish(job(100 + len(accepted))))
    except QueueFullError:
        return True
    return False


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "SMTP_"))}
    return subprocess.run([sys.executable, "-m", "email_worker.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_reject_publish_nacks_are_raised_by_the_publisher_never_lost(vhost_on: tuple[Any, str, str]) -> None:
    broker, vhost, url = vhost_on
    broker.management().request("PUT", f"/api/policies/{urllib.parse.quote(vhost, safe='')}/cap", {
        "pattern": "^emails$", "apply-to": "queues", "definition": {"max-length": 2}})
    confirmed = []
    with Publisher(url, declare_topology=topology(), nack_backoff=0.05, nack_retries=2) as publisher:
        # The policy reaches the queue a moment after the PUT, and a quorum queue notices it is
        # over its limit one message late: publish until the broker refuses.
        deadline = time.monotonic() + 15
        with pytest.raises(QueueFullError, match="NOT enqueued"):
            for n in range(1000):
                assert time.monotonic() < deadline, "the broker never refused a publish"
                started = time.monotonic()
                confirmed.append(publisher.publish(job(n)))
                time.sleep(0.05)
        assert time.monotonic() - started >= 0.1  # retried (0.05 + 0.1 s) before giving up
    assert len(confirmed) >= 2
    # Every confirmed job is in the queue, the refused one is not: nothing silently dropped.
    stored = [json.loads(body)["id"] for _, body in drain_queue(url, "emails")]
    assert stored == confirmed


# -- drains do not consume the poison budget ---------------------------------------------------

def test_repeated_drains_do_not_spend_the_delivery_limit(
        vhost_on: tuple[Any, str, str], relay: tuple[Relay, int],
        start_worker: Callable[..., RunningWorker]) -> None:
    _broker, _vhost, url = vhost_on
    smtp, port = relay
    smtp.delay = 0.5
    limit = 1  # a job returned (and counted) twice would be dead-lettered as poison
    with Publisher(url, declare_topology=topology(delivery_limit=limit)) as publisher:
        publisher.publish_many(job(n) for n in range(24))
    handed_back = 0.0
    for _ in range(3):  # three scale-ins, each while six prefetched jobs wait behind two sends
        before = len(smtp.seen_at_data)
        worker = start_worker(url, port, topology=topology(delivery_limit=limit), prefetch=8, grace_seconds=1.0)
        wait_until(lambda before=before: len(smtp.seen_at_data) >= before + 2, 20, "two sends under way")
        assert worker.stop() == 0
        handed_back += worker.metric("emailworker_emails_drain_requeued_total")
        assert worker.metric("emailworker_emails_requeued_total") == 0, "a drain nacked (counted) a delivery"
    # The sends under way finish; a third would end after the deadline, so the rest is handed
    # back. Requeued instead, the same six would come back first and be returned again: dead.
    assert handed_back >= 12, "the drains should have handed prefetched jobs back"
    assert depth(url, "emails.dead") == 0, "a drained job was dead-lettered as poison"
    smtp.delay = 0
    worker = start_worker(url, port, topology=topology(delivery_limit=limit))
    wait_until(lambda: len(smtp.counts()) == 24, 30, "every job delivered")
    worker.stop()
    assert depth(url, "emails.dead") == 0, "a drained job was dead-lettered as poison"
    assert depth(url, "emails") == 0
    assert sum(smtp.counts().values()) == 24  # drains that finish or hand back make no duplicates


# -- circuit breaker for sender-side SMTP failures ---------------------------------------------------

def test_a_mail_from_5xx_storm_dead_letters_nothing_opens_the_circuit_and_raises_the_alert(
        vhost310: str, relay: tuple[Relay, int], start_worker: Callable[..., RunningWorker],
        tmp_path: Path) -> None:
    url = vhost310
    smtp, port = relay
    smtp.mail_from_reply = "550 5.7.1 sender not authorised to relay"
    with Publisher(url, declare_topology=topology(delivery_limit=2)) as publisher:
        publisher.publish_many(job(n) for n in range(30))
    # The shipped rules on the test bed's Prometheus, time compressed 60x (for: 2m -> 2s).
    prometheus = PrometheusServer(tmp_path / "prometheus", operator_target="127.0.0.1:9", operator_namespace="ops",
                                  worker_job="email-worker", time_factor=1 / 60, scrape_seconds=0.5)
    prometheus.start()
    try:
        worker = start_worker(url, port, topology=topology(delivery_limit=2), concurrency=4,
                              circuit_initial_seconds=0.5, circuit_max_seconds=1.0)
        wait_until(lambda: worker.metric("emailworker_smtp_circuit_open") == 1, 15, "the circuit to open")
        wait_until(lambda: worker.readyz() == 503, 5, "readiness to flip")
        prometheus.set_worker_targets({"email-worker-0": worker.worker.metrics_port or 0}, "mail")
        wait_until(lambda: worker.metric("emailworker_smtp_circuit_trips_total") >= 3, 15, "failed probes")
        wait_until(lambda: _firing(prometheus, "EmailSMTPCircuitOpen"), 20, "EmailSMTPCircuitOpen to fire")
        [alert] = [a for a in prometheus.alerts() if a["labels"]["alertname"] == "EmailSMTPCircuitOpen"]
        assert (alert["labels"]["namespace"], alert["labels"]["job"]) == ("mail", "email-worker")
    finally:
        prometheus.stop()
    # A storm over several probes: the relay refused MAIL FROM again and again ...
    assert smtp.mail_from_refusals >= 3 and smtp.accepted == []
    # ... yet nothing was dead-lettered, retried or spent: every job is still waiting for work.
    assert worker.metric("emailworker_emails_dead_lettered_total", {"reason": "rejected"}) == 0
    assert depth(url, "emails.dead") == 0
    assert depth(url, "emails.retry.v2.1s") == depth(url, "emails.retry.v2.2s") == 0
    assert worker.metric("emailworker_emails_failed_total", {"class": "sender"}) >= 3
    assert worker.metric("emailworker_emails_failed_total", {"class": "permanent"}) == 0

    smtp.mail_from_reply = None  # the relay is fixed: the next probe closes the circuit
    wait_until(lambda: len(smtp.counts()) == 30, 30, "every job delivered after the fix")
    wait_until(lambda: worker.metric("emailworker_smtp_circuit_open") == 0, 5, "the circuit to close")
    wait_until(lambda: worker.readyz() == 200, 5, "readiness back")
    worker.stop()
    # Far more probes than the delivery limit of 2, and still nothing dead-lettered by the broker.
    assert depth(url, "emails.dead") == 0 and sum(smtp.counts().values()) == 30


def _firing(prometheus: PrometheusServer, name: str) -> bool:
    return any(a["labels"]["alertname"] == name and a["state"] == "firing" for a in prometheus.alerts())


def test_a_per_recipient_5xx_stays_permanent_and_keeps_the_circuit_closed(
        vhost310: str, relay: tuple[Relay, int], start_worker: Callable[..., RunningWorker]) -> None:
    url = vhost310
    smtp, port = relay
    smtp.data_reply = "554 5.7.1 message content rejected"
    with Publisher(url, declare_topology=topology()) as publisher:
        publisher.publish_many(job(n) for n in range(3))
    worker = start_worker(url, port)
    wait_until(lambda: depth(url, "emails.dead") == 3, 15, "the rejected emails dead-lettered")
    assert worker.metric("emailworker_smtp_circuit_open") == 0 and worker.readyz() == 200
    assert worker.metric("emailworker_smtp_circuit_trips_total") == 0
    worker.stop()


# -- every resend carries the same Message-ID ------------------------------------------------------

def test_a_redelivered_email_carries_the_same_message_id(vhost310: str, relay: tuple[Relay, int],
                                                         tmp_path: Path) -> None:
    """The server has the whole email but the worker dies before the 250: the broker
    redelivers, the next worker sends it again, and both copies carry one Message-ID."""
    url = vhost310
    smtp, port = relay
    smtp.delay = 30  # the first attempt reaches DATA and hangs there
    with Publisher(url, declare_topology=topology()) as publisher:
        publisher.publish(job(7))

    def worker_process() -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "SMTP_"))}
        return subprocess.Popen(
            [sys.executable, "-m", "email_worker.cli", "run", "--amqp-url", url, "--smtp-host", "127.0.0.1",
             "--smtp-port", str(port), "--retry-tiers", "1s,2s", "--metrics-port", "-1",
             "--message-id-domain", DOMAIN], env=env, stdout=(tmp_path / "worker.log").open("ab"),
            stderr=subprocess.STDOUT)

    first = worker_process()
    try:
        wait_until(lambda: len(smtp.seen_at_data) == 1, 30, "the first attempt to reach DATA")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    smtp.delay = 0
    second = worker_process()
    try:
        wait_until(lambda: len(smtp.accepted) == 1, 30, "the redelivered email accepted")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
    assert smtp.seen_at_data == [f"<job-0007@{DOMAIN}>"] * 2
    assert smtp.accepted == [f"<job-0007@{DOMAIN}>"]
