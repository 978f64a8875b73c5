"""The broker pool shares one Prometheus-plugin probe per endpoint, as it does AMQP and
management probes, without rabbitmq.py importing rabbitmq_prometheus (no import cycle)."""
from __future__ import annotations

from emailqueue_operator.rabbitmq import BrokerPool
from emailqueue_operator.rabbitmq_prometheus import PrometheusEndpoint, PrometheusProbe


def test_pool_shares_one_prometheus_probe_per_endpoint_and_drops_idle_ones() -> None:
    now = [0.0]
    pool = BrokerPool(idle_seconds=300.0, clock=lambda: now[0])
    first = pool.prometheus(PrometheusEndpoint("http://rabbit:15692"))
    assert isinstance(first, PrometheusProbe)
    # every EmailQueue naming the same endpoint gets the same probe (one session, one scrape per vhost)
    assert pool.prometheus(PrometheusEndpoint("http://rabbit:15692")) is first
    # new credentials are a new endpoint, so a new probe; the old one goes once nobody asks for it
    rotated = PrometheusEndpoint("http://rabbit:15692", username="u", password="new")
    for _ in range(10):
        now[0] += 60.0
        second = pool.prometheus(rotated)
    assert second is not first and second.endpoint == rotated
    assert pool._probes["prometheus"] == {rotated: second}
    pool.close()
    assert pool._probes["prometheus"] == {}
