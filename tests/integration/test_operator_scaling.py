"""The real operator process against the real apiserver and RabbitMQ (issue: KEDA parity).

A worker Deployment at 0 replicas; an EmailQueue with min 0, max 4, backlogPerReplica 10,
pollSeconds 5, cooldownSeconds 10. No kubelet runs here: the operator only changes
the Deployment's replicas through /scale, which is what these tests read.
"""
from __future__ import annotations

import time
import urllib.request

import pika
import pytest

from .support import amqp_secret, emailqueue, get_json, wait_for, worker_deployment

pytestmark = pytest.mark.integration

QUEUE = "emails"


def _spec(**overrides):
    spec = {
        "scaleTargetRef": {"name": "email-worker"},
        "broker": {"queue": QUEUE, "amqpSecretRef": {"name": "rabbit", "uriKey": "uri"}},
        "replicas": {"min": 0, "max": 4},
        "target": {"backlogPerReplica": 10},
        "behavior": {"pollSeconds": 5, "cooldownSeconds": 10},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def _setup(kube_env, namespace, vhost, spec):
    with pika.BlockingConnection(pika.URLParameters(vhost)) as conn:
        conn.channel().queue_declare(QUEUE, durable=True)
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=worker_deployment("email-worker", 0))
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=amqp_secret("rabbit", vhost))
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=emailqueue("emails", spec))


def _publish(vhost, n):
    with pika.BlockingConnection(pika.URLParameters(vhost)) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        for i in range(n):
            ch.basic_publish("", QUEUE, b'{"id": "%d"}' % i, pika.BasicProperties(delivery_mode=2))


def _replicas(kube_env, namespace):
    return get_json(kube_env, namespace, "deployment", "email-worker")["spec"]["replicas"]


def _condition(kube_env, namespace, cond_type):
    status = get_json(kube_env, namespace, "emailqueue", "emails").get("status") or {}
    for cond in status.get("conditions", []):
        if cond["type"] == cond_type:
            return cond
    return None


def test_scales_on_backlog_then_to_zero_after_cooldown(kube_env, namespace, vhost, start_operator):
    _setup(kube_env, namespace, vhost, _spec())
    operator = start_operator(namespace)
    wait_for(lambda: _condition(kube_env, namespace, "Ready"), 30, "a first poll")
    assert _replicas(kube_env, namespace) == 0

    _publish(vhost, 100)
    started = time.monotonic()
    wait_for(lambda: _replicas(kube_env, namespace) == 4, 30, "4 replicas for 100 messages")
    assert time.monotonic() - started <= 30
    status = get_json(kube_env, namespace, "emailqueue", "emails")["status"]
    assert status["backlog"]["ready"] == 100
    assert status["desiredReplicas"] == 4
    assert "max" in status["lastDecision"]["limits"]  # 100/10 = 10 replicas wanted, capped at max 4
    events = kube_env.kubectl("-n", namespace, "get", "events", "--field-selector",
                              "involvedObject.kind=EmailQueue", "-o", "jsonpath={.items[*].message}").stdout
    assert "0 → 4 replicas" in events and "backlog" in events

    # The printer columns show what a user watching `kubectl get eq` needs.
    header = kube_env.kubectl("-n", namespace, "get", "eq").stdout.splitlines()[0].split()
    assert header[:6] == ["NAME", "TARGET", "BACKLOG", "RATE", "REPLICAS", "DESIRED"]

    # Metrics are exported per EmailQueue.
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).read().decode()
    assert f'emailqueue_replicas_desired{{name="emails",namespace="{namespace}"}} 4.0' in scrape

    with pika.BlockingConnection(pika.URLParameters(vhost)) as conn:
        conn.channel().queue_purge(QUEUE)
    started = time.monotonic()
    wait_for(lambda: _replicas(kube_env, namespace) == 0, 60, "scale to zero after the cooldown")
    # Not at the first empty poll: the 10 s cooldown runs from the last poll that saw work
    # (up to one 5 s poll before the purge), so at least one more idle poll comes first.
    assert time.monotonic() - started >= 5
    reason = get_json(kube_env, namespace, "emailqueue", "emails")["status"]["lastDecision"]["reason"]
    assert "cooldown" in reason


def test_activation_backlog_keeps_zero_for_a_trickle(kube_env, namespace, vhost, start_operator):
    _setup(kube_env, namespace, vhost, _spec(replicas={"activationBacklog": 5}))
    start_operator(namespace)
    _publish(vhost, 3)
    wait_for(lambda: (_condition(kube_env, namespace, "Ready") or {}).get("status") == "True", 30, "a poll")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert _replicas(kube_env, namespace) == 0, "3 messages are below activationBacklog 5"
        time.sleep(2)
    status = get_json(kube_env, namespace, "emailqueue", "emails")["status"]
    assert status["backlog"]["ready"] == 3
    _publish(vhost, 5)  # 8 > 5: now it activates
    wait_for(lambda: _replicas(kube_env, namespace) >= 1, 30, "activation above the threshold")


def test_dry_run_decides_but_never_scales(kube_env, namespace, vhost, start_operator):
    _setup(kube_env, namespace, vhost, _spec(dryRun=True))
    start_operator(namespace)
    _publish(vhost, 40)
    status = wait_for(lambda: (get_json(kube_env, namespace, "emailqueue", "emails").get("status") or {})
                      .get("desiredReplicas") == 4 and get_json(kube_env, namespace, "emailqueue", "emails")["status"],
                      30, "a dry-run decision")
    assert status["lastDecision"]["replicas"] == 4
    time.sleep(6)
    assert _replicas(kube_env, namespace) == 0


def test_paused_holds_at_annotation(kube_env, namespace, vhost, start_operator):
    _setup(kube_env, namespace, vhost, _spec(paused=True))
    kube_env.kubectl("-n", namespace, "annotate", "emailqueue", "emails", "emailqueue.dev/paused-replicas=2")
    start_operator(namespace)
    _publish(vhost, 100)
    wait_for(lambda: _replicas(kube_env, namespace) == 2, 30, "the paused replica count")
    # The status is written after the /scale patch: wait for it rather than race it.
    wait_for(lambda: (_condition(kube_env, namespace, "Paused") or {}).get("status") == "True", 15,
             "the Paused condition")
    wait_for(lambda: any(e.get("reason") == "Paused" and "paused at emailqueue.dev/paused-replicas=2" in e["message"]
                         for e in get_json(kube_env, namespace, "events")["items"]), 15, "the Paused event")
    time.sleep(6)
    assert _replicas(kube_env, namespace) == 2


def test_missing_secret_and_target_are_reported_not_scaled(kube_env, namespace, vhost, start_operator):
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=worker_deployment("email-worker", 3))
    spec = _spec(replicas={"min": 0, "max": 4})
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=emailqueue("emails", spec))
    start_operator(namespace)
    cond = wait_for(lambda: (c := _condition(kube_env, namespace, "Ready")) and c["status"] == "False" and c,
                    30, "Ready=False for a missing Secret")
    assert cond["reason"] == "SecretNotFound" and "rabbit" in cond["message"]
    time.sleep(6)
    assert _replicas(kube_env, namespace) == 3, "a configuration error never scales the target down"
    warnings = kube_env.kubectl("-n", namespace, "get", "events", "--field-selector", "type=Warning",
                                "-o", "jsonpath={.items[*].reason}").stdout
    assert "SecretNotFound" in warnings
    # Point it at a Deployment that does not exist.
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=amqp_secret("rabbit", vhost))
    kube_env.kubectl("-n", namespace, "patch", "emailqueue", "emails", "--type=merge",
                     "-p", '{"spec": {"scaleTargetRef": {"name": "missing"}}}')
    wait_for(lambda: (_condition(kube_env, namespace, "Ready") or {}).get("reason") == "TargetNotFound", 30,
             "Ready=False TargetNotFound")


def test_a_second_emailqueue_on_the_same_target_waits_and_says_so(kube_env, namespace, vhost, start_operator):
    _setup(kube_env, namespace, vhost, _spec())
    time.sleep(1.1)  # creationTimestamp has one-second resolution: "emails" is the older one
    kube_env.kubectl("-n", namespace, "apply", "-f", "-",
                     input=emailqueue("rival", _spec(target={"backlogPerReplica": 50})))
    start_operator(namespace)
    _publish(vhost, 100)
    wait_for(lambda: _replicas(kube_env, namespace) == 4, 30, "the first EmailQueue scales")

    def rival_ready():
        status = get_json(kube_env, namespace, "emailqueue", "rival").get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == "Ready"), None)

    wait_for(lambda: (rival_ready() or {}).get("reason") == "TargetClaimed", 30, "the rival reports the claim")
    assert rival_ready()["status"] == "False" and "emails" in rival_ready()["message"]
    # 100 messages at 50 per replica would be 2: the rival never fought the first one down.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert _replicas(kube_env, namespace) == 4
        time.sleep(2)
