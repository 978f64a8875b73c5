"""The test bed's Prometheus helpers: rule compression, alert timelines, dashboard queries, alert report."""
from __future__ import annotations

import json

import pytest
import yaml

from emailqueue_testbed.alerting import alert_report, first_breach_in_series, first_slo_breach, runbook_section
from emailqueue_testbed.prometheus import (
    DASHBOARD_FILE,
    RULES_FILE,
    AlertSpan,
    alert_timeline,
    compress_rules,
    format_duration,
    panel_queries,
    parse_duration,
    runbook_urls,
)
from emailqueue_testbed.state import REPO

SHIPPED = yaml.safe_load(RULES_FILE.read_text())


def _rule(rules, name):
    return next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == name)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("3m", 180), ("1h30m", 5400), ("500ms", 0.5), ("1d", 86400)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5", "m5", "5 m", "5x"])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_durations_format_to_the_millisecond():
    assert format_duration(12) == "12s"
    assert format_duration(7.5) == "7500ms"
    assert parse_duration(format_duration(0.0004)) == 0.001  # never a zero duration


def test_compression_scales_for_and_windows_and_keeps_the_rest():
    compressed = compress_rules(SHIPPED, 1 / 15, min_range_seconds=4)
    congestion = _rule(compressed, "EmailQueueCongestion")
    assert congestion["for"] == "2s"  # 30s / 15
    smtp = _rule(compressed, "EmailSMTPErrorRatioHigh")
    assert smtp["for"] == "40s" and "[20s]" in smtp["expr"] and "[5m]" not in smtp["expr"]
    dead = _rule(compressed, "EmailDeadLetterGrowing")
    assert "[40s]" in dead["expr"]
    # Thresholds, labels, annotations as shipped.
    for group, shipped_group in zip(compressed["groups"], SHIPPED["groups"], strict=True):
        for rule, shipped in zip(group["rules"], shipped_group["rules"], strict=True):
            assert rule["labels"] == shipped["labels"] and rule["annotations"] == shipped["annotations"]
            assert rule["expr"].replace(" ", "").count(">") == str(shipped["expr"]).replace(" ", "").count(">")


def test_compressed_windows_keep_a_floor_of_scrapes():
    compressed = compress_rules(SHIPPED, 1 / 600, min_range_seconds=4)
    assert "[4s]" in _rule(compressed, "EmailSMTPErrorRatioHigh")["expr"]


def test_compressed_subquery_scales_both_parts():
    rules = {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "max_over_time(x[10m:1m]) > 0", "for": "1m"}]}]}
    assert compress_rules(rules, 0.1, 1)["groups"][0]["rules"][0]["expr"] == "max_over_time(x[60s:6s]) > 0"


def test_compression_factor_is_checked():
    with pytest.raises(ValueError):
        compress_rules(SHIPPED, 0, 1)
    with pytest.raises(ValueError):
        compress_rules(SHIPPED, 2, 1)


def _alerts(alertname, state, times, severity="warning", **labels):
    return {"metric": {"__name__": "ALERTS", "alertname": alertname, "alertstate": state, "severity": severity,
                       **labels},
            "values": [[t, "1"] for t in times]}


def test_timeline_reads_pending_firing_and_resolved():
    series = [_alerts("EmailQueueCongestion", "pending", [100, 101, 102], namespace="ns"),
              _alerts("EmailQueueCongestion", "firing", [103, 104, 105], namespace="ns")]
    (span,) = alert_timeline(series, origin=90, step=1, end=120, runbooks={"EmailQueueCongestion": "u#x"})
    assert (span.pending_at, span.firing_at, span.resolved_at) == (10, 13, 16)
    assert span.labels == {"namespace": "ns"} and span.runbook_url == "u#x" and span.severity == "warning"


def test_timeline_splits_two_activations_and_keeps_one_still_firing():
    series = [_alerts("A", "firing", [10, 11, 12, 30, 31])]
    first, second = alert_timeline(series, origin=0, step=1, end=32)
    assert (first.firing_at, first.resolved_at) == (10, 13)
    assert (second.firing_at, second.resolved_at) == (30, None)


def test_timeline_orders_instances_by_first_activity_and_keeps_them_apart():
    series = [_alerts("B", "pending", [20]), _alerts("A", "pending", [5], name="x"),
              _alerts("A", "pending", [7], name="y")]
    spans = alert_timeline(series, origin=0, step=1, end=30)
    assert [(s.alertname, s.labels.get("name")) for s in spans] == [("A", "x"), ("A", "y"), ("B", None)]


def test_every_shipped_alert_has_a_runbook_section():
    runbook = (REPO / "docs" / "runbook.md").read_text()
    urls = runbook_urls(SHIPPED)
    assert urls and all(runbook_section(url, runbook) == name for name, url in urls.items())
    assert runbook_section("https://x/runbook.md#no-such-alert", runbook) is None


def test_panel_queries_substitute_every_variable():
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    queries = panel_queries(dashboard, {"namespace": "demo", "emailqueue": "emails", "job": "email-worker",
                                        "instance": ".*", "datasource": "prometheus"}, "4s")
    assert len(queries) >= 20
    assert all("$" not in q.expr for q in queries), [q.expr for q in queries if "$" in q.expr]
    assert any('namespace=~"demo"' in q.expr and "[4s]" in q.expr for q in queries)


def test_panel_queries_refuse_a_variable_without_a_value():
    dashboard = {"panels": [{"title": "p", "targets": [{"refId": "A", "expr": "up{x=~\"$missing\"}"}]}]}
    with pytest.raises(ValueError, match="missing"):
        panel_queries(dashboard, {}, "4s")


def test_panel_queries_walk_rows_and_braced_variables():
    dashboard = {"panels": [{"type": "row", "title": "r", "panels": [
        {"title": "inner", "targets": [{"refId": "A", "expr": "rate(x{j=\"${job}\"}[$__rate_interval])"}]}]}]}
    (query,) = panel_queries(dashboard, {"job": "w"}, "8s")
    assert query.expr == 'rate(x{j="w"}[8s])' and query.panel == "inner"


def test_first_slo_breach_is_the_earliest_email_that_waited_too_long():
    published = {"a": 100.0, "b": 101.0, "c": 102.0}
    assert first_slo_breach(published, {"a": 105.0, "b": 120.0, "c": 118.0}, slo=15, end=200) == 116.0
    assert first_slo_breach(published, {"a": 105.0, "b": 110.0, "c": 111.0}, slo=15, end=200) is None
    # Never received by the end of the run: breached once it is older than the SLO.
    assert first_slo_breach(published, {"a": 105.0, "b": 110.0}, slo=15, end=200) == 117.0
    assert first_slo_breach(published, {"a": 105.0, "b": 110.0}, slo=15, end=110) is None


def _span(name, severity, pending, firing, resolved=None):
    return AlertSpan(name, severity, {}, pending, firing, resolved)


def test_alert_report_measures_the_warning_and_finds_false_criticals():
    spans = [_span("EmailQueueCongestion", "warning", 20, 25, 60),
             _span("EmailQueueBacklogOlderThanSLO", "critical", 40, 42, 70),   # during the surge: not false
             _span("EmailQueueOperatorDown", "critical", 5, 8, 12),             # before the surge: false
             _span("EmailQueueOperatorDown", "critical", 150, 155)]             # after the drain: false, still firing
    report = alert_report(spans, surge_start=15, surge_end=60, slo=15, first_breach=37, backlog_end=80,
                          run_end=200, settle_seconds=10)
    assert report["congestion_firing_at"] == 25 and report["warning_seconds"] == 12
    assert report["fired_before_breach"] is True and report["congestion_after_onset_seconds"] == 10
    assert [a["firing_at"] for a in report["false_critical"]] == [8, 155]
    assert report["still_firing_at_end"] == ["EmailQueueOperatorDown"]
    assert report["steady_phases"] == [[0, 15], [90, 200]]


def test_alert_report_when_no_email_breached_and_when_the_alert_came_late():
    spans = [_span("EmailQueueCongestion", "warning", 20, 25, 60)]
    report = alert_report(spans, surge_start=15, surge_end=60, slo=15, first_breach=None, backlog_end=70,
                          run_end=100, settle_seconds=5)
    assert report["warning_seconds"] is None and report["fired_before_breach"] is True
    late = alert_report(spans, surge_start=15, surge_end=60, slo=15, first_breach=22, backlog_end=70,
                        run_end=100, settle_seconds=5)
    assert late["warning_seconds"] == -3 and late["fired_before_breach"] is False
    unfired = alert_report([_span("EmailQueueCongestion", "warning", 20, None, 22)], surge_start=15, surge_end=60,
                           slo=15, first_breach=None, backlog_end=70, run_end=100, settle_seconds=5)
    assert unfired["congestion_pending_at"] == 20 and unfired["congestion_firing_at"] is None
    silent = alert_report([], surge_start=15, surge_end=60, slo=15, first_breach=22, backlog_end=None,
                          run_end=100, settle_seconds=5)
    assert silent["congestion_firing_at"] is None and silent["fired_before_breach"] is None
    assert silent["steady_phases"] == [[0, 15]]


def test_first_breach_in_series_follows_fifo_order():
    # 10/s arrive; the queue holds everything for 5 s, then empties at once: the first email
    # (t=0) waited 5 s, so a 3 s SLO is breached at t=3 and a 6 s SLO never.
    t = [float(i) for i in range(12)]
    rate = [10.0] * 12
    backlog = [10.0 * i if i <= 5 else 0.0 for i in range(12)]
    assert first_breach_in_series(t, rate, backlog, slo=3) == 3.0
    assert first_breach_in_series(t, rate, backlog, slo=6) is None
    # A fleet that keeps up (backlog stays at one second's arrivals) never breaches a 2 s SLO.
    assert first_breach_in_series(t, rate, [10.0] * 12, slo=2) is None
    assert first_breach_in_series([], [], [], slo=1) is None
