"""Targets and HPAs are watched, not listed per poll (issue #15): the real operator process
against the real apiserver.

What a user relies on: a change to the Deployment (or a new HorizontalPodAutoscaler) reaches
the next poll without the operator listing anything again, and the operator's /healthz says
how many LISTs and WATCHes it made.
"""
from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest
import yaml

from emailqueue_testbed.state import free_port

from .support import get_json, wait_for
from .test_operator_scaling import _condition, _setup, _spec

pytestmark = pytest.mark.integration


def _watches(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        counts: dict[str, int] = json.loads(resp.read())["pollers"]["targetWatches"]
    return counts


def _status(kube_env: Any, namespace: str) -> dict[str, Any]:
    status: dict[str, Any] = get_json(kube_env, namespace, "emailqueue", "emails").get("status") or {}
    return status


def test_target_changes_and_new_hpas_arrive_by_watch_without_listing_again(kube_env, namespace, vhost,
                                                                         start_operator):
    # Paused without an annotation: the operator holds whatever replicas the Deployment has,
    # so status.currentReplicas shows what the operator last read of the target.
    _setup(kube_env, namespace, vhost, _spec(paused=True, behavior={"pollSeconds": 2}))
    health = free_port()
    operator = start_operator(namespace, "--health-port", str(health))
    wait_for(lambda: (_condition(kube_env, namespace, "Ready") or {}).get("status") == "True", 40, "a first poll")
    first = wait_for(lambda: _watches(health), 20, "the health endpoint")
    assert (first["lists"], first["objects"]) == (2, 1), first  # Deployments and HPAs of the namespace, once each

    time.sleep(8)  # four polls
    kube_env.kubectl("-n", namespace, "scale", "deployment", "email-worker", "--replicas=3")
    wait_for(lambda: _status(kube_env, namespace).get("currentReplicas") == 3, 20,
             "the operator sees the Deployment scaled out of band")
    rival = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "rival"},
             "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "email-worker"},
                      "minReplicas": 1, "maxReplicas": 2}}
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(rival))
    t0 = time.monotonic()
    wait_for(lambda: (_condition(kube_env, namespace, "Ready") or {}).get("reason") == "ConflictingAutoscaler", 20,
             "the new HPA is detected")
    detected = time.monotonic() - t0

    later = _watches(health)
    assert operator.proc.poll() is None, operator.output()[-3000:]
    # Every change came by watch: no LIST since the first two, and the objects held are the
    # Deployment and the HPA, not copies per poll.
    assert later["lists"] == first["lists"], (first, later)
    assert later["objects"] == 2, later
    assert detected < 10, f"an HPA took {detected:.1f} s to be noticed (a watch event, then one 2 s poll)"
