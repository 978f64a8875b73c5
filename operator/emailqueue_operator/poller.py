"""One poll of one EmailQueue: parse → probe → decide → scale → status.

Synchronous (runs in a worker thread); every external system is reached through its
own module (kube, rabbitmq), and the decision comes from the pure `scaling.decide`.
The caller (handlers) owns the loop, the schedule and the event posting.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import conditions, kube
from .metrics import OperatorMetrics
from .rabbitmq import AmqpEndpoint, BrokerError, BrokerPool, ManagementEndpoint, QueueStats, TlsOptions
from .scaling import Decision, Observation, PolicyState, decide
from .spec import EmailQueueSpec, SpecError, parse_spec

PAUSED_REPLICAS_ANNOTATION = "emailqueue.dev/paused-replicas"
log = logging.getLogger("emailqueue_operator.poller")


@dataclass(frozen=True)
class Event:
    type: str      # Normal | Warning
    reason: str
    message: str


@dataclass
class PollResult:
    """What one poll produced: the new policy state, a status patch and events to post."""

    state: PolicyState
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    poll_seconds: float = 5.0


@dataclass
class Context:
    """Long-lived collaborators shared by every EmailQueue in the process."""

    pool: BrokerPool
    secrets: kube.SecretCache
    metrics: OperatorMetrics
    targets: kube.TargetCache = field(default_factory=kube.TargetCache)
    clock: Any = time.time


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- credentials → endpoints ----------------------------------------------------------

def _tls(spec: EmailQueueSpec, data: Mapping[str, str], namespace: str, secret: str) -> TlsOptions:
    tls = spec.broker.tls
    if not tls.enabled:
        return TlsOptions()
    ca = kube.secret_value(data, namespace, secret, tls.ca_key) if tls.ca_key else None
    return TlsOptions(True, ca, tls.server_name, tls.insecure_skip_verify)


def amqp_endpoint(spec: EmailQueueSpec, namespace: str, secrets: kube.SecretCache) -> AmqpEndpoint:
    ref = spec.broker.amqp_secret_ref
    if ref is None:
        raise kube.SecretError("spec.broker.amqpSecretRef is required")
    data = secrets.read(namespace, ref.name)
    tls = _tls(spec, data, namespace, ref.name)
    if ref.uri_key:
        endpoint = AmqpEndpoint.from_uri(kube.secret_value(data, namespace, ref.name, ref.uri_key), tls)
        # spec.broker.vhost wins over the URI's path only when the URI names none.
        if spec.broker.vhost != "/" and endpoint.vhost == "/":
            endpoint = AmqpEndpoint(endpoint.host, endpoint.port, spec.broker.vhost, endpoint.username,
                                    endpoint.password, endpoint.tls)
        return endpoint
    host = kube.secret_value(data, namespace, ref.name, ref.host_key or "host")
    port_text = kube.secret_value(data, namespace, ref.name, ref.port_key) if ref.port_key else ""
    try:
        port = int(port_text) if port_text else (5671 if tls.enabled else 5672)
    except ValueError:
        raise kube.SecretError(f"Secret {namespace}/{ref.name} key {ref.port_key!r} is not a port number",
                               "SecretInvalid") from None
    return AmqpEndpoint(host=host.strip(), port=port, vhost=spec.broker.vhost,
                        username=kube.secret_value(data, namespace, ref.name, ref.username_key or "username"),
                        password=kube.secret_value(data, namespace, ref.name, ref.password_key or "password"),
                        tls=tls)


def management_endpoint(spec: EmailQueueSpec, namespace: str, secrets: kube.SecretCache,
                        amqp: AmqpEndpoint | None) -> ManagementEndpoint | None:
    ref = spec.broker.management_secret_ref
    if ref is None:
        return None
    data = secrets.read(namespace, ref.name)
    url = kube.secret_value(data, namespace, ref.name, ref.url_key)
    # Without their own keys the management API uses the AMQP user.
    user = kube.secret_value(data, namespace, ref.name, ref.username_key) if ref.username_key else (
        amqp.username if amqp else "guest")
    password = kube.secret_value(data, namespace, ref.name, ref.password_key) if ref.password_key else (
        amqp.password if amqp else "guest")
    tls = TlsOptions(True, None, None, spec.broker.tls.insecure_skip_verify) if url.startswith("https") else TlsOptions()
    return ManagementEndpoint(url.strip(), user, password, tls)


def probe(spec: EmailQueueSpec, namespace: str, ctx: Context) -> QueueStats:
    """Queue stats over the management API when configured, else AMQP passive declare."""
    amqp = amqp_endpoint(spec, namespace, ctx.secrets)
    mgmt = management_endpoint(spec, namespace, ctx.secrets, amqp)
    broker = spec.broker
    if mgmt is not None:
        return ctx.pool.management(mgmt).queue_stats(amqp.vhost, queue=broker.queue, queue_regex=broker.queue_regex,
                                                     how=broker.aggregate)
    if broker.queue_regex:
        raise BrokerError("spec.broker.queueRegex needs spec.broker.managementSecretRef (the management API lists queues)")
    return ctx.pool.amqp(amqp).queue_depth(broker.queue or "")


# --- the poll ---------------------------------------------------------------------------

def _target_paused_replicas(annotations: Mapping[str, str]) -> int | None:
    raw = annotations.get(PAUSED_REPLICAS_ANNOTATION)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def poll(body: Mapping[str, Any], state: PolicyState, ctx: Context) -> PollResult:
    """One full poll of one EmailQueue. Never raises for bad input: it reports it."""
    meta = body.get("metadata", {})
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    generation = meta.get("generation")
    previous = (body.get("status") or {}).get("conditions")
    now = ctx.clock()
    m = ctx.metrics

    def report(conds: list[conditions.Condition], extra: Mapping[str, Any], events: list[Event],
               new_state: PolicyState, poll_seconds: float) -> PollResult:
        for cond in conds:
            m.condition.labels(namespace, name, cond.type).set(1 if cond.status else 0)
        status = {"observedGeneration": generation, "conditions": conditions.merge(previous, conds, _iso(now), generation),
                  **extra}
        return PollResult(new_state, status, events, poll_seconds)

    # 1. the spec (the schema caught most problems; this catches the rest)
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError as exc:
        m.probe_errors.labels(namespace, name, "InvalidSpec").inc()
        return report([conditions.ready(False, "InvalidSpec", str(exc))], {}, _warn_once(previous, "InvalidSpec", str(exc)),
                      state, 30.0)
    poll_seconds = float(spec.behavior.poll_seconds)
    m.replicas_min.labels(namespace, name).set(spec.replicas.min)
    m.replicas_max.labels(namespace, name).set(spec.replicas.max)
    slo = spec.target.max_message_age_seconds or spec.target.drain_seconds
    if slo:
        m.slo_seconds.labels(namespace, name).set(slo)

    # 2. the target
    ref = spec.scale_target
    try:
        target = ctx.targets.read(namespace, ref.kind, ref.name)
    except kube.TargetError as exc:
        m.probe_errors.labels(namespace, name, exc.reason).inc()
        return report([conditions.ready(False, exc.reason, str(exc))], {}, _warn_once(previous, exc.reason, str(exc)),
                      state, poll_seconds)
    m.replicas_current.labels(namespace, name).set(target.replicas)
    m.replicas_ready.labels(namespace, name).set(target.ready_replicas)

    # 3. the broker
    started = time.monotonic()
    failure: tuple[str, str] | None = None
    stats: QueueStats | None = None
    try:
        stats = probe(spec, namespace, ctx)
    except (BrokerError, kube.SecretError) as exc:
        failure = (getattr(exc, "reason", "BrokerError"), str(exc))
        m.probe_errors.labels(namespace, name, failure[0]).inc()
    m.probe_duration.labels(namespace, name).observe(time.monotonic() - started)
    m.broker_connections.set(ctx.pool.open_connections())
    if stats is not None:
        obs = Observation(ok=True, error=None, ready=stats.ready, unacked=stats.unacked, consumers=stats.consumers,
                          publish_rate=stats.publish_rate, ack_rate=stats.ack_rate,
                          oldest_age_seconds=stats.oldest_age_seconds, current_replicas=target.replicas,
                          ready_replicas=target.ready_replicas)
    else:
        obs = Observation.failed(failure[1] if failure else "probe failed", target.replicas, target.ready_replicas)

    # 4. the decision (pure)
    decision = decide(spec, obs, state, now)
    desired = decision.replicas
    events: list[Event] = []
    paused_to = _target_paused_replicas(meta.get("annotations") or {}) if spec.paused else None
    if spec.paused:
        desired = paused_to if paused_to is not None else target.replicas

    # 5. conflicting autoscaler: refuse to fight it
    hpas = kube.conflicting_hpas(namespace, ref.kind, ref.name)
    hpa_message = (f"HorizontalPodAutoscaler {', '.join(hpas)} also scales {ref.kind} {ref.name}; "
                   "not scaling it (delete the HPA or this EmailQueue)") if hpas else ""

    # 6. act
    scaled = False
    if desired != target.replicas and not spec.dry_run and not hpas:
        try:
            kube.scale_target(namespace, ref.kind, ref.name, desired)
            ctx.targets.forget(namespace, ref.kind)
            scaled = True
        except kube.TargetError as exc:
            events.append(Event("Warning", exc.reason, str(exc)))
    if desired != target.replicas:
        direction = "up" if desired > target.replicas else "down"
        if scaled:
            m.scale_actions.labels(namespace, name, direction).inc()
            verb = "Paused" if spec.paused else ("ScaledUp" if direction == "up" else "ScaledDown")
            events.append(Event("Normal", verb, f"{target.replicas} → {desired} replicas: {decision.reason}"))
        elif spec.dry_run:
            events.append(Event("Normal", "DryRun", f"would scale {target.replicas} → {desired}: {decision.reason}"))
    m.replicas_desired.labels(namespace, name).set(desired)

    # 7. metrics and status
    if stats is not None:
        m.backlog.labels(namespace, name, "ready").set(stats.ready)
        m.backlog.labels(namespace, name, "unacked").set(stats.unacked or 0)
    arrival = decision.arrival_rate
    if arrival is not None:
        m.arrival_rate.labels(namespace, name).set(arrival)
    if stats is not None and stats.ack_rate is not None:
        m.ack_rate.labels(namespace, name).set(stats.ack_rate)
    mu = decision.rate_per_replica
    if mu:
        m.rate_per_replica.labels(namespace, name).set(mu)
    age = decision.oldest_age_seconds if decision.oldest_age_seconds is not None else (
        stats.oldest_age_seconds if stats else None)
    if age is not None:
        m.oldest_age.labels(namespace, name).set(age)

    conds = [
        conditions.Condition("MetricsAvailable", obs.ok, "ProbeSucceeded" if obs.ok else (failure[0] if failure else "ProbeFailed"),
                             f"{stats.source} probe of {', '.join(stats.queues)}" if stats else (failure[1] if failure else "")),
        conditions.Condition("FallbackActive", decision.fallback_active,
                             "FallbackReplicas" if decision.fallback_active else "MetricsHealthy",
                             decision.reason if decision.fallback_active else "fallback not in use"),
        conditions.Condition("DownstreamSaturated", decision.saturated,
                             "AckRatePlateau" if decision.saturated else "NotSaturated",
                             decision.reason if decision.saturated else "more replicas still raise the send rate"),
        conditions.Condition("ScalingLimited", bool(set(decision.limits) & {"max", "min", "maxSendRate", "saturated"}) or bool(hpas),
                             "ConflictingAutoscaler" if hpas else ("/".join(decision.limits) or "NotLimited"),
                             hpa_message or decision.reason),
        conditions.Condition("Paused", spec.paused, "Paused" if spec.paused else "Active",
                             (f"paused at {desired} replicas" if spec.paused else "scaling is active")),
    ]
    if hpas:
        ready_cond = conditions.ready(False, "ConflictingAutoscaler", hpa_message)
    elif not obs.ok:
        ready_cond = conditions.ready(False, failure[0] if failure else "ProbeFailed",
                                      (failure[1] if failure else "probe failed") + "; holding replicas, never scaling down blind")
    else:
        ready_cond = conditions.ready(True, "Scaling" if not spec.dry_run else "DryRun", decision.reason)
    conds.insert(0, ready_cond)
    if not obs.ok and (state.consecutive_failures == 0 or decision.fallback_active and not _was_true(previous, "FallbackActive")):
        events.append(Event("Warning", failure[0] if failure else "ProbeFailed", obs.error or "probe failed"))
    if hpas and not _reason_was(previous, "Ready", "ConflictingAutoscaler"):
        events.append(Event("Warning", "ConflictingAutoscaler", hpa_message))

    extra: dict[str, Any] = {
        "currentReplicas": target.replicas, "desiredReplicas": desired,
        "consecutiveFailures": decision.state.consecutive_failures,
        "lastDecision": {"replicas": desired, "reason": decision.reason, "at": _iso(now),
                         "terms": {k: round(float(v), 3) for k, v in decision.terms.items() if v is not None},
                         "limits": list(decision.limits)},
        "policy": decision.state.to_status(),
    }
    if stats is not None:
        total = stats.ready + ((stats.unacked or 0) if spec.target.count_unacked else 0)
        extra["backlog"] = {"ready": stats.ready, "unacked": stats.unacked or 0, "total": total}
        extra["consumers"] = stats.consumers or 0
        if stats.ack_rate is not None:
            extra["ackRate"] = round(stats.ack_rate, 3)
        if age is not None:
            extra["oldestMessageAgeSeconds"] = round(age, 3)
    if arrival is not None:
        extra["arrivalRate"] = round(float(arrival), 3)
    if mu:
        extra["ratePerReplica"] = round(float(mu), 3)
    if scaled:
        extra["lastScaleTime"] = _iso(now)
    return report(conds, extra, events, decision.state, poll_seconds)


def _warn_once(previous: Any, reason: str, message: str) -> list[Event]:
    """A Warning event when Ready turns False for this reason, not on every poll it stays so."""
    for cond in previous or []:
        if cond.get("type") == "Ready" and cond.get("reason") == reason and cond.get("message") == message:
            return []
    return [Event("Warning", reason, message)]


def _was_true(previous: Any, cond_type: str) -> bool:
    return any(c.get("type") == cond_type and c.get("status") == "True" for c in previous or [])


def _reason_was(previous: Any, cond_type: str, reason: str) -> bool:
    return any(c.get("type") == cond_type and c.get("reason") == reason for c in previous or [])
