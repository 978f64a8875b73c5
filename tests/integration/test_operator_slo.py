"""SLO-driven scaling, live: the operator meets a surge from its arrival rate, before
the backlog has grown enough for the backlog-per-replica term (KEDA QueueLength) to ask."""
from __future__ import annotations

import math
import threading

import pika
import pytest
import yaml

from .support import amqp_secret, emailqueue, get_json, publish_steadily, wait_for, worker_deployment

pytestmark = pytest.mark.integration


def test_surge_is_met_from_the_arrival_rate(kube_env, namespace, vhost, rabbitmq, start_operator):
    with pika.BlockingConnection(pika.URLParameters(vhost)) as conn:
        conn.channel().queue_declare("emails", durable=True)
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=worker_deployment("email-worker", 1))
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=amqp_secret("rabbit", vhost))
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rabbit-mgmt"},
        "stringData": {"url": rabbitmq.mgmt_url}}))
    backlog_per_replica = 1000
    spec = {
        "scaleTargetRef": {"name": "email-worker"},
        "broker": {"queue": "emails", "amqpSecretRef": {"name": "rabbit", "uriKey": "uri"},
                   "managementSecretRef": {"name": "rabbit-mgmt", "urlKey": "url"}},
        "replicas": {"min": 1, "max": 20},
        "target": {"backlogPerReplica": backlog_per_replica, "drainSeconds": 30, "ratePerReplica": 5,
                   "startupSeconds": 5},
        "behavior": {"pollSeconds": 2, "scaleUp": {"policies": [{"type": "Pods", "value": 20, "periodSeconds": 15}]}},
    }
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=emailqueue("emails", spec))
    start_operator(namespace)
    wait_for(lambda: (get_json(kube_env, namespace, "emailqueue", "emails").get("status") or {}).get("lastDecision"),
             30, "a first decision")

    stop = threading.Event()
    publisher = threading.Thread(target=publish_steadily, args=(vhost, "emails", 40.0, 40.0, stop), daemon=True)
    publisher.start()
    try:
        def scaled_status():
            obj = get_json(kube_env, namespace, "emailqueue", "emails")
            status = obj.get("status") or {}
            # The management API needs a few seconds of samples before it reports a rate.
            return status if status.get("desiredReplicas", 1) >= 8 else None

        status = wait_for(scaled_status, 40, "a scale-up to the arrival rate")
    finally:
        stop.set()
        publisher.join(10)
    backlog = status["backlog"]["total"]
    by_backlog_alone = max(1, math.ceil(backlog / backlog_per_replica))
    terms = status["lastDecision"]["terms"]
    # 40/s arriving at 5/s per replica needs 8 replicas before any backlog: the arrival
    # rate drove this decision, while QueueLength would still ask for `by_backlog_alone`.
    assert status["desiredReplicas"] >= 8 > by_backlog_alone, status
    assert terms["drain"] > terms["backlog"], terms
    assert status["arrivalRate"] > 20
    assert "arriving" in status["lastDecision"]["reason"]
