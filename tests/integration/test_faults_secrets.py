"""Credentials never leak (issue 8): not in logs, events, status or metrics labels.

Three EmailQueues whose Secrets hold distinctive passwords (special characters included,
separate username/password keys and a URI): one that works, one with a wrong password,
one pointing at a port where nothing listens. The operator polls them all for a while;
then its log, the namespace's Events, every EmailQueue's status and the operator's
/metrics are captured and searched for each password, raw and percent-encoded. A worker
started with a wrong password in its AMQP URL is searched the same way (log and /metrics).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pika
import pytest
import yaml

from emailqueue_testbed.state import free_port
from tests.chaos.harness import record

from .support import emailqueue, get_json, wait_for, worker_deployment

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def _secret(name: str, data: dict[str, str]) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data})


def _forms(password: str) -> set[str]:
    """Every way a password could show up in text we capture."""
    return {password, urllib.parse.quote(password, safe=""), urllib.parse.quote(password)}


def _leaks(text: str, passwords: list[str]) -> list[str]:
    return sorted({form for p in passwords for form in _forms(p) if form in text})


def test_credentials_never_reach_logs_events_status_or_metrics(kube_env, namespace, rabbitmq, vhost,
                                                                start_operator, tmp_path: Path):
    tag = uuid.uuid4().hex[:8]
    good_password, wrong_password, down_password = (f"Good-{tag}!:@/%#", f"Wrong-{tag}$&?=", f"Down-{tag}+;,")
    user = f"chaos-{tag}"
    vhost_name = urllib.parse.unquote(urllib.parse.urlparse(vhost).path[1:])
    mgmt = rabbitmq.management()
    mgmt.request("PUT", f"/api/users/{user}", {"password": good_password, "tags": "monitoring"})
    mgmt.request("PUT", f"/api/permissions/{urllib.parse.quote(vhost_name, safe='')}/{user}",
                 {"configure": ".*", "write": ".*", "read": ".*"})
    with pika.BlockingConnection(pika.URLParameters(vhost)) as conn:
        conn.channel().queue_declare("emails", durable=True)
    host, port = "127.0.0.1", str(rabbitmq.amqp_port)
    dead_port = str(free_port())
    secrets = {
        "good": {"host": host, "port": port, "username": user, "password": good_password,
                 "url": rabbitmq.mgmt_url, "mgmt-user": user, "mgmt-password": good_password, "vhost": vhost_name},
        "wrong": {"host": host, "port": port, "username": user, "password": wrong_password,
                  "url": rabbitmq.mgmt_url, "mgmt-user": user, "mgmt-password": wrong_password},
        "down": {"uri": f"amqp://{user}:{urllib.parse.quote(down_password, safe='')}@127.0.0.1:{dead_port}/"},
    }
    for name, data in secrets.items():
        # One Deployment each: a second EmailQueue on one target would only wait (TargetClaimed).
        kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=worker_deployment(f"email-worker-{name}", 1))
        kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=_secret(f"rabbit-{name}", data))
        if "uri" in data:
            broker = {"queue": "emails", "amqpSecretRef": {"name": f"rabbit-{name}", "uriKey": "uri"}}
        else:
            broker = {"queue": "emails", "vhost": vhost_name,
                      "amqpSecretRef": {"name": f"rabbit-{name}", "hostKey": "host", "portKey": "port",
                                        "usernameKey": "username", "passwordKey": "password"},
                      "managementSecretRef": {"name": f"rabbit-{name}", "urlKey": "url",
                                              "usernameKey": "mgmt-user", "passwordKey": "mgmt-password"}}
        spec = {"scaleTargetRef": {"name": f"email-worker-{name}"}, "broker": broker, "replicas": {"min": 1, "max": 3},
                "behavior": {"pollSeconds": 2}, "fallback": {"afterFailures": 2, "replicas": 2}}
        kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=emailqueue(name, spec))
    operator = start_operator(namespace)

    def statuses() -> dict[str, dict]:
        return {eq["metadata"]["name"]: eq.get("status") or {}
                for eq in get_json(kube_env, namespace, "emailqueues")["items"]}

    def polled() -> bool:
        s = statuses()
        ready = any(c.get("type") == "MetricsAvailable" and c.get("status") == "True"
                    for c in s.get("good", {}).get("conditions", []))
        return ready and all(s.get(n, {}).get("consecutiveFailures", 0) >= 2 for n in ("wrong", "down"))

    wait_for(polled, 60, "the good EmailQueue polled, the bad ones failing twice (fallback)")
    time.sleep(4)
    captured = {
        "operator log": operator.output(),
        "events": kube_env.kubectl("-n", namespace, "get", "events", "-o", "json").stdout,
        "status": json.dumps(statuses()),
        "operator metrics": urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics",
                                                   timeout=10).read().decode(),
    }
    captured.update(_worker_capture(rabbitmq, vhost_name, user, wrong_password, tmp_path))
    passwords = [good_password, wrong_password, down_password]
    leaks = {where: _leaks(text, passwords) for where, text in captured.items()}
    result = {"fault": "distinctive broker passwords (good, wrong, unreachable) searched in captured output",
              "expectation": "no password (raw or percent-encoded) in operator log, events, status, metrics, "
                             "worker log or worker metrics",
              "captured_bytes": {where: len(text) for where, text in captured.items()},
              "leaks": {where: len(found) for where, found in leaks.items()},
              "errors_reported": sum(1 for line in captured["operator log"].splitlines()
                                     if "auth" in line.lower() or "refused" in line.lower()),
              "lost": None}
    record("credentials-not-leaked", result)
    assert all(not found for found in leaks.values()), leaks
    # ...and the failures were reported (we searched real error output, not silence).
    assert result["errors_reported"] >= 1, captured["operator log"][-3000:]
    assert "wrong" in captured["status"].lower() or "auth" in captured["status"].lower() \
        or "refused" in captured["status"].lower(), captured["status"][:2000]


def _worker_capture(rabbitmq, vhost_name: str, user: str, password: str, tmp_path: Path) -> dict[str, str]:
    """A worker with a wrong password in its AMQP URL: its log and /metrics after a few attempts."""
    metrics_port = free_port()
    url = f"amqp://{user}:{urllib.parse.quote(password, safe='')}@127.0.0.1:{rabbitmq.amqp_port}/" \
          f"{urllib.parse.quote(vhost_name, safe='')}"
    log = tmp_path / "worker.log"
    env = {**os.environ, "AMQP_URL": url, "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(free_port()),
           "METRICS_PORT": str(metrics_port), "LOG_LEVEL": "debug"}
    with open(log, "wb") as out:  # the child has its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-c",
                                 "import sys; from email_worker.cli import main; sys.exit(main())", "run"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    metrics = ""
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not metrics:
            time.sleep(1)
            try:
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=3).read().decode()
            except OSError:
                pass
        time.sleep(3)  # a few reconnect attempts
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"worker log": log.read_text(errors="replace"), "worker metrics": metrics}
