"""The Prometheus-plugin probe against real RabbitMQ nodes — every broker of the matrix
(3.10.8, 3.10.8 without the management collector, 4.0.x): gauges, an ack rate that matches
the pace a consumer really acks at, one scrape shared by many polls, TLS, failures."""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import pika
import pytest

from emailqueue_operator.rabbitmq import BrokerError, QueueNotFound, TlsOptions
from emailqueue_operator.rabbitmq_prometheus import PrometheusEndpoint, PrometheusProbe

from .support import https_server

pytestmark = pytest.mark.integration

PUBLISHED, ACKED, PACE = 50, 20, 2.0  # messages, messages, acks per second
WINDOW = 6.0  # seconds; the operator's is max(2 x poll, 10 s), shorter here to keep the test short


def _endpoint(broker) -> PrometheusEndpoint:
    # The plugin's listener needs no credentials; sending them (a password with /:@%) must not hurt.
    user, password = broker.mgmt_auth
    return PrometheusEndpoint(broker.prom_url, user, password)


def _wait_for(probe: PrometheusProbe, vhost: str, queue: str, until, timeout: float = 20.0):
    """Poll like the operator does until `until(stats)` holds (the broker refreshes its
    metrics on its stats tick, so a fresh queue or count shows up within a tick or two)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stats = probe.queue_stats(vhost, queue, window_seconds=WINDOW)
            if until(stats):
                return stats
        except QueueNotFound:
            stats = None
        if time.monotonic() > deadline:
            raise AssertionError(f"queue {queue!r} never reached the expected state; last {stats}")
        time.sleep(0.5)


def test_gauges_and_ack_rate_match_a_paced_consumer(broker_vhost):
    broker, name, url = broker_vhost
    probe = PrometheusProbe(_endpoint(broker), cache_seconds=0.5)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    publisher = conn.channel()
    publisher.queue_declare("emails", durable=True)
    _wait_for(probe, name, "emails", lambda s: True)  # the queue is in the scrape: counters have a baseline
    for _ in range(PUBLISHED):
        publisher.basic_publish("", "emails", b"x", pika.BasicProperties(delivery_mode=2))

    consumer = conn.channel()
    consumer.basic_qos(prefetch_count=1)  # deliveries follow acks: deliver rate = ack rate
    delivered: list[int] = []
    consumer.basic_consume("emails", lambda _ch, method, _p, _b: delivered.append(method.delivery_tag))
    readings: list[tuple[float, float | None, float | None]] = []
    acked, start = 0, None
    next_poll = time.monotonic()
    while acked < ACKED:
        conn.process_data_events(time_limit=0.02)
        now = time.monotonic()
        if delivered and (start is None or now >= start + acked / PACE):
            start = now if start is None else start
            consumer.basic_ack(delivered.pop(0))
            acked += 1
        if start is not None and now >= next_poll:
            next_poll = now + 0.5
            stats = probe.queue_stats(name, "emails", window_seconds=WINDOW)
            readings.append((now - start, stats.ack_rate, stats.deliver_rate))
    true_pace = (ACKED - 1) / (time.monotonic() - start)

    # After one window of steady acking, the rate is the pace the consumer acks at.
    steady = [(t, ack, deliver) for t, ack, deliver in readings if t >= WINDOW + 1.0]
    assert steady, readings
    assert all(ack is not None and deliver is not None for _, ack, deliver in steady), steady
    assert statistics.median(ack for _, ack, _ in steady) == pytest.approx(true_pace, rel=0.3), steady
    assert steady[-1][1] == pytest.approx(true_pace, rel=0.3), steady
    assert statistics.median(deliver for _, _, deliver in steady) == pytest.approx(true_pace, rel=0.3), steady

    # 50 published, 20 acked, one more delivered and held by the attached consumer (prefetch 1).
    stats = _wait_for(probe, name, "emails", lambda s: (s.ready, s.unacked, s.consumers) == (29, 1, 1))
    assert stats.source == "prometheus" and stats.queues == ("emails",) and stats.oldest_age_seconds is None
    # The publish burst came before the window: no publishing now.
    assert stats.publish_rate is not None and stats.publish_rate < 0.5
    conn.close()
    probe.close()


def test_regex_missing_queue_and_one_scrape_for_many_polls(broker_vhost):
    broker, name, url = broker_vhost
    with pika.BlockingConnection(pika.URLParameters(url)) as conn:
        ch = conn.channel()
        for queue, n in (("emails-a", 3), ("emails-b", 2), ("other", 7)):
            ch.queue_declare(queue, durable=True)
            for _ in range(n):
                ch.basic_publish("", queue, b"x")
    probe = PrometheusProbe(_endpoint(broker), cache_seconds=60)
    deadline = time.monotonic() + 20
    while True:  # the gauges follow the broker's stats tick
        probe._scopes.clear()
        try:
            both = probe.queue_stats(name, queue_regex=r"emails-.*")
            if both.ready == 5:
                break
        except QueueNotFound:
            pass
        assert time.monotonic() < deadline, "emails-a/b never showed 5 ready"
        time.sleep(0.5)
    assert both.queues == ("emails-a", "emails-b") and both.consumers == 0
    sent = probe.requests
    for _ in range(100):  # a hundred EmailQueues on one vhost: one scrape per cache interval
        assert probe.queue_stats(name, "other").ready == 7
        assert probe.queue_stats(name, queue_regex=r"emails-.*", how="max").ready == 3
    assert probe.requests == sent
    with pytest.raises(QueueNotFound):
        probe.queue_stats(name, "nope")
    with pytest.raises(QueueNotFound):  # a vhost's scrape never shows another vhost's queues
        probe.queue_stats("/", "other")


def test_unreachable_endpoint_is_an_error_and_backs_off():
    from emailqueue_testbed.state import free_port

    probe = PrometheusProbe(PrometheusEndpoint(f"http://127.0.0.1:{free_port()}", "u", "s3cr3t-pw"))
    with pytest.raises(BrokerError, match="unreachable") as exc:
        probe.queue_stats("/", "emails")
    assert "s3cr3t-pw" not in str(exc.value)
    with pytest.raises(BrokerError, match="next attempt in"):
        probe.queue_stats("/", "emails")
    assert probe.requests == 1


CAPTURE = Path(__file__).parents[1] / "unit" / "data" / "prometheus" / "rabbitmq-3.10.8-detailed.txt"


@pytest.fixture
def https_metrics(tmp_path):
    """A loopback HTTPS server that serves a captured scrape under a self-signed
    certificate for rabbit.internal; yields (url, ca_pem)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    body = CAPTURE.read_bytes()
    with https_server(tmp_path, "text/plain; version=0.0.4", lambda path: body) as served:
        yield served


@pytest.mark.parametrize(("tls", "works"), [
    # the CA from the Secret (PEM, not a file) and the name the certificate carries
    (lambda ca: TlsOptions(True, ca, "rabbit.internal"), True),
    # same CA, but the certificate is not for 127.0.0.1
    (lambda ca: TlsOptions(True, ca), False),
    # the system bundle (even REQUESTS_CA_BUNDLE) does not trust a self-signed certificate
    (lambda ca: TlsOptions(True), False),
    # the right CA but another name
    (lambda ca: TlsOptions(True, ca, "other.internal"), False),
    # insecureSkipVerify wins over REQUESTS_CA_BUNDLE in the environment
    (lambda ca: TlsOptions(True, insecure_skip_verify=True), True),
])
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_options(https_metrics, tls, works, monkeypatch):
    import certifi

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    url, ca = https_metrics
    probe = PrometheusProbe(PrometheusEndpoint(url, "operator", "s3cr3t-pw", tls(ca)))
    if works:
        assert probe.queue_stats("t-prom-capture", "emails").ready == 25
    else:
        with pytest.raises(BrokerError, match=r"unreachable \(SSLError\)") as exc:
            probe.queue_stats("t-prom-capture", "emails")
        assert "s3cr3t-pw" not in str(exc.value)
