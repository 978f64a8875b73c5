"""Helpers for tests that drive the operator on the test bed: manifests and waiting."""
from __future__ import annotations

import json
import time
from typing import Any, Callable

import yaml


def worker_deployment(name: str, replicas: int = 0) -> str:
    return yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "worker", "image": "example.invalid/email-worker:0"}]}}},
    })


def amqp_secret(name: str, uri: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                           "stringData": {"uri": uri}})


def emailqueue(name: str, spec: dict[str, Any]) -> str:
    return yaml.safe_dump({"apiVersion": "emailqueue.dev/v1alpha1", "kind": "EmailQueue",
                           "metadata": {"name": name}, "spec": spec})


def get_json(kube_env, namespace: str, *what: str) -> dict[str, Any]:
    return json.loads(kube_env.kubectl("-n", namespace, "get", *what, "-o", "json").stdout)


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
