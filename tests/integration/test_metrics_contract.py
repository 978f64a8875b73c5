"""Every metric the dashboard and the alert rules query is exported by the running
operator and worker processes (scraped over HTTP, not read from the Python classes)."""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest
import yaml

from emailqueue_testbed.state import free_port

from ..exposition import series_names
from ..unit.test_alerts import RULES
from ..unit.test_dashboard import PROMETHEUS_SYNTHETIC, _queries, load_dashboard, promql_metric_names
from .support import amqp_secret, emailqueue, wait_for, worker_deployment

pytestmark = pytest.mark.integration

def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as resp:
            return resp.read().decode()
    except OSError:
        return None


def test_dashboard_and_alerts_query_only_what_the_processes_export(kube_env, namespace, vhost, smtp,
                                                                   start_operator, tmp_path):
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=worker_deployment("email-worker", 1))
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=amqp_secret("rabbit", vhost))
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=emailqueue("emails", {
        "scaleTargetRef": {"name": "email-worker"},
        "broker": {"queue": "emails", "amqpSecretRef": {"name": "rabbit", "uriKey": "uri"}},
        "target": {"drainSeconds": 30}}))
    worker_port = free_port()
    with open(tmp_path / "worker.log", "wb") as out:  # the child has its own copy of the descriptor
        worker = subprocess.Popen(
            [sys.executable, "-m", "email_worker", "run", "--metrics-port", str(worker_port)],
            env={**os.environ, "AMQP_URL": vhost, "SMTP_HOST": smtp.host, "SMTP_PORT": str(smtp.port)},
            stdout=out, stderr=subprocess.STDOUT)
    try:
        # As the chart runs it (leader election on): the leader gauge is part of what is exported.
        operator = start_operator(namespace, "--leader-elect", "--leader-election-namespace", namespace,
                                  "--leader-election-id", "metrics-contract")
        worker_scrape = wait_for(lambda: _scrape(worker_port), 30, "the worker's /metrics")
        operator_scrape = wait_for(lambda: (s := _scrape(operator.metrics_port)) and "emailqueue_replicas_desired{" in s
                                   and s, 30, "the operator's per-EmailQueue metrics")
    finally:
        worker.terminate()
        worker.wait(30)
    names = series_names(worker_scrape) | series_names(operator_scrape) | PROMETHEUS_SYNTHETIC

    queries = [(f"dashboard: {where}", expr) for where, expr in _queries(load_dashboard())]
    rules = yaml.safe_load(RULES.read_text())
    queries += [(f"alert {r.get('alert') or r.get('record')}", r["expr"])
                for group in rules["groups"] for r in group["rules"]]
    assert len(queries) > 10
    missing = {where: sorted(promql_metric_names(expr) - names) for where, expr in queries
               if promql_metric_names(expr) - names}
    assert not missing, missing
