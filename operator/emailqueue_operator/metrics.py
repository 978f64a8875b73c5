"""The operator's Prometheus metrics (names carry units; labels: namespace, name).

The dashboard and the alert rules use exactly these names; a test scrapes a live
operator and checks every name they reference exists.
"""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

EQ = ("namespace", "name")
CONDITIONS = ("Ready", "MetricsAvailable", "ScalingLimited", "FallbackActive", "DownstreamSaturated", "Paused")


@dataclass
class OperatorMetrics:
    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        self.backlog = Gauge("emailqueue_backlog_messages", "Messages in the queue, by state (ready, unacked)",
                             (*EQ, "state"), registry=r)
        self.arrival_rate = Gauge("emailqueue_arrival_rate_per_second", "Messages published to the queue per second",
                                  EQ, registry=r)
        self.ack_rate = Gauge("emailqueue_ack_rate_per_second", "Messages acknowledged (sent) per second", EQ,
                              registry=r)
        self.oldest_age = Gauge("emailqueue_oldest_message_age_seconds",
                                "Age of the oldest message: measured, or estimated from backlog and throughput",
                                EQ, registry=r)
        self.rate_per_replica = Gauge("emailqueue_rate_per_replica",
                                      "Emails/s one replica sustains (configured or learned)", EQ, registry=r)
        self.replicas_current = Gauge("emailqueue_replicas_current", "Replicas the target has (/scale)", EQ, registry=r)
        self.replicas_ready = Gauge("emailqueue_replicas_ready", "Ready replicas of the target", EQ, registry=r)
        self.replicas_desired = Gauge("emailqueue_replicas_desired", "Replicas the policy decided", EQ, registry=r)
        self.replicas_min = Gauge("emailqueue_replicas_min", "spec.replicas.min", EQ, registry=r)
        self.replicas_max = Gauge("emailqueue_replicas_max", "spec.replicas.max", EQ, registry=r)
        self.slo_seconds = Gauge("emailqueue_slo_seconds",
                                 "The SLO for time in queue (maxMessageAgeSeconds, else drainSeconds)", EQ, registry=r)
        self.scale_actions = Counter("emailqueue_scale_actions_total", "Scale actions taken, by direction",
                                     (*EQ, "direction"), registry=r)
        self.probe_errors = Counter("emailqueue_probe_errors_total", "Failed polls, by reason", (*EQ, "reason"),
                                    registry=r)
        self.probe_duration = Histogram("emailqueue_probe_duration_seconds", "Time to probe the broker", EQ,
                                        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                        registry=r)
        self.poll_lag = Histogram("emailqueue_poll_lag_seconds", "How late a poll started against its schedule",
                                  buckets=(.01, .05, .1, .25, .5, 1, 2, 5, 10, 30), registry=r)
        self.condition = Gauge("emailqueue_condition", "1 when the condition is True", (*EQ, "condition"), registry=r)
        self.broker_connections = Gauge("emailqueue_broker_connections", "Open AMQP connections to brokers",
                                        registry=r)

    def forget(self, namespace: str, name: str) -> None:
        """Drop every series of an EmailQueue when the resource is deleted (a deleted queue's
        last values must not linger on dashboards or keep alerts firing)."""
        for metric in (self.scale_actions, self.probe_errors):
            for family in metric.collect():
                for sample in family.samples:
                    labels = sample.labels
                    if labels.get("namespace") == namespace and labels.get("name") == name:
                        extra = labels.get("direction", labels.get("reason"))
                        try:
                            metric.remove(namespace, name, extra)
                        except KeyError:
                            pass
        per_resource: tuple[Gauge | Histogram, ...] = (
            self.arrival_rate, self.ack_rate, self.oldest_age, self.rate_per_replica, self.replicas_current,
            self.replicas_ready, self.replicas_desired, self.replicas_min, self.replicas_max, self.slo_seconds,
            self.probe_duration)
        for series in per_resource:
            try:
                series.remove(namespace, name)
            except KeyError:
                pass
        for state in ("ready", "unacked"):
            try:
                self.backlog.remove(namespace, name, state)
            except KeyError:
                pass
        for cond in CONDITIONS:
            try:
                self.condition.remove(namespace, name, cond)
            except KeyError:
                pass
