"""Broker outage: fallback replicas and a condition, and never a scale-down while blind."""
from __future__ import annotations

import time

import pytest

from .support import get_json, wait_for
from .test_operator_scaling import _condition, _publish, _replicas, _setup, _spec

pytestmark = pytest.mark.integration


def test_broker_stopped_triggers_fallback_without_scaling_down(kube_env, namespace, private_rabbitmq, start_operator):
    rabbitmq = private_rabbitmq
    vhost = rabbitmq.amqp_url("/")
    spec = _spec(replicas={"min": 0, "max": 6}, target={"backlogPerReplica": 50},
                 fallback={"afterFailures": 2, "replicas": 5, "mode": "static"})
    _setup(kube_env, namespace, vhost, spec)
    start_operator(namespace)
    _publish(vhost, 100)
    wait_for(lambda: _replicas(kube_env, namespace) == 2, 30, "2 replicas for 100 messages at 50 each")

    rabbitmq.stop_broker()
    try:
        cond = wait_for(
            lambda: (c := _condition(kube_env, namespace, "FallbackActive")) and c["status"] == "True" and c,
            40, "FallbackActive after 2 failed probes")
        assert _replicas(kube_env, namespace) == 5
        status = get_json(kube_env, namespace, "emailqueue", "emails")["status"]
        assert status["consecutiveFailures"] >= 2
        assert _condition(kube_env, namespace, "MetricsAvailable")["status"] == "False"
        assert _condition(kube_env, namespace, "Ready")["status"] == "False"
        assert "fallback" in cond["message"].lower() or "5" in cond["message"]
        for _ in range(4):  # still blind: never below the fallback
            time.sleep(2.5)
            assert _replicas(kube_env, namespace) == 5
    finally:
        rabbitmq.start_broker()
    wait_for(lambda: (_condition(kube_env, namespace, "MetricsAvailable") or {}).get("status") == "True", 60,
             "metrics back after the broker restarts")
    assert _condition(kube_env, namespace, "FallbackActive")["status"] == "False"
