"""The Grafana dashboard queries only metrics the operator and the worker really export.

The known names come from the real metric definitions (OperatorMetrics, WorkerMetrics)
registered on a fresh CollectorRegistry, never from a hand-typed list, so renaming a
metric in code breaks this test instead of silently blanking a panel. The PromQL name
extractor here is shared with tests/unit/test_alerts.py.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from email_worker.metrics import WorkerMetrics
from emailqueue_operator.leader import ElectionSettings, Elector
from emailqueue_operator.metrics import OperatorMetrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "monitoring" / "dashboards" / "emailqueue-overview.json"
CHART_DASHBOARD = REPO / "charts" / "emailqueue-operator" / "files" / "emailqueue-overview.json"

# Series Prometheus itself makes (not exported by our code): the scrape health of a target.
PROMETHEUS_SYNTHETIC = frozenset({"up"})

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}

_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                       "group_left", "group_right", "inf", "nan", "atan2"})


def exported_series_names() -> frozenset[str]:
    """Every series name a scrape of the operator or a worker can contain."""
    registry = CollectorRegistry()
    OperatorMetrics(registry)
    WorkerMetrics(registry=registry)
    # The leader gauge lives with the election (replicas run with --leader-elect).
    Elector(ElectionSettings(identity="x", namespace="ns"), store=object(), registry=registry)  # type: ignore[arg-type]
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return frozenset(names)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (Grafana `$variables` allowed).

    Strips what can hold identifiers that are not metrics (strings, label matchers, ranges,
    grouping clauses), then keeps identifiers not called as functions and not keywords.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?!\w)(\s*\()?", text):
        name, called = match.group(1), match.group(2)
        if called or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def test_extractor_finds_metrics_and_skips_functions_labels_and_variables() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(emailworker_send_duration_seconds_bucket'
            '{namespace=~"$namespace", class!="up"}[$__rate_interval]))) / on (namespace, name) '
            'group_left(state) emailqueue_slo_seconds offset 5m > bool 1e3 and absent(up{job=~".*x.*"})')
    assert promql_metric_names(expr) == {"emailworker_send_duration_seconds_bucket", "emailqueue_slo_seconds", "up"}


def _queries(node: Any) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every query in a dashboard: panel targets, annotations, variables."""
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield str(node.get("title") or node.get("name") or node.get("refId") or "?"), node["expr"]
        definition = node.get("definition")
        if isinstance(definition, str) and definition.startswith("label_values("):
            # label_values(<series selector>, <label>): the selector is PromQL
            yield f"variable {node.get('name')}", definition[len("label_values("):].rsplit(",", 1)[0]
        for key, value in node.items():
            if key != "definition":
                yield from _queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item)


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_dashboard_query_uses_exported_metrics() -> None:
    known = exported_series_names() | PROMETHEUS_SYNTHETIC
    queries = list(_queries(load_dashboard()))
    assert len(queries) >= 20, "the dashboard lost its queries"
    unknown = {(where, name) for where, expr in queries for name in promql_metric_names(expr) if name not in known}
    assert not unknown, f"dashboard queries reference metrics nobody exports: {sorted(unknown)}"


def test_dashboard_covers_the_incident_questions() -> None:
    """Backlog and age, arrival vs ack, replicas vs desired, SMTP outcomes, dead letters."""
    used = {name for _, expr in _queries(load_dashboard()) for name in promql_metric_names(expr)}
    for needed in ("emailqueue_backlog_messages", "emailqueue_oldest_message_age_seconds", "emailqueue_slo_seconds",
                   "emailqueue_arrival_rate_per_second", "emailqueue_ack_rate_per_second",
                   "emailqueue_replicas_current", "emailqueue_replicas_desired", "emailqueue_scale_actions_total",
                   "emailworker_emails_sent_total", "emailworker_emails_failed_total",
                   "emailworker_emails_dead_lettered_total"):
        assert needed in used, f"no panel shows {needed}"


def test_scale_actions_are_annotations() -> None:
    annotations = load_dashboard()["annotations"]["list"]
    assert any("emailqueue_scale_actions_total" in a.get("expr", "") for a in annotations)


def test_panels_have_unique_ids_and_use_the_datasource_variable() -> None:
    panels = load_dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.mark.parametrize("path", [CHART_DASHBOARD], ids=["chart"])
def test_chart_ships_the_same_dashboard(path: Path) -> None:
    assert path.read_bytes() == DASHBOARD.read_bytes(), \
        f"{path} differs from {DASHBOARD}: run `python deploy/monitoring/sync.py`"


def test_provisioned_dashboard_is_not_editable() -> None:
    """It ships in a ConfigMap: edits made in Grafana would be lost on the next sync."""
    assert load_dashboard()["editable"] is False


def test_rates_use_the_rate_interval() -> None:
    """A fixed `[5m]` breaks at scrape intervals above 75s and hides detail when zoomed in."""
    fixed = [(where, expr) for where, expr in _queries(load_dashboard())
             if re.search(r"\b(rate|irate|increase)\s*\([^\[]*\[(?!\$__rate_interval\])", expr)]
    assert not fixed, f"rate()/increase() without [$__rate_interval]: {fixed}"


def test_job_and_instance_variables_filter_the_worker_panels() -> None:
    """Mixin convention: `job` and `instance` variables, used by every worker series query."""
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"job", "instance"} <= variables.keys()
    assert "$job" in variables["instance"]["definition"], "instance must follow the selected job"
    worker_queries = [(where, expr) for where, expr in _queries(dashboard["panels"])
                      if "emailworker_" in expr]
    assert worker_queries
    for where, expr in worker_queries:
        for selector in re.findall(r"emailworker_\w+\{([^}]*)\}", expr):
            assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, (where, expr)


def test_operator_up_matches_the_servicemonitor_job_exactly() -> None:
    """The ServiceMonitor's jobLabel makes the operator's job "emailqueue-operator" for every release."""
    up_queries = [expr for _, expr in _queries(load_dashboard()) if re.search(r"\bup\{", expr)]
    assert up_queries
    for expr in up_queries:
        assert 'up{job="emailqueue-operator"' in expr, expr
