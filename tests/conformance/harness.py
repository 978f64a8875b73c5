"""Shared pieces of the conformance tables: upstream's fixtures expressed as our inputs.

Each upstream case is re-expressed in EmailQueue terms and run through our own code
(`scaling.decide`, the probes, `parse_spec`); nothing here reimplements the code under test.
Where a translation needs upstream's arithmetic (the HPA's CPU utilization, KEDA's queue
composition), it is written out here once, from upstream's source, and named as such.
"""
from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import requests
import requests.adapters

from emailqueue_operator.scaling import Decision, Observation, PolicyState, decide
from emailqueue_operator.spec import EmailQueueSpec, default_spec

NOW = 1_800_000_000.0

HPA = "kubernetes/kubernetes pkg/controller/podautoscaler/horizontal_test.go"
CALC = "kubernetes/kubernetes pkg/controller/podautoscaler/replica_calculator_test.go"
KEDA = "kedacore/keda pkg/scalers/rabbitmq_scaler_test.go"
KEDA_SRC = "kedacore/keda pkg/scalers/rabbitmq_scaler.go"

# Our `limits` for the HPA's ScalingLimited reasons.
CONDITION_LIMIT = {
    "ScaleUpLimit": "scaleUpPolicy",
    "ScaleDownLimit": "scaleDownPolicy",
    "TooManyReplicas": "max",
    "TooFewReplicas": "min",
    "DesiredWithinRange": None,
}
RATE_LIMITS = {"scaleUpPolicy", "scaleDownPolicy", "max", "min"}


# --------------------------------------------------------------------------- HPA


def rules(pods: int = 0, pods_period: int = 0, percent: int = 0, percent_period: int = 0,
          stabilization: int = 0, select: str = "Max") -> dict[str, Any]:
    """Upstream's generateScalingRules(pods, podsPeriod, percent, percentPeriod, window) as our
    behavior.scaleUp/scaleDown section."""
    policies = []
    if pods:
        policies.append({"type": "Pods", "value": pods, "periodSeconds": pods_period})
    if percent:
        policies.append({"type": "Percent", "value": percent, "periodSeconds": percent_period})
    return {"stabilizationSeconds": stabilization, "selectPolicy": select, "policies": policies}


# Rate limits that never bind and no stabilization: isolates what a row is about.
UNLIMITED_UP = {"stabilizationSeconds": 0, "policies": [{"type": "Pods", "value": 1_000_000, "periodSeconds": 1}]}
UNLIMITED_DOWN = {"stabilizationSeconds": 0, "policies": [{"type": "Percent", "value": 100, "periodSeconds": 1}]}
# The HPA without spec.behavior (KEDA's default): 300 s scale-down stabilization and
# calculateScaleUpLimit; horizontal_test.go's init() sets scaleUpLimitFactor = 8, so its
# cases see max(8 × current, 4): Percent 700 (8×) with Pods 4 is the same for current >= 1.
LEGACY_TEST_UP = {"stabilizationSeconds": 0, "policies": [{"type": "Percent", "value": 700, "periodSeconds": 15},
                                                          {"type": "Pods", "value": 4, "periodSeconds": 15}]}
LEGACY_DOWN = {"stabilizationSeconds": 300, "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]}


def uniform_events(changes: Sequence[int], period: int, sign: int) -> tuple[tuple[float, int], ...]:
    """Upstream's generateEventsUniformDistribution: the events spread over the last `period`
    seconds, each in the middle of its segment (whole seconds, as time.Duration truncates).
    Ours are signed deltas: `sign` +1 for scale-up events, -1 for scale-down events."""
    segment = period / len(changes)
    return tuple((NOW - int(period - segment * (i + 1) + segment / 2), sign * change)
                 for i, change in enumerate(changes))


def hpa_spec(*, min_replicas: int, max_replicas: int, up: Mapping[str, Any] | None = None,
             down: Mapping[str, Any] | None = None, tolerance: float = 0.1, per_replica: float = 1.0,
             up_tolerance: float | None = None, down_tolerance: float | None = None,
             cooldown: int | None = None) -> EmailQueueSpec:
    """One backlog term (KEDA QueueLength: `per_replica` messages each) and the HPA behavior given."""
    behavior: dict[str, Any] = {"tolerance": tolerance}
    if up is not None:
        behavior["scaleUp"] = dict(up)
    if down is not None:
        behavior["scaleDown"] = dict(down)
    if up_tolerance is not None:
        behavior.setdefault("scaleUp", {})["tolerance"] = up_tolerance
    if down_tolerance is not None:
        behavior.setdefault("scaleDown", {})["tolerance"] = down_tolerance
    if cooldown is not None:
        behavior["cooldownSeconds"] = cooldown
    return default_spec(replicas={"min": min_replicas, "max": max_replicas},
                        target={"backlogPerReplica": per_replica}, behavior=behavior)


def seen_before(**fields: Any) -> PolicyState:
    """State of an EmailQueue that has polled before (upstream's `recommendations: []`, a
    non-nil empty history): no first-poll recommendation is recorded."""
    return PolicyState(**{"last_at": NOW - 15, "last_active_at": NOW, **fields})


def observe(backlog: int, current: int, publish: float | None = 0.0, ready_replicas: int | None = None) -> Observation:
    """A management-API poll: `backlog` ready messages, a measured publish rate."""
    return Observation(ok=True, error=None, ready=backlog, unacked=None, consumers=None, publish_rate=publish,
                       ack_rate=None, oldest_age_seconds=None, current_replicas=current,
                       ready_replicas=current if ready_replicas is None else ready_replicas)


def run(spec: EmailQueueSpec, backlog: int, current: int, state: PolicyState | None = None,
        now: float = NOW, publish: float | None = 0.0) -> Decision:
    return decide(spec, observe(backlog, current, publish), seen_before() if state is None else state, now)


def cpu_utilization(levels: Iterable[int], requests_milli: Iterable[int]) -> int:
    """The HPA's GetResourceUtilizationRatio numerator: whole percent, truncated
    (`metricsTotal * 100 / requestsTotal` in int64)."""
    return sum(levels) * 100 // sum(requests_milli)


# --------------------------------------------------------------------------- KEDA


@dataclass(frozen=True)
class KedaQueue:
    """One queue object of an upstream fixture (`messages` is ready + unacked on a broker)."""

    name: str
    messages: int
    unacked: int
    publish: float = 0.0
    deliver_get: float = 0.0
    ready: int | None = None  # `messages_ready` when the fixture gives it

    def as_management(self) -> dict[str, Any]:
        """The same queue as our management probe reads it. Upstream's fixtures sometimes give
        more unacked than messages (`messages: 0, messages_unacknowledged: 1`), which a broker
        never reports (messages = ready + unacked); unacked is clipped so that our ready +
        unacked is the `messages` KEDA reads, and ready is `messages_ready` where given."""
        ready = self.ready if self.ready is not None else self.messages - min(self.unacked, self.messages)
        return {"name": self.name, "state": "running", "messages_ready": ready,
                "messages_unacknowledged": max(0, self.messages - ready),
                "message_stats": {"publish_details": {"rate": self.publish},
                                  "deliver_get_details": {"rate": self.deliver_get}}}


def keda_composed(queues: Sequence[KedaQueue], operation: str) -> tuple[int, int, float, float]:
    """KEDA's getComposedQueue (getSum / getAverage / getMaximum in rabbitmq_scaler.go), written
    out: (messages, messages_ready, publish rate, deliver_get rate) of the composed queue."""
    if not queues:
        return 0, 0, 0.0, 0.0
    messages = [q.messages for q in queues]
    readies = [q.ready if q.ready is not None else 0 for q in queues]  # absent JSON field decodes as 0
    publish = [q.publish for q in queues]
    deliver = [q.deliver_get for q in queues]
    if operation == "sum":
        return sum(messages), sum(readies), sum(publish), sum(deliver)
    if operation == "avg":
        n = len(queues)
        return sum(messages) // n, sum(readies) // n, sum(publish) / n, sum(deliver) / n
    return max(messages), max(readies), max(publish), max(deliver)


class ManagementApi(requests.adapters.BaseAdapter):
    """A management API answering from memory; records the paths and query strings asked."""

    def __init__(self, queues: list[dict[str, Any]] | None = None, status: int = 200, body: str | None = None,
                 error: Exception | None = None) -> None:
        super().__init__()
        self.queues, self.status, self.body, self.error = queues or [], status, body, error
        self.requests: list[tuple[str, dict[str, list[str]]]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        parts = urllib.parse.urlsplit(request.url or "")
        self.requests.append((parts.path, urllib.parse.parse_qs(parts.query)))
        if self.error is not None:
            raise self.error
        resp = requests.Response()
        resp.request, resp.url = request, request.url
        if parts.path.endswith("/api/overview"):
            resp.status_code, content = 200, json.dumps({"disable_stats": False})
        else:
            resp.status_code = self.status
            content = self.body if self.body is not None else json.dumps(self.queues)
        resp._content = content.encode()
        resp.headers["Content-Type"] = "application/json"
        return resp

    def close(self) -> None:
        pass

    @property
    def queue_paths(self) -> list[str]:
        return [path for path, _ in self.requests if "/api/queues" in path]
