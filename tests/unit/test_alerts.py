"""Alert rules: valid for Prometheus, unit-tested with promtool, and wired to real metrics.

`promtool check rules` and `promtool test rules` run with the test bed's pinned promtool
(built by `make testbed-bins`; skipped with that hint when it is not built yet). The static
checks pin what an on-call engineer relies on: every alert has `for`, a severity, a summary
naming a kubectl command, a description and a runbook link that resolves to a runbook
section; every metric an expression reads is one the operator or worker exports; the
PrometheusRule and the chart ship exactly the rules file.
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
from tests.unit.test_dashboard import PROMETHEUS_SYNTHETIC, exported_series_names, promql_metric_names

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
RULES = MONITORING / "rules" / "emailqueue.rules.yaml"
RULE_TESTS = sorted((MONITORING / "tests").glob("*.yaml"))
RUNBOOK = REPO / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/emailqueue-dev/emailqueue-operator/blob/main/docs/runbook.md#"

REQUIRED_ALERTS = {
    "EmailQueueBacklogOlderThanSLO", "EmailQueueCongestion", "EmailQueueScalerAtMax", "EmailQueueDownstreamSaturated",
    "EmailQueueMetricsUnavailable", "EmailQueueFallbackActive", "EmailDeadLetterGrowing", "EmailSMTPErrorRatioHigh",
    "EmailQueueOperatorDown", "EmailQueueOperatorNoLeader",
}


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _promtool() -> Path:
    try:
        return state.binary("promtool")
    except state.TestbedError as exc:
        pytest.skip(str(exc))


def _github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower-case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_required_alerts_exist_once() -> None:
    names = [rule["alert"] for rule in _alerts()]
    assert len(names) == len(set(names)), "an alert name is defined twice"
    assert set(names) >= REQUIRED_ALERTS


@pytest.mark.parametrize("rule", _alerts(), ids=lambda rule: rule["alert"])
def test_alert_is_actionable(rule: dict[str, Any]) -> None:
    assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), "every alert needs a `for` to ride out blips"
    assert rule["labels"]["severity"] in ("warning", "critical")
    annotations = rule["annotations"]
    assert "kubectl " in annotations["summary"], "the summary names the first command to run"
    assert len(annotations["description"]) > 40
    url = annotations["runbook_url"]
    assert url.startswith(RUNBOOK_URL)
    anchors = {_github_anchor(line.lstrip("#")) for line in RUNBOOK.read_text(encoding="utf-8").splitlines()
               if line.startswith("#")}
    assert url.removeprefix(RUNBOOK_URL) in anchors, f"docs/runbook.md has no section for {url}"


@pytest.mark.parametrize("rule", _rules(), ids=lambda rule: rule.get("alert") or rule.get("record"))
def test_rule_reads_only_exported_metrics(rule: dict[str, Any]) -> None:
    known = exported_series_names() | PROMETHEUS_SYNTHETIC
    used = promql_metric_names(rule["expr"])
    assert used, "the extractor found no metric: the expression or the extractor is broken"
    assert used <= known, f"unknown metrics: {sorted(used - known)}"


def test_each_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - fires == set(), "alerts without a test that fires"
    assert names - quiet == set(), "alerts without a test that stays quiet"


def test_promtool_check_rules() -> None:
    result = subprocess.run([str(_promtool()), "check", "rules", str(RULES)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "deploy/monitoring/tests/*.yaml is empty"
    result = subprocess.run([str(_promtool()), "test", "rules", *map(str, RULE_TESTS)], capture_output=True,
                            text=True, timeout=120, cwd=MONITORING / "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheusrule_carries_the_rules_file() -> None:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text(encoding="utf-8"))
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"], \
        "deploy/monitoring/prometheusrule.yaml is stale: run `python deploy/monitoring/sync.py`"


def test_alert_texts_and_runbook_take_names_from_labels() -> None:
    """Summaries and runbook commands must fit every install (kustomize and any Helm release)."""
    texts = [json.dumps(alert["annotations"]) for alert in _alerts()] + [RUNBOOK.read_text(encoding="utf-8")]
    for text in texts:
        assert "deploy/email-worker" not in text and "-n emailqueue-system" not in text, text[:200]
    # a pod's variables must reach the pod unexpanded: never inside double quotes on the local shell
    assert not re.search(r'exec [^`]*"[^"`]*\$SMTP_', RUNBOOK.read_text(encoding="utf-8"))


# pint (cloudflare/pint) is not served by the module proxy here, so the checks of it that apply
# to these rules run as tests; its alerts/template check (annotations naming labels the
# expression drops) runs on the live rendering in tests/e2e/test_closed_loop.py.
SCRAPE_INTERVAL_SECONDS = 30  # the ServiceMonitors' interval (deploy/monitoring, the chart)
_RANGE = re.compile(r"\[(\d+)([smhd])(?::\d+[smhd])?\]")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: r.get("alert") or r.get("record"))
def test_rate_windows_cover_four_scrapes(rule: dict[str, Any]) -> None:
    """pint promql/rate: a window shorter than two scrapes gives no rate at all; four (Grafana's
    $__rate_interval) survives one missed scrape."""
    for number, unit in _RANGE.findall(str(rule["expr"])):
        assert int(number) * _UNIT[unit] >= 4 * SCRAPE_INTERVAL_SECONDS, (rule.get("alert"), number + unit)


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: r.get("alert") or r.get("record"))
def test_regex_matchers_are_regexes(rule: dict[str, Any]) -> None:
    """pint promql/regexp: `=~"literal"` is an exact match written slowly (and anchored anyway)."""
    for value in re.findall(r'=~\s*"([^"]*)"', str(rule["expr"])):
        assert re.search(r"[.*+?|()\[\]{}^$\\]", value), (rule.get("alert"), value)


@pytest.mark.parametrize("rule", _alerts(), ids=lambda r: r["alert"])
def test_alert_expression_has_a_condition(rule: dict[str, Any]) -> None:
    """pint alerts/comparison: without a comparison (or absent()) an alert fires for every series."""
    expr = re.sub(r"\{[^}]*\}", "", str(rule["expr"]))  # matchers' = and != are not comparisons
    assert re.search(r"(==|!=|>=|<=|>|<|\babsent\()", expr), rule["alert"]


@pytest.mark.parametrize("rule", _alerts(), ids=lambda r: r["alert"])
def test_alert_for_spans_several_evaluations(rule: dict[str, Any]) -> None:
    """pint alerts/for: a `for` of at least one evaluation interval (30 s in kube-prometheus-stack),
    so an alert is pending on one evaluation and fires on a later one: one odd sample never pages."""
    number, unit = re.fullmatch(r"(\d+)([smh])", str(rule["for"])).groups()  # type: ignore[union-attr]
    assert int(number) * _UNIT[unit] >= 30, rule["alert"]
