"""What the operator sees of each broker of the matrix, through each source it can use.

RabbitMQ 3.10.8, 3.10.8 with `management_agent.disable_metrics_collector = true` (what
RabbitMQ recommends with its Prometheus plugin) and 4.0.x: the same queue, read over AMQP,
the management API and the Prometheus plugin. A count the source cannot give is None,
never 0; a broker that gives nothing trustworthy is a failure (blind), never "empty".
"""
from __future__ import annotations

import http.server
import threading
import time

import pika
import pytest

from emailqueue_operator.rabbitmq import AmqpEndpoint, BrokerError, BrokerPool, ManagementEndpoint
from emailqueue_operator.rabbitmq_prometheus import PrometheusEndpoint
from emailqueue_testbed.state import free_port

pytestmark = pytest.mark.integration


def _publish(url: str, queue: str, n: int) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as conn:
        channel = conn.channel()
        channel.queue_declare(queue, durable=True)
        channel.confirm_delivery()
        for _ in range(n):
            channel.basic_publish("", queue, b"x", pika.BasicProperties(delivery_mode=2))


def _eventually(read, check, timeout: float = 20.0):
    """Brokers publish their statistics on a tick: poll until the reading settles."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = read()
            if check(value):
                return value
        except BrokerError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            return value
        time.sleep(1)


def test_each_source_sees_the_queue_on_each_broker(broker_vhost):
    broker, vhost, url = broker_vhost
    _publish(url, "emails", 12)
    pool = BrokerPool()
    user, password = broker.mgmt_auth

    amqp = pool.amqp(AmqpEndpoint.from_uri(url)).queue_depth("emails")
    assert (amqp.ready, amqp.unacked, amqp.publish_rate, amqp.source) == (12, None, None, "amqp")

    mgmt_probe = pool.management(ManagementEndpoint(broker.mgmt_url, user, password))
    mgmt = _eventually(lambda: mgmt_probe.queue_stats(vhost, queue="emails"), lambda s: s.ready == 12)
    assert mgmt.ready == 12 and mgmt.unacked == 0
    if broker.variant == "3.10-nocollector":
        # No collector: queue totals give counts; consumers and rates are unknown, not 0.
        assert mgmt.source == "management-totals"
        assert mgmt.consumers is None and mgmt.publish_rate is None and mgmt.ack_rate is None
    else:
        assert mgmt.source == "management" and mgmt.consumers == 0 and mgmt.publish_rate is not None

    prom_probe = pool.prometheus(PrometheusEndpoint(broker.prom_url))
    prom = _eventually(lambda: prom_probe.queue_stats(vhost, queue="emails", window_seconds=4),
                       lambda s: s.ready == 12)
    assert (prom.ready, prom.unacked, prom.consumers, prom.source) == (12, 0, 0, "prometheus")
    time.sleep(2.5)
    later = prom_probe.queue_stats(vhost, queue="emails", window_seconds=4)
    assert later.publish_rate == 0.0 and later.ack_rate == 0.0  # counters flat: measured zero
    pool.close()


class _Html200(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # http.server's name
        body = b"<html><body>Sign in to continue</body></html>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def html_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Html200)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_200_that_is_not_metrics_is_a_failed_probe_not_an_empty_queue(html_server):
    """A login page or proxy error with status 200 (seen behind SSO proxies)."""
    pool = BrokerPool()
    with pytest.raises(BrokerError, match="not JSON"):
        pool.management(ManagementEndpoint(html_server, "u", "p")).queue_stats("/", queue="emails")
    with pytest.raises(BrokerError):
        pool.prometheus(PrometheusEndpoint(html_server)).queue_stats("/", queue="emails")
    pool.close()
