"""The real operator on each broker of the matrix, through the sources a platform team has.

RabbitMQ 3.10.8, 3.10.8 without the management metrics collector (what RabbitMQ recommends
with its Prometheus plugin) and 4.0.x. A healthy broker never triggers the fallback; the
Prometheus plugin gives rates on every one of them; the management API of a broker without
its collector gives counts only, and the operator says so instead of reading zeros.
"""
from __future__ import annotations

import threading
import time

import pika
import pytest
import yaml

from .support import amqp_secret, emailqueue, get_json, publish_steadily, wait_for, worker_deployment

pytestmark = pytest.mark.integration

QUEUE = "emails"


def _secret(name: str, **data: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data})


def _setup(kube_env, namespace: str, url: str, broker, source: str, target: dict) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as conn:
        conn.channel().queue_declare(QUEUE, durable=True)
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=worker_deployment("email-worker", 0))
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=amqp_secret("rabbit", url))
    broker_spec = {"queue": QUEUE, "amqpSecretRef": {"name": "rabbit", "uriKey": "uri"}, "metricsSource": source}
    if source == "prometheus":
        kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=_secret("rabbit-prom", url=broker.prom_url))
        broker_spec["prometheusSecretRef"] = {"name": "rabbit-prom", "urlKey": "url"}
    else:
        user, password = broker.mgmt_auth
        kube_env.kubectl("-n", namespace, "apply", "-f", "-",
                         input=_secret("rabbit-mgmt", url=broker.mgmt_url, user=user, password=password))
        broker_spec["managementSecretRef"] = {"name": "rabbit-mgmt", "urlKey": "url", "usernameKey": "user",
                                              "passwordKey": "password"}
    spec = {"scaleTargetRef": {"name": "email-worker"}, "broker": broker_spec,
            "replicas": {"min": 0, "max": 8}, "target": target,
            "behavior": {"pollSeconds": 2, "cooldownSeconds": 10, "tolerance": 0,
                         "scaleDown": {"stabilizationSeconds": 0}},
            "fallback": {"afterFailures": 2, "replicas": 7}}
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=emailqueue("emails", spec))


def _status(kube_env, namespace: str) -> dict:
    return get_json(kube_env, namespace, "emailqueue", "emails").get("status") or {}


def _replicas(kube_env, namespace: str) -> int:
    return get_json(kube_env, namespace, "deployment", "email-worker")["spec"]["replicas"]


def _cond(status: dict, cond_type: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == cond_type), {})


class Watch:
    """Samples the EmailQueue's status in the background: no fallback, no failure, ever."""

    def __init__(self, kube_env, namespace: str) -> None:
        self.kube_env, self.namespace = kube_env, namespace
        self.fallback_seen = self.failures_seen = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            status = _status(self.kube_env, self.namespace)
            self.fallback_seen += _cond(status, "FallbackActive").get("status") == "True"
            self.failures_seen += (status.get("consecutiveFailures") or 0) > 0

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


# The Prometheus plugin reads the broker's core metrics, which `disable_metrics_collector` (a
# management-agent setting) leaves alone: on 3.10 with and without the collector it serves the
# same series, so the scaling run goes on the collector-less 3.10 (RabbitMQ's recommended setup)
# and 4.0. The probe tests (test_prometheus_probe) still read all three.
@pytest.mark.parametrize("any_broker", ["3.10-nocollector", "4.0"], indirect=True)
def test_prometheus_source_scales_up_and_down_on_every_broker(kube_env, namespace, broker_vhost, start_operator):
    broker, _, url = broker_vhost
    # messageRate (KEDA MessageRate parity): 20 emails/s at 5 per replica → 4 replicas.
    _setup(kube_env, namespace, url, broker, "prometheus", {"backlogPerReplica": 1000, "messageRatePerReplica": 5})
    start_operator(namespace)
    wait_for(lambda: _cond(_status(kube_env, namespace), "Ready").get("status") == "True", 40, "a first poll")
    watch = Watch(kube_env, namespace)
    try:
        publisher = threading.Thread(target=publish_steadily, args=(url, QUEUE, 20.0, 25.0), daemon=True)
        publisher.start()
        wait_for(lambda: _replicas(kube_env, namespace) == 4, 40, "4 replicas for 20 emails/s")
        # Rates come from the counters once two scrapes span half the window (10 s here).
        status = wait_for(lambda: (s := _status(kube_env, namespace)).get("signals", {}).get("missing")
                          == ["oldestMessageAge"] and s, 20, "publish/ack rates from the counters")
        assert status["signals"]["source"] == "prometheus"
        assert 14 <= status["arrivalRate"] <= 26, status["arrivalRate"]
        publisher.join()
        with pika.BlockingConnection(pika.URLParameters(url)) as conn:
            conn.channel().queue_purge(QUEUE)
        wait_for(lambda: _replicas(kube_env, namespace) == 0, 60, "back to 0 once nothing arrives")
    finally:
        watch.close()
    assert watch.fallback_seen == 0 and watch.failures_seen == 0, "a healthy broker triggered the fallback"


def test_management_without_collector_reads_counts_only_and_says_so(kube_env, namespace, rabbitmq_nocollector,
                                                                    start_operator):
    broker = rabbitmq_nocollector
    vhost = f"t-{time.monotonic_ns() % 10**10}"
    mgmt = broker.management()
    mgmt.create_vhost(vhost, broker.mgmt_auth[0])
    url = broker.amqp_url(vhost)
    try:
        _setup(kube_env, namespace, url, broker, "management",
               {"ratePerReplica": 10, "drainSeconds": 30, "startupSeconds": 5})
        with pika.BlockingConnection(pika.URLParameters(url)) as conn:
            ch = conn.channel()
            for _ in range(150):
                ch.basic_publish("", QUEUE, b"{}", pika.BasicProperties(delivery_mode=2))
        start_operator(namespace)
        wait_for(lambda: _replicas(kube_env, namespace) >= 1, 40, "a scale-up from the queue totals")
        status = _status(kube_env, namespace)
        assert status["signals"]["source"] == "management-totals"
        assert set(status["signals"]["missing"]) == {"consumers", "publishRate", "ackRate", "oldestMessageAge"}
        assert status["backlog"]["ready"] == 150 and _cond(status, "MetricsAvailable")["status"] == "True"
        # Messages wait and no rate says how fast: the fleet is never cut while they do.
        peak = _replicas(kube_env, namespace)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = _replicas(kube_env, namespace)
            assert now >= peak, "scaled down while messages were waiting"
            peak = now
            time.sleep(2)
        assert _cond(_status(kube_env, namespace), "FallbackActive").get("status") != "True"
    finally:
        mgmt.delete_vhost(vhost)
