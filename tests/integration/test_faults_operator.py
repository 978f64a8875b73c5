"""Faults around the operator (issue 8): a rival autoscaler, a vanished target, 300 dead brokers.

The real operator process against the real apiserver; no kubelet (the operator only
writes `/scale`, which is what these tests read). Each test records its figures for
docs/reliability.md (tests/chaos/harness.py `record`).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from emailqueue_testbed.state import free_port
from tests.chaos.harness import long_or_short, record

from .support import amqp_secret, emailqueue, get_json, wait_for, worker_deployment
from .test_operator_scaling import _condition, _publish, _replicas, _setup, _spec

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def _hpa(name: str, target: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": name},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
                 "minReplicas": 1, "maxReplicas": 2,
                 "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                                                               "target": {"type": "Utilization",
                                                                          "averageUtilization": 80}}}]}})


def _events(kube_env, namespace: str, reason: str) -> list[dict]:
    items = get_json(kube_env, namespace, "events")["items"]
    return [e for e in items if e.get("reason") == reason]


def test_conflicting_hpa_is_detected_and_not_fought_then_scaling_resumes(kube_env, namespace, vhost, start_operator):
    _setup(kube_env, namespace, vhost, _spec(behavior={"pollSeconds": 2}))
    start_operator(namespace)
    wait_for(lambda: (_condition(kube_env, namespace, "Ready") or {}).get("status") == "True", 30, "a first poll")
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=_hpa("rival", "email-worker"))
    t0 = time.monotonic()
    cond = wait_for(lambda: (c := _condition(kube_env, namespace, "Ready")) and c["reason"] == "ConflictingAutoscaler"
                    and c, 40, "Ready=False ConflictingAutoscaler")
    detected = time.monotonic() - t0
    _publish(vhost, 100)  # would mean 4 replicas: the operator must leave the Deployment to the HPA
    held = []
    for _ in range(5):
        time.sleep(2)
        held.append(_replicas(kube_env, namespace))
    warnings = _events(kube_env, namespace, "ConflictingAutoscaler")
    kube_env.kubectl("-n", namespace, "delete", "hpa", "rival")
    t1 = time.monotonic()
    wait_for(lambda: _replicas(kube_env, namespace) == 4, 60, "scaling resumes once the HPA is gone")
    resumed = time.monotonic() - t1
    result = {"fault": "a HorizontalPodAutoscaler on the same Deployment",
              "expectation": "detected, Ready=False reason ConflictingAutoscaler + Warning event, no scaling; "
                             "resumes when the HPA is deleted",
              "condition": {k: cond[k] for k in ("status", "reason", "message")},
              "detected_seconds": round(detected, 1), "replicas_while_conflicting": held,
              "warning_events": len(warnings), "recovery_seconds": round(resumed, 1), "lost": None}
    record("conflicting-hpa", result)
    assert cond["status"] == "False" and "rival" in cond["message"], result
    assert held == [0] * 5, result
    assert warnings and "rival" in warnings[0]["message"], result


def test_target_deployment_deleted_and_recreated_is_reported_then_scaled_again(kube_env, namespace, vhost,
                                                                               start_operator):
    _setup(kube_env, namespace, vhost, _spec(behavior={"pollSeconds": 2}))
    operator = start_operator(namespace)
    _publish(vhost, 30)
    wait_for(lambda: _replicas(kube_env, namespace) == 3, 30, "3 replicas for 30 messages")
    kube_env.kubectl("-n", namespace, "delete", "deployment", "email-worker")
    t0 = time.monotonic()
    cond = wait_for(lambda: (c := _condition(kube_env, namespace, "Ready")) and c["status"] == "False" and c,
                    30, "Ready=False while the target is gone")
    reported = time.monotonic() - t0
    time.sleep(4)  # a few polls against a missing target
    assert operator.proc.poll() is None, "the operator died when its target vanished:\n" + operator.output()[-3000:]
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=worker_deployment("email-worker", 0))
    t1 = time.monotonic()
    wait_for(lambda: _replicas(kube_env, namespace) == 3, 45, "the recreated Deployment scaled to 3")
    recovered = time.monotonic() - t1
    ready = wait_for(lambda: (c := _condition(kube_env, namespace, "Ready")) and c["status"] == "True" and c, 30,
                     "Ready again")
    result = {"fault": "the target Deployment deleted, then recreated at 0 replicas",
              "expectation": "Ready=False with the reason while missing, operator keeps running, "
                             "the recreated Deployment is scaled back to what the backlog needs",
              "condition_while_missing": {k: cond[k] for k in ("reason", "message")},
              "reported_seconds": round(reported, 1), "recovery_seconds": round(recovered, 1),
              "ready_after": ready["status"], "lost": None}
    record("target-recreated", result)
    assert "email-worker" in cond["message"] or "not found" in cond["message"].lower(), result


def _proc_figures(pid: int) -> dict[str, float]:
    """CPU seconds, RSS MiB, open sockets and threads of a process, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(stat[11]) + int(stat[12])) / ticks
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    rss_mib = int(status["VmRSS"].split()[0]) / 1024
    sockets = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            sockets += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return {"cpu_seconds": cpu, "rss_mib": rss_mib, "sockets": sockets, "threads": int(status["Threads"])}


def _connections(pid: int, apiserver_port: str, broker_port: str) -> dict[str, int]:
    """The process's TCP connections by peer: apiserver, broker, other (from `ss -tanp`)."""
    import subprocess

    lines = subprocess.run(["ss", "-tanp"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    counts = {"apiserver": 0, "broker": 0, "other": 0}
    for line in lines:
        fields = line.split()
        if f"pid={pid}," not in line or fields[0] == "LISTEN" or len(fields) < 5:
            continue
        peer_port = fields[4].rsplit(":", 1)[-1]
        counts["apiserver" if peer_port == apiserver_port else "broker" if peer_port == broker_port else "other"] += 1
    return counts


def test_300_emailqueues_on_an_unreachable_broker_stay_bounded(kube_env, namespace, start_operator):
    count = 300
    dead_port = free_port()  # nothing listens: every connection attempt is refused at once
    uri = f"amqp://chaos:chaos@127.0.0.1:{dead_port}/"
    # One Deployment each: a second EmailQueue on one target would only wait (TargetClaimed).
    workers = [yaml.safe_load(worker_deployment(f"email-worker-{i:03d}", 1)) for i in range(count)]
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump_all(workers), timeout=180)
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=amqp_secret("rabbit", uri))
    docs = [yaml.safe_load(emailqueue(f"eq-{i:03d}", _spec(scaleTargetRef={"name": f"email-worker-{i:03d}"},
                                                          replicas={"min": 1, "max": 4},
                                                          behavior={"pollSeconds": 5})))
            for i in range(count)]
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump_all(docs), timeout=180)
    operator = start_operator(namespace)

    def failing() -> int:
        items = get_json(kube_env, namespace, "emailqueues")["items"]
        return sum(1 for eq in items if (eq.get("status") or {}).get("consecutiveFailures", 0) >= 1)

    t0 = time.monotonic()
    wait_for(lambda: failing() == count, long_or_short(240, 180), f"all {count} EmailQueues polled", interval=3)
    all_polled = time.monotonic() - t0
    # Creep is measured in the steady state: the first wave (300 loops starting, their first status
    # patches over up to ~170 connections) settles over two more polls before the window opens.
    time.sleep(2 * 5)
    window = long_or_short(60.0, 30.0)
    apiserver_port = kube_env.server.rsplit(":", 1)[1]
    first = _proc_figures(operator.proc.pid)
    connections: list[dict[str, int]] = []
    for _ in range(int(window // 3)):
        time.sleep(3)
        connections.append(_connections(operator.proc.pid, apiserver_port, str(dead_port)))
    second = _proc_figures(operator.proc.pid)
    cpu_share = (second["cpu_seconds"] - first["cpu_seconds"]) / window
    deployments = get_json(kube_env, namespace, "deployments")["items"]
    replicas = min(d["spec"]["replicas"] for d in deployments)  # none scaled down blind
    result = {"fault": f"{count} EmailQueues pointing at an unreachable broker (connection refused)",
              "expectation": "connections and memory bounded, no busy loop, no scale-down while blind",
              "emailqueues": count, "all_polled_seconds": round(all_polled, 1), "window_seconds": window,
              "operator_cpu_share_of_one_core": round(cpu_share, 3),
              "rss_mib": [round(first["rss_mib"], 1), round(second["rss_mib"], 1)],
              "broker_connections_max": max(c["broker"] for c in connections),
              "apiserver_connections_max": max(c["apiserver"] for c in connections),
              "apiserver_connections_last": connections[-1]["apiserver"],
              "threads": [first["threads"], second["threads"]], "replicas_after": replicas, "lost": None,
              "notes": "apiserver connections: kopf opens one per concurrent status patch during the first "
                       "wave of 300 writes (measured up to ~170), released once the writes settle"}
    record("unreachable-broker-300", result)
    assert operator.proc.poll() is None, result
    # Bounded: no connection to the dead broker is left open (one shared, retried with back-off),
    # apiserver connections never one per EmailQueue and not growing; memory does not creep.
    assert result["broker_connections_max"] <= 1, result
    assert result["apiserver_connections_max"] < count, result
    assert connections[-1]["apiserver"] <= connections[0]["apiserver"], result
    assert second["rss_mib"] - first["rss_mib"] <= 20, result
    # No busy loop: one pins a core. 300 failing probes every 5 s (and their warnings and status
    # writes) measured 0.31 of a core over make chaos's 60 s window and 0.43-0.52 over this 30 s
    # one on 2-core machines: the bound says "well under a core", not a machine's speed.
    assert cpu_share < 0.75, result
    assert replicas >= 1, result
