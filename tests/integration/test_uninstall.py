"""The operator can be removed before its EmailQueues, and it unsticks what v0.1 left behind.

v0.1 ran kopf daemons, which put the finalizer `emailqueue.dev/operator` on every EmailQueue:
with the operator gone, `kubectl delete eq` (and a namespace delete) hung forever. Now no
handler needs a finalizer, and the operator removes v0.1's from the objects it sees: a live
one loses it, one already stuck in Terminating goes away. Then the operator is stopped and
every EmailQueue still deletes. (The test bed has no namespace controller, which would do
the same deletes for a namespace; an EmailQueue without a finalizer is what lets it finish.)
"""
from __future__ import annotations

import json

import pika
import pytest
import yaml

from .support import amqp_secret, emailqueue, get_json, wait_for, worker_deployment

pytestmark = pytest.mark.integration

LEGACY_FINALIZER = "emailqueue.dev/operator"
SPEC = {"scaleTargetRef": {"name": "email-worker"},
        "broker": {"queue": "emails", "amqpSecretRef": {"name": "rabbit", "uriKey": "uri"}},
        "replicas": {"min": 0, "max": 2}, "behavior": {"pollSeconds": 2}}


def _legacy(name: str) -> str:
    """An EmailQueue as v0.1 left it: carrying its finalizer."""
    doc = yaml.safe_load(emailqueue(name, SPEC))
    doc["metadata"]["finalizers"] = [LEGACY_FINALIZER]
    return yaml.safe_dump(doc)


def _names(kube_env, namespace: str) -> set[str]:
    items = json.loads(kube_env.kubectl("-n", namespace, "get", "eq", "-o", "json").stdout)["items"]
    return {item["metadata"]["name"] for item in items}


def test_operator_removed_first_leaves_no_emailqueue_stuck(kube_env, namespace, vhost, start_operator):
    with pika.BlockingConnection(pika.URLParameters(vhost)) as conn:
        conn.channel().queue_declare("emails", durable=True)
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=worker_deployment("email-worker", 0))
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=amqp_secret("rabbit", vhost))
    # v0.1 leftovers: one in use, one deleted while no operator ran (stuck in Terminating).
    for name in ("legacy-live", "legacy-stuck"):
        kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=_legacy(name))
    kube_env.kubectl("-n", namespace, "delete", "eq", "legacy-stuck", "--wait=false")
    assert get_json(kube_env, namespace, "eq", "legacy-stuck")["metadata"].get("deletionTimestamp")

    operator = start_operator(namespace)
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=emailqueue("fresh", SPEC))
    wait_for(lambda: "legacy-stuck" not in _names(kube_env, namespace), 30, "the stuck v0.1 EmailQueue to go")
    wait_for(lambda: not get_json(kube_env, namespace, "eq", "legacy-live")["metadata"].get("finalizers"), 10,
             "v0.1's finalizer removed from a live EmailQueue")
    fresh = wait_for(lambda: (get_json(kube_env, namespace, "eq", "fresh").get("status") or {}).get("conditions")
                     and get_json(kube_env, namespace, "eq", "fresh"), 20, "the operator polling a new EmailQueue")
    assert not fresh["metadata"].get("finalizers"), "the operator put a finalizer on a new EmailQueue"

    operator.stop()  # uninstalled before its EmailQueues
    assert operator.proc.returncode is not None
    result = kube_env.kubectl("-n", namespace, "delete", "eq", "--all", "--timeout=15s", check=False, timeout=30)
    assert result.returncode == 0, result.stderr
    assert _names(kube_env, namespace) == set()
