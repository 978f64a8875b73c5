"""The pure middle of one poll: ``plan(facts, state, now) -> Plan``.

A poll is gather → plan → act (see ``poller``). Gathering turns the world into
:class:`Facts` — values or typed :class:`Failure` s, never exceptions. This module turns
facts into what should happen: the decision (``scaling.decide``), the replica count to
set, the status, the conditions and the events. It does no I/O and reads no clock;
acting patches ``/scale`` and keeps the decision's scale in the policy state only when
the patch succeeded (:attr:`Plan.applied_state` vs :attr:`Plan.unapplied_state`).

Anything that is not a trustworthy measurement reaches ``decide`` as a failed
observation (blind: hold, then fallback; never a scale-down), never as zero.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import conditions
from .conditions import Condition
from .kube import TargetScale
from .rabbitmq import QueueStats
from .scaling import Decision, Observation, PolicyState, decide
from .spec import EmailQueueSpec

PAUSED_REPLICAS_ANNOTATION = "emailqueue.dev/paused-replicas"
INVALID_SPEC_POLL_SECONDS = 30.0
# What each kind of source cannot see (reported in status.signals.missing).
SIGNALS = ("unacked", "consumers", "publishRate", "ackRate", "oldestMessageAge")


@dataclass(frozen=True)
class Failure:
    """A fact that could not be gathered: a condition reason and a message safe to show."""

    reason: str
    message: str


@dataclass(frozen=True)
class Event:
    type: str      # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Facts:
    """One poll's view of the world, gathered without raising."""

    generation: int | None
    annotations: Mapping[str, str]
    previous_conditions: Sequence[Mapping[str, Any]]
    spec: EmailQueueSpec | Failure
    target: TargetScale | Failure | None = None
    stats: QueueStats | Failure | None = None
    hpas: tuple[str, ...] = ()
    claimed_by: str | None = None
    """Another EmailQueue (older) that already scales the same target."""


@dataclass(frozen=True)
class Plan:
    """What one poll decided; ``act`` carries it out."""

    status: dict[str, Any]
    conditions: list[Condition]
    events: list[Event]
    applied_state: PolicyState
    """The state to keep when ``scale_to`` was applied (or nothing needed applying)."""
    unapplied_state: PolicyState
    """The state to keep when the patch failed: no phantom scale event."""
    poll_seconds: float
    scale_to: int | None = None
    """Replicas to patch into /scale, None to leave the target alone."""
    current: int | None = None
    scale_message: str = ""
    scale_verb: str = ""
    decision: Decision | None = None
    observation: Observation | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def paused_replicas(annotations: Mapping[str, str]) -> int | None:
    raw = annotations.get(PAUSED_REPLICAS_ANNOTATION)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def _find(previous: Sequence[Mapping[str, Any]], cond_type: str) -> Mapping[str, Any] | None:
    return next((c for c in previous if isinstance(c, Mapping) and c.get("type") == cond_type), None)


def _warn_once(previous: Sequence[Mapping[str, Any]], reason: str, message: str) -> list[Event]:
    """A Warning event when Ready turns False for this reason, not on every poll it stays so."""
    ready = _find(previous, "Ready")
    if ready and ready.get("reason") == reason and ready.get("message") == message:
        return []
    return [Event("Warning", reason, message)]


def _stopped(facts: Facts, state: PolicyState, reason: str, message: str, poll_seconds: float,
             count_failure: bool) -> Plan:
    """A poll that cannot decide (bad spec, unreadable target, target claimed): Ready False, no scaling."""
    kept = replace(state, consecutive_failures=state.consecutive_failures + 1) if count_failure else state
    status: dict[str, Any] = {"consecutiveFailures": kept.consecutive_failures} if count_failure else {}
    conds = [conditions.ready(False, reason, message)]
    if reason == "TargetClaimed":
        conds.append(Condition("ScalingLimited", True, reason, message))
    return Plan(status=status, conditions=conds, events=_warn_once(facts.previous_conditions, reason, message),
                applied_state=kept, unapplied_state=kept, poll_seconds=poll_seconds)


def observation_of(stats: QueueStats | Failure, target: TargetScale) -> Observation:
    if isinstance(stats, Failure):
        return Observation.failed(stats.message, target.replicas, target.ready_replicas)
    return Observation(ok=True, error=None, ready=stats.ready, unacked=stats.unacked, consumers=stats.consumers,
                       publish_rate=stats.publish_rate, ack_rate=stats.ack_rate,
                       oldest_age_seconds=stats.oldest_age_seconds, current_replicas=target.replicas,
                       ready_replicas=target.ready_replicas)


def missing_signals(stats: QueueStats) -> list[str]:
    values = {"unacked": stats.unacked, "consumers": stats.consumers, "publishRate": stats.publish_rate,
              "ackRate": stats.ack_rate, "oldestMessageAge": stats.oldest_age_seconds}
    return [name for name in SIGNALS if values[name] is None]


def plan(facts: Facts, state: PolicyState, now: float) -> Plan:
    """Decide one poll from its facts. Pure: same facts, state and time, same plan."""
    spec = facts.spec
    if isinstance(spec, Failure):
        return _stopped(facts, state, spec.reason, spec.message, INVALID_SPEC_POLL_SECONDS, count_failure=False)
    poll_seconds = float(spec.behavior.poll_seconds)
    target = facts.target
    if target is None or isinstance(target, Failure):
        failure = target or Failure("TargetUnreadable", "the scale target was not read")
        return _stopped(facts, state, failure.reason, failure.message, poll_seconds, count_failure=True)
    ref = spec.scale_target
    if facts.claimed_by:
        message = (f"EmailQueue {facts.claimed_by} already scales {ref.kind} {ref.name}; not scaling it "
                   "(two autoscalers on one target fight each other: delete one EmailQueue)")
        return _stopped(facts, state, "TargetClaimed", message, poll_seconds, count_failure=False)
    stats = facts.stats if facts.stats is not None else Failure("ProbeFailed", "the broker was not probed")
    obs = observation_of(stats, target)
    decision = decide(spec, obs, state, now)
    desired = _desired(spec, decision, target, facts.annotations)
    hold_reason = _hold_reason(spec, facts.hpas, ref.kind, ref.name)
    scale_to = desired if desired != target.replicas and not hold_reason else None
    conds = _conditions(spec, facts, obs, stats, decision, desired)
    events = _events(spec, facts, state, obs, stats, decision)
    status = _status(spec, stats, decision, desired, target, now)
    verb, message = _scale_words(spec, decision, target.replicas, desired)
    unapplied = replace(decision.state, scale_events=state.scale_events)
    return Plan(status=status, conditions=conds, events=events, applied_state=decision.state,
                unapplied_state=unapplied, poll_seconds=poll_seconds, scale_to=scale_to, current=target.replicas,
                scale_message=message, scale_verb=verb, decision=decision, observation=obs,
                metrics=_metric_values(spec, stats, decision, desired, target))


def _desired(spec: EmailQueueSpec, decision: Decision, target: TargetScale, annotations: Mapping[str, str]) -> int:
    if not spec.paused:
        return decision.replicas
    to = paused_replicas(annotations)
    return to if to is not None else target.replicas


def _hold_reason(spec: EmailQueueSpec, hpas: Sequence[str], kind: str, name: str) -> str:
    """Why the decision is not applied (empty: it is)."""
    if hpas:
        return (f"HorizontalPodAutoscaler {', '.join(hpas)} also scales {kind} {name}; "
                "not scaling it (delete the HPA or this EmailQueue)")
    if spec.dry_run:
        return "dryRun"
    return ""


def _scale_words(spec: EmailQueueSpec, decision: Decision, current: int, desired: int) -> tuple[str, str]:
    if desired == current:
        return "", ""
    if spec.dry_run:
        return "DryRun", f"would scale {current} → {desired}: {decision.reason}"
    if spec.paused:  # only the paused-replicas annotation moves a paused target
        return "Paused", f"{current} → {desired} replicas: paused at {PAUSED_REPLICAS_ANNOTATION}={desired}"
    return ("ScaledUp" if desired > current else "ScaledDown"), f"{current} → {desired} replicas: {decision.reason}"


def _conditions(spec: EmailQueueSpec, facts: Facts, obs: Observation, stats: QueueStats | Failure,
                decision: Decision, desired: int) -> list[Condition]:
    ref = spec.scale_target
    hpa_message = _hold_reason(spec, facts.hpas, ref.kind, ref.name) if facts.hpas else ""
    if isinstance(stats, Failure):
        metrics = Condition("MetricsAvailable", False, stats.reason, stats.message)
        ready = conditions.ready(False, stats.reason, stats.message + "; holding replicas, never scaling down blind")
    else:
        missing = missing_signals(stats)
        detail = f"{stats.source} probe of {', '.join(stats.queues)}"
        if missing:
            detail += f"; not available from this source: {', '.join(missing)}"
        metrics = Condition("MetricsAvailable", True, "ProbeSucceeded", detail)
        ready = conditions.ready(True, "Scaling" if not spec.dry_run else "DryRun", decision.reason)
    if hpa_message:
        ready = conditions.ready(False, "ConflictingAutoscaler", hpa_message)
    limited = bool(set(decision.limits) & {"max", "min", "maxSendRate", "saturated"}) or bool(hpa_message)
    return [
        ready,
        metrics,
        Condition("FallbackActive", decision.fallback_active,
                  "FallbackReplicas" if decision.fallback_active else "MetricsHealthy",
                  decision.reason if decision.fallback_active else "fallback not in use"),
        Condition("DownstreamSaturated", decision.saturated,
                  "AckRatePlateau" if decision.saturated else "NotSaturated",
                  decision.reason if decision.saturated else "more replicas still raise the send rate"),
        Condition("ScalingLimited", limited,
                  "ConflictingAutoscaler" if hpa_message else ("/".join(decision.limits) or "NotLimited"),
                  hpa_message or decision.reason),
        Condition("Paused", spec.paused, "Paused" if spec.paused else "Active",
                  f"paused at {desired} replicas" if spec.paused else "scaling is active"),
    ]


def _events(spec: EmailQueueSpec, facts: Facts, state: PolicyState, obs: Observation, stats: QueueStats | Failure,
            decision: Decision) -> list[Event]:
    previous = facts.previous_conditions
    events: list[Event] = []
    if isinstance(stats, Failure):
        fallback_was = (_find(previous, "FallbackActive") or {}).get("status") == "True"
        if state.consecutive_failures == 0 or (decision.fallback_active and not fallback_was):
            events.append(Event("Warning", stats.reason, obs.error or stats.message))
    if facts.hpas and (_find(previous, "Ready") or {}).get("reason") != "ConflictingAutoscaler":
        ref = spec.scale_target
        events.append(Event("Warning", "ConflictingAutoscaler", _hold_reason(spec, facts.hpas, ref.kind, ref.name)))
    return events


def _status(spec: EmailQueueSpec, stats: QueueStats | Failure, decision: Decision, desired: int,
            target: TargetScale, now: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "currentReplicas": target.replicas, "desiredReplicas": desired,
        "consecutiveFailures": decision.state.consecutive_failures,
        "lastDecision": {"replicas": desired, "reason": decision.reason, "at": iso(now),
                         "terms": {k: round(float(v), 3) for k, v in decision.terms.items() if v is not None},
                         "limits": list(decision.limits)},
        "policy": decision.state.to_status(),
    }
    if not isinstance(stats, Failure):
        total = stats.ready + ((stats.unacked or 0) if spec.target.count_unacked else 0)
        out["backlog"] = {"ready": stats.ready, "unacked": stats.unacked or 0, "total": total}
        out["consumers"] = stats.consumers or 0
        out["signals"] = {"source": stats.source, "missing": missing_signals(stats)}
        if stats.ack_rate is not None:
            out["ackRate"] = round(stats.ack_rate, 3)
    age = _age(decision, stats)
    if age is not None:
        out["oldestMessageAgeSeconds"] = round(age, 3)
    if decision.arrival_rate is not None:
        out["arrivalRate"] = round(float(decision.arrival_rate), 3)
    if decision.rate_per_replica:
        out["ratePerReplica"] = round(float(decision.rate_per_replica), 3)
    return out


def _age(decision: Decision, stats: QueueStats | Failure) -> float | None:
    if decision.oldest_age_seconds is not None:
        return decision.oldest_age_seconds
    return None if isinstance(stats, Failure) else stats.oldest_age_seconds


def _metric_values(spec: EmailQueueSpec, stats: QueueStats | Failure, decision: Decision, desired: int,
                   target: TargetScale) -> dict[str, float]:
    """Gauge values for the metrics edge (absent when not measured)."""
    values: dict[str, float] = {"replicas_current": target.replicas, "replicas_ready": target.ready_replicas,
                                "replicas_desired": desired, "replicas_min": spec.replicas.min,
                                "replicas_max": spec.replicas.max}
    slo = spec.target.max_message_age_seconds or spec.target.drain_seconds
    if slo:
        values["slo_seconds"] = slo
    if not isinstance(stats, Failure):
        values["backlog_ready"] = stats.ready
        values["backlog_unacked"] = stats.unacked or 0
        if stats.ack_rate is not None:
            values["ack_rate"] = stats.ack_rate
    if decision.arrival_rate is not None:
        values["arrival_rate"] = decision.arrival_rate
    if decision.rate_per_replica:
        values["rate_per_replica"] = decision.rate_per_replica
    age = _age(decision, stats)
    if age is not None:
        values["oldest_age"] = age
    return values
