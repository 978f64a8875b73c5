"""`helm template` renders monitoring that watches the operator it installs, whatever it is called.

The ServiceMonitor gives the operator's scrape job (its `jobLabel` label on the selected
Service, else the Service's name, as the Prometheus Operator does); the rendered
EmailQueueOperatorDown rule and the dashboard's "operator up" query must match exactly that
job, or the critical alert fires forever. Renders only (no cluster), with the test bed's
cached helm binary; skipped when it is not built (`make testbed-bins`).
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from emailqueue_testbed import state

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "emailqueue-operator"
MONITORING = ["--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true",
              "--set", "dashboard.enabled=true", "--set", "worker.enabled=true",
              "--set", "worker.smtp.host=smtp.example.com", "--set", "worker.amqpSecret.name=rabbitmq"]

_UP_SELECTOR = re.compile(r'\bup\{([^}]*)\}')
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def _helm() -> str:
    try:
        return str(state.binary("helm"))
    except state.TestbedError as exc:
        pytest.skip(str(exc))


def render(release: str, *values: str) -> list[dict[str, Any]]:
    result = subprocess.run([_helm(), "template", release, str(CHART), "--namespace", "mail", *MONITORING, *values],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def operator_job(docs: list[dict[str, Any]]) -> str:
    """The `job` label Prometheus gives the operator's targets through the rendered ServiceMonitor."""
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"
                and d["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == "operator"]
    assert len(monitors) == 1, "expected one operator ServiceMonitor"
    monitor = monitors[0]["spec"]
    services = [d for d in docs if d["kind"] == "Service"
                and monitor["selector"]["matchLabels"].items() <= d["metadata"].get("labels", {}).items()]
    assert len(services) == 1, "the operator ServiceMonitor must select exactly the operator Service"
    service = services[0]["metadata"]
    if "jobLabel" in monitor:
        return service["labels"][monitor["jobLabel"]]
    return service["name"]


def up_selectors_match(expr: str, job: str) -> list[bool]:
    """For every `up{...}` selector in expr: does it select a target with this job?"""
    results = []
    for selector in _UP_SELECTOR.findall(expr):
        ok = True
        for label, op, value in _MATCHER.findall(selector.replace('\\"', '"')):
            if label != "job":
                continue
            matched = re.fullmatch(value, job) is not None if op in ("=~", "!~") else value == job
            ok = ok and (matched if op in ("=", "=~") else not matched)
        results.append(ok)
    return results


def operator_down_expr(docs: list[dict[str, Any]]) -> str:
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    return next(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]
                if r.get("alert") == "EmailQueueOperatorDown")


def dashboard_operator_up_exprs(docs: list[dict[str, Any]]) -> list[str]:
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and "emailqueue-overview.json" in d.get("data", {}))
    dashboard = json.loads(configmap["data"]["emailqueue-overview.json"])
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if _UP_SELECTOR.search(t["expr"])]


@pytest.mark.parametrize("release, values", [
    ("x", ["--set", "fullnameOverride=x"]),                       # the reported bug: no chart name in the Service
    ("mail", []),                                                 # <release>-emailqueue-operator
    ("emailqueue-operator", []),                                  # release name alone
    ("prod", ["--set", "fullnameOverride=notifications-scaler"]),
    ("prod", ["--set", "nameOverride=mail-op"]),                  # the one value that changes the job
], ids=["fullnameOverride=x", "release-prefix", "release-is-chart", "fullnameOverride-other", "nameOverride"])
def test_operator_down_rule_matches_the_rendered_scrape_job(release: str, values: list[str]) -> None:
    docs = render(release, *values)
    job = operator_job(docs)
    expr = operator_down_expr(docs)
    matches = up_selectors_match(expr, job)
    assert matches and all(matches), f"EmailQueueOperatorDown ({expr!r}) does not select the operator's job {job!r}"
    # ... and only it: a worker target must not count as a healthy operator.
    assert not any(up_selectors_match(expr, "x-worker")), expr
    panels = dashboard_operator_up_exprs(docs)
    assert panels, "the dashboard lost its operator up query"
    for panel_expr in panels:
        assert all(up_selectors_match(panel_expr, job)), f"dashboard {panel_expr!r} misses job {job!r}"


def test_worker_job_names_its_deployment() -> None:
    """Worker alerts say `kubectl logs deploy/{{ $labels.job }}`: the job must be the Deployment's name."""
    docs = render("prod", "--set", "fullnameOverride=x")
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor"
                   and d["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == "worker")["spec"]
    assert "jobLabel" not in monitor
    service = next(d for d in docs if d["kind"] == "Service"
                   and monitor["selector"]["matchLabels"].items() <= d["metadata"].get("labels", {}).items())
    deployment = next(d for d in docs if d["kind"] == "Deployment"
                      and d["spec"]["selector"]["matchLabels"] == monitor["selector"]["matchLabels"])
    assert service["metadata"]["name"] == deployment["metadata"]["name"] == "x-worker"
