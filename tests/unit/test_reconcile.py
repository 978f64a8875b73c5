"""gather → plan → act: the pure plan by tables, gathering that never raises, acting that
remembers only the scales that happened."""
from __future__ import annotations

from typing import Any

import pika.exceptions
import pytest
import urllib3.exceptions
from prometheus_client import CollectorRegistry

from emailqueue_operator import kube, poller
from emailqueue_operator.kube import TargetScale
from emailqueue_operator.metrics import OperatorMetrics
from emailqueue_operator.rabbitmq import BrokerError, MetricsUnavailable, QueueStats
from emailqueue_operator.reconcile import Facts, Failure, plan
from emailqueue_operator.scaling import PolicyState
from emailqueue_operator.spec import EmailQueueSpec, parse_spec

NOW = 1_700_000_000.0
SPEC: dict[str, Any] = {
    "scaleTargetRef": {"name": "worker"},
    "broker": {"queue": "emails", "amqpSecretRef": {"name": "rabbit", "uriKey": "uri"}},
    "replicas": {"min": 1, "max": 20},
    "target": {"backlogPerReplica": 10},
    "fallback": {"afterFailures": 3, "replicas": 6},
    "behavior": {"scaleUp": {"policies": [{"type": "Pods", "value": 20, "periodSeconds": 15}]}},
}


def spec(**overrides: Any):
    return parse_spec({**SPEC, **overrides})


def stats(ready: int = 0, unacked: int | None = 0, consumers: int | None = 2, source: str = "management",
          rate: float | None = 0.0) -> QueueStats:
    return QueueStats(ready=ready, unacked=unacked, consumers=consumers, publish_rate=rate, ack_rate=rate,
                      deliver_rate=rate, oldest_age_seconds=None if rate is None else 0.0, queues=("emails",),
                      source=source)


def target(replicas: int = 2, ready: int | None = None) -> TargetScale:
    return TargetScale("Deployment", "worker", replicas, replicas if ready is None else ready, "app=worker")


def facts(**kw: Any) -> Facts:
    base: dict[str, Any] = {"generation": 1, "annotations": {}, "previous_conditions": [], "spec": spec(),
                            "target": target(), "stats": stats()}
    base.update(kw)
    return Facts(**base)


def cond(step, cond_type):
    return next(c for c in step.conditions if c.type == cond_type)


# --- plan, by table -------------------------------------------------------------------------

@pytest.mark.parametrize("case, kw, scale_to, ready, reason", [
    # measured backlog → scale to ceil(100 / 10)
    ("backlog scales up", {"stats": stats(ready=100)}, 10, True, "Scaling"),
    ("nothing to change", {"stats": stats(ready=15)}, None, True, "Scaling"),
    # the spec is bad: nothing is read or scaled
    ("invalid spec", {"spec": Failure("InvalidSpec", "spec.replicas.min: must be >= 0")}, None, False, "InvalidSpec"),
    # the target cannot be read: no scale (current unknown)
    ("target unreadable", {"target": Failure("TargetUnreadable", "timeout")}, None, False, "TargetUnreadable"),
    ("target missing", {"target": Failure("TargetNotFound", "Deployment t/worker not found")}, None, False,
     "TargetNotFound"),
    # a second EmailQueue on the same target: condition, no scaling
    ("target claimed", {"claimed_by": "older-eq", "stats": stats(ready=100)}, None, False, "TargetClaimed"),
    # an HPA scales the same target: do not fight it
    ("conflicting HPA", {"hpas": ("worker-hpa",), "stats": stats(ready=100)}, None, False, "ConflictingAutoscaler"),
    # blind: hold (never down), Ready False with the probe's reason
    ("probe failed", {"stats": Failure("BrokerUnreachable", "broker h:5672// unreachable"), "target": target(9)},
     None, False, "BrokerUnreachable"),
    ("collector disabled", {"stats": Failure("MetricsUnavailable", "no messages_ready"), "target": target(9)},
     None, False, "MetricsUnavailable"),
    # dry run decides but does not scale
    ("dry run", {"spec": spec(dryRun=True), "stats": stats(ready=100)}, None, True, "DryRun"),
    # paused at the annotation's count
    ("paused with annotation", {"spec": spec(paused=True), "annotations": {"emailqueue.dev/paused-replicas": "4"}},
     4, True, "Scaling"),
    ("paused without annotation", {"spec": spec(paused=True), "stats": stats(ready=100)}, None, True, "Scaling"),
])
def test_plan_table(case, kw, scale_to, ready, reason):
    step = plan(facts(**kw), PolicyState(), NOW)
    assert step.scale_to == scale_to, case
    assert cond(step, "Ready").status is ready, case
    assert cond(step, "Ready").reason == reason, case


def test_blind_never_scales_down_and_fallback_engages_after_the_threshold():
    state = PolicyState()
    blind = facts(stats=Failure("BrokerUnreachable", "down"), target=target(3))
    steps = []
    for i in range(4):
        step = plan(blind, state, NOW + 5 * i)
        steps.append(step)
        state = step.applied_state
    assert [s.scale_to for s in steps] == [None, None, 6, 6]  # act re-applies until the target says 6
    assert [cond(s, "FallbackActive").status for s in steps] == [False, False, True, True]
    assert state.consecutive_failures == 4
    # above the fallback count nothing goes down
    high = plan(facts(stats=Failure("BrokerUnreachable", "down"), target=target(15)), state, NOW + 30)
    assert high.scale_to is None and cond(high, "FallbackActive").status


def test_warning_event_when_blindness_starts_not_on_every_poll():
    blind = facts(stats=Failure("BrokerUnreachable", "down"))
    first = plan(blind, PolicyState(), NOW)
    again = plan(blind, first.applied_state, NOW + 5)
    assert [e.reason for e in first.events] == ["BrokerUnreachable"]
    assert again.events == []


def test_target_unreadable_counts_as_a_failed_poll():
    step = plan(facts(target=Failure("TargetUnreadable", "timeout")), PolicyState(consecutive_failures=2), NOW)
    assert step.applied_state.consecutive_failures == 3
    assert step.status["consecutiveFailures"] == 3


def test_claimed_target_warns_once_and_says_who_owns_it():
    first = plan(facts(claimed_by="older-eq"), PolicyState(), NOW)
    assert "older-eq" in cond(first, "Ready").message and cond(first, "ScalingLimited").status
    previous = [{"type": "Ready", "status": "False", "reason": "TargetClaimed",
                 "message": cond(first, "Ready").message}]
    assert plan(facts(claimed_by="older-eq", previous_conditions=previous), PolicyState(), NOW).events == []


@pytest.mark.parametrize("source, unacked, consumers, rate, missing", [
    ("amqp", None, 2, None, ["unacked", "publishRate", "ackRate", "oldestMessageAge"]),
    ("management", 0, None, None, ["consumers", "publishRate", "ackRate", "oldestMessageAge"]),
    ("management", 0, 2, 0.0, []),
])
def test_status_says_which_signals_the_source_lacks(source, unacked, consumers, rate, missing):
    step = plan(facts(stats=stats(unacked=unacked, consumers=consumers, source=source, rate=rate)), PolicyState(), NOW)
    assert step.status["signals"] == {"source": source, "missing": missing}
    if missing:
        assert "not available from this source" in cond(step, "MetricsAvailable").message


def test_unapplied_state_has_no_phantom_scale_event():
    step = plan(facts(stats=stats(ready=100)), PolicyState(), NOW)
    assert step.scale_to == 10
    assert step.applied_state.scale_events == ((NOW, 8),)
    assert step.unapplied_state.scale_events == ()
    assert step.unapplied_state.recommendations == step.applied_state.recommendations


# --- gather never raises; act keeps only what happened ---------------------------------------

class Secrets:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.invalidated: list[tuple[str, str]] = []

    def invalidate(self, namespace: str, name: str) -> None:
        self.invalidated.append((namespace, name))

    def read(self, namespace: str, name: str) -> dict[str, str]:
        if self.error:
            raise self.error
        return {"uri": "amqp://u:s3cr%2Ft@rabbit:5672/%2F"}


class Targets:
    """The watched targets and HPAs (kube.TargetReader), as given."""

    def __init__(self, replicas: int = 3, error: BaseException | None = None, hpas: list[str] | None = None,
                 hpa_error: BaseException | None = None) -> None:
        self.replicas, self.error = replicas, error
        self.hpas, self.hpa_error = hpas or [], hpa_error

    def read(self, namespace: str, kind: str, name: str) -> TargetScale:
        if self.error:
            raise self.error
        return target(self.replicas)

    def conflicting_hpas(self, namespace: str, kind: str, name: str) -> list[str]:
        if self.hpa_error:
            raise self.hpa_error
        return list(self.hpas)


class Probe:
    def __init__(self, result: QueueStats | BaseException) -> None:
        self.result = result

    def queue_depth(self, queue: str, **_: Any) -> QueueStats:
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    queue_stats = queue_depth


class Pool:
    def __init__(self, result: QueueStats | BaseException) -> None:
        self.probe = Probe(result)

    def amqp(self, endpoint: Any) -> Probe:
        return self.probe

    management = prometheus = amqp

    def open_connections(self) -> int:
        return 1


HEALTHY = stats()  # frozen: one instance serves as the default probe result


def context(result: QueueStats | BaseException = HEALTHY, secrets: Secrets | None = None,
            targets: Targets | None = None) -> poller.Context:
    return poller.Context(pool=Pool(result), secrets=secrets or Secrets(), metrics=OperatorMetrics(CollectorRegistry()),
                          targets=targets or Targets(), clock=lambda: NOW)


def body(**spec_overrides: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "eq", "generation": 1}, "spec": {**SPEC, **spec_overrides}}


ARBITRARY = [
    urllib3.exceptions.ReadTimeoutError(None, "/api", "Read timed out."),
    urllib3.exceptions.MaxRetryError(None, "https://user:pw@api/", None),
    pika.exceptions.StreamLostError("lost"),
    ValueError("Expecting value: line 1 column 1"),
    KeyError("messages_ready"),
    RuntimeError("boom"),
    MetricsUnavailable("no counts"),
    BrokerError("down"),
    kube.SecretError("Secret ns/rabbit not found"),
]


@pytest.mark.parametrize("error", ARBITRARY, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("where", ["probe", "secrets", "target", "hpas"])
def test_gather_turns_any_exception_into_a_failure(where, error, monkeypatch):
    ctx = context(result=error if where == "probe" else stats(),
                  secrets=Secrets(error if where == "secrets" else None),
                  targets=Targets(error=error if where == "target" else None,
                                  hpa_error=error if where == "hpas" else None))
    found = poller.gather(body(), ctx)
    failures = [f for f in (found.spec, found.target, found.stats) if isinstance(f, Failure)]
    if where == "hpas":
        assert failures == []  # unknown HPAs do not stop scaling
    else:
        assert len(failures) == 1
        assert "pw" not in failures[0].message and "s3cr" not in failures[0].message


@pytest.mark.parametrize("error", ARBITRARY, ids=lambda e: type(e).__name__)
def test_any_probe_exception_engages_the_fallback(error, monkeypatch):
    scaled: list[int] = []
    monkeypatch.setattr(kube, "scale_target", lambda ns, kind, name, n: scaled.append(n))
    ctx = context(result=error)
    state = PolicyState()
    for i in range(3):
        ctx.clock = lambda i=i: NOW + 5 * i
        result = poller.poll(body(), state, ctx)
        state = result.state
    assert result.status["consecutiveFailures"] == 3
    assert scaled == [6]  # the fallback count, once the threshold was reached
    fallback = next(c for c in result.status["conditions"] if c["type"] == "FallbackActive")
    assert fallback["status"] == "True"


def test_a_kube_api_timeout_on_the_target_is_a_counted_failure(monkeypatch):
    ctx = context(targets=Targets(error=urllib3.exceptions.ReadTimeoutError(None, "/apis", "timed out")))
    result = poller.poll(body(), PolicyState(), ctx)
    ready = next(c for c in result.status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "TargetUnreadable"
    assert result.state.consecutive_failures == 1


def test_failed_patch_keeps_no_scale_event(monkeypatch):
    def refuse(*_):
        raise kube.TargetError("scaling Deployment ns/worker to 10 failed: HTTP 409 Conflict", "ScaleFailed")
    monkeypatch.setattr(kube, "scale_target", refuse)
    result = poller.poll(body(), PolicyState(), context(result=stats(ready=100)))
    assert result.state.scale_events == ()
    assert [e.reason for e in result.events] == ["ScaleFailed"]
    assert "lastScaleTime" not in result.status


def test_applied_patch_is_remembered_with_an_event(monkeypatch):
    scaled: list[int] = []
    monkeypatch.setattr(kube, "scale_target", lambda ns, kind, name, n: scaled.append(n))
    result = poller.poll(body(), PolicyState(), context(result=stats(ready=100)))
    assert scaled == [10]
    assert result.state.scale_events == ((NOW, 7),)
    assert [e.reason for e in result.events] == ["ScaledUp"]
    assert result.status["lastScaleTime"]


def test_a_replica_that_lost_the_lease_does_not_patch_scale(monkeypatch):
    """Leader election: leadership checked right before the patch; the lost scale is not remembered."""
    scaled: list[int] = []
    monkeypatch.setattr(kube, "scale_target", lambda ns, kind, name, n: scaled.append(n))
    ctx = context(result=stats(ready=100))
    ctx.may_scale = lambda: False
    result = poller.poll(body(), PolicyState(), ctx)
    assert scaled == [] and result.state.scale_events == ()
    assert [e.reason for e in result.events] == ["NotLeader"]


@pytest.mark.parametrize("claims, owner", [
    ([], None),
    ([("2026-01-01T00:00:00Z", "eq")], None),
    ([("2026-01-01T00:00:00Z", "eq"), ("2026-02-01T00:00:00Z", "late")], None),
    ([("2026-03-01T00:00:00Z", "eq"), ("2026-02-01T00:00:00Z", "early")], "early"),
    # same second: the name breaks the tie, the same way for both
    ([("2026-02-01T00:00:00Z", "eq"), ("2026-02-01T00:00:00Z", "a-eq")], "a-eq"),
])
def test_the_oldest_claimant_owns_a_target(claims, owner):
    assert poller.claimant(claims, "eq") == owner


def test_second_emailqueue_on_a_target_does_not_scale(monkeypatch):
    scaled: list[int] = []
    monkeypatch.setattr(kube, "scale_target", lambda ns, kind, name, n: scaled.append(n))
    claims = [("2026-03-01T00:00:00Z", "eq"), ("2026-02-01T00:00:00Z", "first")]
    result = poller.poll(body(), PolicyState(), context(result=stats(ready=100)), claims)
    assert scaled == []
    assert [e.reason for e in result.events] == ["TargetClaimed"]


def test_target_claims_registry_follows_daemons():
    from emailqueue_operator.handlers import TargetClaims, target_key

    claims = TargetClaims()
    key = target_key("ns", {"scaleTargetRef": {"name": "worker"}})
    assert key == ("ns", "Deployment", "worker")
    assert claims.claim(key, "b", "2026-02-01T00:00:00Z") == [("2026-02-01T00:00:00Z", "b")]
    assert claims.claim(key, "a", "2026-01-01T00:00:00Z")[0] == ("2026-01-01T00:00:00Z", "a")
    claims.release(key, "a")  # the owner went away: the other one takes over
    assert claims.claim(key, "b", "2026-02-01T00:00:00Z") == [("2026-02-01T00:00:00Z", "b")]
    claims.release(key, "b")
    claims.release(None, "b")
    assert claims._by_target == {}


def test_a_kube_api_timeout_reading_the_broker_secret_engages_the_fallback(monkeypatch):
    scaled: list[int] = []
    monkeypatch.setattr(kube, "scale_target", lambda ns, kind, name, n: scaled.append(n))
    ctx = context(secrets=Secrets(urllib3.exceptions.ReadTimeoutError(None, "/api/v1/secrets", "Read timed out.")))
    state = PolicyState()
    for i in range(3):
        ctx.clock = lambda i=i: NOW + 5 * i
        result = poller.poll(body(), state, ctx)
        state = result.state
    assert scaled == [6] and result.status["consecutiveFailures"] == 3
    metrics = next(c for c in result.status["conditions"] if c["type"] == "MetricsAvailable")
    assert metrics["status"] == "False" and "ReadTimeoutError" in metrics["message"]


def test_a_refused_password_rereads_the_secret_at_the_next_poll():
    from emailqueue_operator.rabbitmq import BrokerAuthError

    secrets = Secrets()
    poller.gather(body(), context(result=BrokerAuthError("broker rabbit:5672//: authentication failed"),
                                  secrets=secrets))
    assert secrets.invalidated == [("ns", "rabbit")]
    poller.gather(body(), context(result=BrokerError("down"), secrets=(other := Secrets())))
    assert other.invalidated == []  # an outage is no reason to hammer the API for Secrets


def test_a_spec_is_parsed_once_per_generation_and_again_when_it_changes(monkeypatch):
    parsed: list[Any] = []
    real = poller.parse_spec

    def counting(raw):
        parsed.append(raw)
        return real(raw)

    monkeypatch.setattr(poller, "parse_spec", counting)
    ctx = context()
    current = body()
    current["metadata"]["uid"] = "u1"
    for _ in range(5):
        assert isinstance(poller.gather(current, ctx).spec, EmailQueueSpec)
    assert len(parsed) == 1
    changed = body(replicas={"min": 0, "max": 7})
    changed["metadata"].update(uid="u1", generation=2)
    assert poller.gather(changed, ctx).spec.replicas.max == 7
    broken = body(replicas={"min": 5, "max": 1})
    broken["metadata"].update(uid="u1", generation=3)
    for _ in range(3):
        assert isinstance(poller.gather(broken, ctx).spec, Failure)
    assert len(parsed) == 3
    ctx.specs.forget("u1")
    assert len(ctx.specs) == 0
