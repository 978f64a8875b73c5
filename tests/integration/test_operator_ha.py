"""Two operator processes, one Lease: the leader scales, the follower takes over when it dies.

Real processes against the test bed's apiserver and RabbitMQ. A publisher keeps the backlog
growing (no worker consumes), so the right replica count only ever rises; the EmailQueue
polls every 2 s and the election runs with a 4 s lease (3 s renew deadline, 0.5 s retry).
The leader is killed with SIGKILL (no hand-over); the follower must take the Lease within
the lease plus a retry period and scale within one poll interval plus the lease, the
follower must never have scaled while the leader lived, and the replica count never steps
back (two operators fighting, or a new leader that forgot the old one's state, would).
A leader stopped with SIGTERM releases the Lease (a follower would take it within a retry period).
"""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from typing import Any

import pika
import pytest
from kubernetes import client

from ..exposition import sample_values
from .support import amqp_secret, emailqueue, publish_steadily, wait_for, worker_deployment

pytestmark = pytest.mark.integration

QUEUE = "emails"
POLL, LEASE, DEADLINE, RETRY = 2, 4.0, 3.0, 0.5
ELECTION = ["--leader-elect", "--leader-elect-lease-duration", str(LEASE), "--leader-elect-renew-deadline",
            str(DEADLINE), "--leader-elect-retry-period", str(RETRY)]
SLACK = 3.0  # process scheduling, kubectl round trips and apiserver latency on a shared 2-core machine


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()




def counts_of(samples: list[tuple[float, int]]) -> list[int]:
    """The distinct replica counts in the order they were seen."""
    return [count for i, (_, count) in enumerate(samples) if i == 0 or samples[i - 1][1] != count]


def _holder(kube_env: Any, namespace: str) -> dict[str, Any]:
    result = kube_env.kubectl("-n", namespace, "get", "lease", "emailqueue-operator", "-o", "json", check=False)
    return json.loads(result.stdout)["spec"] if result.returncode == 0 else {}


def test_follower_takes_over_from_a_killed_leader_without_double_scaling(kube_env, namespace, vhost,
                                                                         start_operator):
    with pika.BlockingConnection(pika.URLParameters(vhost)) as conn:
        conn.channel().queue_declare(QUEUE, durable=True)
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=worker_deployment("email-worker", 0))
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=amqp_secret("rabbit", vhost))
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=emailqueue("emails", {
        "scaleTargetRef": {"name": "email-worker"},
        "broker": {"queue": QUEUE, "amqpSecretRef": {"name": "rabbit", "uriKey": "uri"}},
        "replicas": {"min": 0, "max": 50},
        "target": {"backlogPerReplica": 10},
        "behavior": {"pollSeconds": POLL, "scaleUp": {"policies": [{"type": "Pods", "value": 50, "periodSeconds": 1}]}},
    }))
    operators = {name: start_operator(namespace, *ELECTION, "--leader-election-namespace", namespace,
                                      "--leader-election-identity", name) for name in ("a", "b")}

    stop = threading.Event()
    publisher = threading.Thread(target=publish_steadily, args=(vhost, QUEUE, 5.0, 120.0, stop), daemon=True)
    publisher.start()
    apps = client.AppsV1Api(kube_env.api_client())
    samples: list[tuple[float, int]] = []

    def watch_replicas() -> None:
        while not stop.is_set():
            scale = apps.read_namespaced_deployment_scale("email-worker", namespace, _request_timeout=5)
            samples.append((time.monotonic(), scale.spec.replicas or 0))
            stop.wait(0.25)

    watcher = threading.Thread(target=watch_replicas, daemon=True)
    watcher.start()
    try:
        leader = wait_for(lambda: _holder(kube_env, namespace).get("holderIdentity"), 30, "a leader")
        follower = "b" if leader == "a" else "a"
        wait_for(lambda: samples and samples[-1][1] >= 2, 30, "the leader scaling up under load")

        # Only the leader polls and scales; the follower says so in its metrics.
        leader_scrape, follower_scrape = (_scrape(operators[n].metrics_port) for n in (leader, follower))
        assert sample_values(leader_scrape, "emailqueue_operator_leader") == [1.0]
        assert sample_values(follower_scrape, "emailqueue_operator_leader") == [0.0]
        assert sample_values(follower_scrape, "emailqueue_scale_actions_total") == [], "the follower scaled"
        assert sample_values(follower_scrape, "emailqueue_replicas_desired") == [], "the follower polled"

        operators[leader].proc.kill()  # SIGKILL: no hand-over, the Lease must run out
        killed = time.monotonic()
        at_kill = samples[-1][1]
        wait_for(lambda: _holder(kube_env, namespace).get("holderIdentity") == follower, LEASE + 2 * RETRY + SLACK,
                 "the follower to take the Lease", interval=0.2)
        took_lease = time.monotonic() - killed
        wait_for(lambda: samples[-1][1] > at_kill, POLL + LEASE + SLACK, "the new leader to scale", interval=0.2)
        scaled = time.monotonic() - killed
        stop.wait(2 * POLL)  # a little longer under the new leader: still only upwards
    finally:
        stop.set()
        publisher.join(10)
        watcher.join(10)

    print(f"takeover: Lease after {took_lease:.1f} s, first scale after {scaled:.1f} s; replicas {counts_of(samples)}")
    assert took_lease <= LEASE + 2 * RETRY + SLACK
    assert scaled <= POLL + LEASE + SLACK, f"first scale {scaled:.1f} s after the kill"
    counts = [replicas for _, replicas in samples]
    assert counts == sorted(counts), f"the replica count stepped back (flapping): {counts}"
    lease = _holder(kube_env, namespace)
    assert lease["holderIdentity"] == follower and lease["leaseTransitions"] == 1
    new_scrape = _scrape(operators[follower].metrics_port)
    assert sample_values(new_scrape, "emailqueue_operator_leader") == [1.0]
    assert sum(sample_values(new_scrape, "emailqueue_scale_actions_total")) >= 1

    # A graceful stop (rolling update, node drain) hands the Lease over instead of letting it run out.
    operators[follower].stop()
    released = _holder(kube_env, namespace)
    assert not released.get("holderIdentity") and released["leaseDurationSeconds"] == 1, released
