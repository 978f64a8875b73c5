"""Broker probes against the real RabbitMQ node: depth, rates, regex, sharing, failures."""
from __future__ import annotations

import time
import urllib.parse

import pika
import pytest

from emailqueue_operator.rabbitmq import (
    AmqpEndpoint,
    BrokerAuthError,
    BrokerError,
    BrokerPool,
    ManagementEndpoint,
    MetricsUnavailable,
    QueueNotFound,
    TlsOptions,
)

pytestmark = pytest.mark.integration


def _publish(url: str, queue: str, n: int) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as conn:
        ch = conn.channel()
        ch.queue_declare(queue, durable=True)
        for _ in range(n):
            ch.basic_publish("", queue, b"x", pika.BasicProperties(delivery_mode=2, timestamp=int(time.time())))


def _vhost_of(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path[1:])


def test_amqp_probe_counts_ready_and_consumers_over_one_shared_connection(vhost):
    _publish(vhost, "emails", 25)
    pool = BrokerPool()
    endpoint = AmqpEndpoint.from_uri(vhost)
    stats = pool.amqp(endpoint).queue_depth("emails")
    assert stats.ready == 25 and stats.consumers == 0 and stats.source == "amqp"
    # Many resources naming the same broker share one probe and one connection.
    for _ in range(50):
        assert pool.amqp(AmqpEndpoint.from_uri(vhost)).queue_depth("emails").ready == 25
    assert pool.amqp(endpoint).connects == 1
    assert pool.open_connections() == 1
    pool.close()


def test_missing_queue_is_reported_and_connection_survives(vhost):
    pool = BrokerPool()
    probe = pool.amqp(AmqpEndpoint.from_uri(vhost))
    with pytest.raises(QueueNotFound, match="'nope' not found"):
        probe.queue_depth("nope")
    _publish(vhost, "emails", 1)
    assert probe.queue_depth("emails").ready == 1
    assert probe.connects == 1
    pool.close()


def test_wrong_password_fails_without_leaking_it(vhost):
    endpoint = AmqpEndpoint.from_uri(vhost)
    bad = AmqpEndpoint(endpoint.host, endpoint.port, endpoint.vhost, endpoint.username, "Wr0ng-p@ss")
    with pytest.raises(BrokerAuthError) as exc:
        BrokerPool().amqp(bad).queue_depth("emails")
    assert "Wr0ng-p@ss" not in str(exc.value)


def test_unreachable_broker_backs_off_instead_of_reconnecting_every_poll(rabbitmq):
    from emailqueue_testbed.state import free_port

    probe = BrokerPool().amqp(AmqpEndpoint("127.0.0.1", free_port(), "/", "u", "p"))
    with pytest.raises(BrokerError, match="unreachable"):
        probe.queue_depth("emails")
    with pytest.raises(BrokerError, match="next attempt in"):
        probe.queue_depth("emails")
    assert probe.connects == 0


def test_management_probe_reads_unacked_rates_and_regex(rabbitmq, vhost):
    name = _vhost_of(vhost)
    _publish(vhost, "emails-a", 30)
    _publish(vhost, "emails-b", 10)
    _publish(vhost, "other", 5)
    # Take 4 messages without acking them: they count as unacked.
    conn = pika.BlockingConnection(pika.URLParameters(vhost))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=4)
    ch.basic_consume("emails-a", lambda *a: None, auto_ack=False)
    user, password = rabbitmq.mgmt_auth
    pool = BrokerPool()
    probe = pool.management(ManagementEndpoint(rabbitmq.mgmt_url, user, password))
    deadline = time.monotonic() + 20
    one = None
    while True:
        conn.process_data_events(0.2)
        probe._cache.clear()
        try:  # a new queue has no counts until the next stats tick: blind, never 0
            one = probe.queue_stats(name, queue="emails-a")
        except MetricsUnavailable:
            one = None
        # the counts and the consumer arrive on separate ticks: wait for both
        if (one is not None and one.unacked == 4 and one.consumers == 1) or time.monotonic() > deadline:
            break
    assert one is not None and (one.ready, one.unacked, one.consumers) == (26, 4, 1)
    assert one.publish_rate is not None and one.ack_rate is not None
    both = probe.queue_stats(name, queue_regex=r"emails-.*", how="sum")
    assert both.queues == ("emails-a", "emails-b") and both.ready == 36
    assert probe.queue_stats(name, queue_regex=r"emails-.*", how="max").ready == 26
    with pytest.raises(QueueNotFound):
        probe.queue_stats(name, queue_regex=r"nomatch-.*")
    conn.close()
    pool.close()


def test_management_listing_is_shared_by_many_resources(rabbitmq, vhost):
    name = _vhost_of(vhost)
    _publish(vhost, "emails", 3)
    user, password = rabbitmq.mgmt_auth
    pool = BrokerPool()
    probe = pool.management(ManagementEndpoint(rabbitmq.mgmt_url, user, password))
    deadline = time.monotonic() + 20
    while True:  # until the new queue's first stats tick
        try:
            probe.queue_stats(name, queue="emails")
            break
        except MetricsUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    probe._cache.clear()
    before = probe.requests
    for _ in range(100):
        pool.management(ManagementEndpoint(rabbitmq.mgmt_url, user, password)).queue_stats(name, queue="emails")
    assert probe.requests - before <= 2  # one listing per cache interval, not one per resource


@pytest.fixture
def https_management(tmp_path):
    """A loopback HTTPS management API answering /api/overview and /api/queues/VHOST."""
    import json

    from .support import https_server

    queues = [{"name": "emails", "state": "running", "messages_ready": 7, "messages_unacknowledged": 1, "consumers": 2}]
    with https_server(tmp_path, "application/json", lambda path: json.dumps(
            {"disable_stats": False} if path.startswith("/api/overview") else queues).encode()) as served:
        yield served


@pytest.mark.parametrize(("tls", "works"), [
    (lambda ca: TlsOptions(True, ca, "rabbit.internal"), True),   # the CA and the certificate's name
    (lambda ca: TlsOptions(True), False),                          # the system bundle does not trust it
    (lambda ca: TlsOptions(True, insecure_skip_verify=True), True),  # wins over REQUESTS_CA_BUNDLE
])
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_management_tls_options(https_management, tls, works, monkeypatch):
    import certifi

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    url, ca = https_management
    probe = ManagementEndpoint(url, "operator", "s3cr3t-pw", tls(ca))
    pool = BrokerPool()
    if works:
        assert pool.management(probe).queue_stats("/", queue="emails").ready == 7
    else:
        with pytest.raises(BrokerError, match=r"unreachable \(SSLError\)") as exc:
            pool.management(probe).queue_stats("/", queue="emails")
        assert "s3cr3t-pw" not in str(exc.value)
    pool.close()
