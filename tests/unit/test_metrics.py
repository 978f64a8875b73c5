"""The operator's metrics: a deleted EmailQueue leaves no series behind."""
from __future__ import annotations

from prometheus_client import CollectorRegistry

from emailqueue_operator.metrics import OperatorMetrics


def test_forget_drops_every_series_of_the_emailqueue_and_only_those():
    registry = CollectorRegistry()
    m = OperatorMetrics(registry)
    for name in ("gone", "kept"):
        m.replicas_desired.labels("ns", name).set(3)
        m.backlog.labels("ns", name, "ready").set(10)
        m.backlog.labels("ns", name, "unacked").set(1)
        m.condition.labels("ns", name, "Ready").set(1)
        m.scale_actions.labels("ns", name, "up").inc()
        m.scale_actions.labels("ns", name, "down").inc()
        m.probe_errors.labels("ns", name, "BrokerUnreachable").inc()
        m.probe_errors.labels("ns", name, "MetricsUnavailable").inc()
        m.probe_duration.labels("ns", name).observe(0.01)
    m.forget("ns", "gone")
    left = {(s.name, s.labels.get("name")) for family in registry.collect() for s in family.samples
            if s.labels.get("name") is not None}
    assert {who for _, who in left} == {"kept"}
    assert registry.get_sample_value("emailqueue_scale_actions_total", {"namespace": "ns", "name": "kept",
                                                                         "direction": "up"}) == 1
