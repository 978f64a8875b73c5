"""One poll of one EmailQueue: gather → plan → act.

- ``gather`` reads the spec, the target, the conflicting autoscalers and the broker into
  :class:`reconcile.Facts`. It never raises: every failure, expected or not (a urllib3
  timeout from the kube client, a non-JSON answer, a bug), becomes a typed
  :class:`reconcile.Failure`, which the policy treats as blind (hold, then fallback).
- ``reconcile.plan`` is pure: the decision, status, conditions and events.
- ``act`` patches ``/scale``; the scale enters the remembered policy state only when the
  patch succeeded.

Synchronous (runs in a worker thread); every external system is reached through its
own module (kube, rabbitmq, rabbitmq_prometheus). The caller (handlers) owns the loop,
the schedule, the status write and the event posting.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import conditions, kube
from .metrics import OperatorMetrics
from .rabbitmq import AmqpEndpoint, BrokerAuthError, BrokerError, BrokerPool, ManagementEndpoint, QueueStats, TlsOptions
from .rates import counter_rate_window
from .reconcile import Event, Facts, Failure, Plan, iso, plan
from .scaling import PolicyState
from .spec import EmailQueueSpec, SpecError, parse_spec

log = logging.getLogger("emailqueue_operator.poller")


@dataclass
class PollResult:
    """What one poll produced: the new policy state, a status patch and events to post."""

    state: PolicyState
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    poll_seconds: float = 5.0


class SpecCache:
    """Parsed specs by EmailQueue uid, kept for one `metadata.generation`.

    Parsing validates the spec against the CRD's schema (milliseconds: at 5000 EmailQueues
    polled every 5 s that alone would be several cores), and a spec changes only with its
    generation, which the apiserver bumps on every spec change. One entry per EmailQueue;
    `forget` drops it when its loop ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[int, EmailQueueSpec | Failure]] = {}

    def parse(self, uid: str, generation: int | None, raw: Mapping[str, Any]) -> EmailQueueSpec | Failure:
        if uid and generation is not None:
            with self._lock:
                entry = self._entries.get(uid)
            if entry is not None and entry[0] == generation:
                return entry[1]
        parsed = parse(raw)
        if uid and generation is not None:
            with self._lock:
                self._entries[uid] = (generation, parsed)
        return parsed

    def forget(self, uid: str) -> None:
        with self._lock:
            self._entries.pop(uid, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def parse(raw: Mapping[str, Any]) -> EmailQueueSpec | Failure:
    """The spec, or the failure that makes it unusable (never raises)."""
    try:
        return parse_spec(raw)
    except SpecError as exc:
        return Failure("InvalidSpec", str(exc))
    except Exception as exc:  # a spec the parser did not foresee is still only a bad spec
        return _failure(exc, "InvalidSpec")


@dataclass
class Context:
    """Long-lived collaborators shared by every EmailQueue in the process."""

    pool: BrokerPool
    secrets: kube.SecretCache
    metrics: OperatorMetrics
    targets: kube.TargetReader = field(default_factory=kube.WatchedTargets)
    """Scale targets and HPAs (watched: no request per poll)."""
    specs: SpecCache = field(default_factory=SpecCache)
    clock: Any = time.time
    may_scale: Callable[[], bool] = lambda: True
    """False once this replica may no longer scale (leader election: the Lease is lost)."""


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
        # spec.broker.vhost, when set, wins over the URI's (as KEDA's vhostName does).
        if spec.broker.vhost is not None and spec.broker.vhost != endpoint.vhost:
            endpoint = replace(endpoint, vhost=spec.broker.vhost)
        return endpoint
    host = kube.secret_value(data, namespace, ref.name, ref.host_key or "host")
    port_text = kube.secret_value(data, namespace, ref.name, ref.port_key) if ref.port_key else ""
    try:
        port = int(port_text) if port_text else (5671 if tls.enabled else 5672)
    except ValueError:
        raise kube.SecretError(f"Secret {namespace}/{ref.name} key {ref.port_key!r} is not a port number",
                               "SecretInvalid") from None
    return AmqpEndpoint(host=host.strip(), port=port, vhost=spec.broker.vhost or "/",
                        username=kube.secret_value(data, namespace, ref.name, ref.username_key or "username"),
                        password=kube.secret_value(data, namespace, ref.name, ref.password_key or "password"),
                        tls=tls)


def _http_endpoint(spec: EmailQueueSpec, namespace: str, secrets: kube.SecretCache, ref: Any,
                   default_user: str | None, default_password: str | None) -> tuple[str, Any, Any, TlsOptions]:
    """URL, user, password and TLS of an HTTP endpoint named by a Secret reference."""
    data = secrets.read(namespace, ref.name)
    url = kube.secret_value(data, namespace, ref.name, ref.url_key).strip()
    user = kube.secret_value(data, namespace, ref.name, ref.username_key) if ref.username_key else default_user
    password = kube.secret_value(data, namespace, ref.name, ref.password_key) if ref.password_key else default_password
    https = url.startswith("https")
    tls = TlsOptions(True, None, None, spec.broker.tls.insecure_skip_verify) if https else TlsOptions()
    return url, user, password, tls


def management_endpoint(spec: EmailQueueSpec, namespace: str, secrets: kube.SecretCache,
                        amqp: AmqpEndpoint | None) -> ManagementEndpoint | None:
    ref = spec.broker.management_secret_ref
    if ref is None:
        return None
    # Without their own keys the management API uses the AMQP user.
    return ManagementEndpoint(*_http_endpoint(spec, namespace, secrets, ref, amqp.username if amqp else "guest",
                                              amqp.password if amqp else "guest"))


def prometheus_endpoint(spec: EmailQueueSpec, namespace: str, secrets: kube.SecretCache) -> Any:
    """The Prometheus plugin's endpoint (an open one needs no credentials), or None."""
    from .rabbitmq_prometheus import PrometheusEndpoint

    ref = spec.broker.prometheus_secret_ref
    if ref is None:
        return None
    return PrometheusEndpoint(*_http_endpoint(spec, namespace, secrets, ref, None, None))


def probe(spec: EmailQueueSpec, namespace: str, ctx: Context) -> QueueStats:
    """Queue stats from the spec's metrics source (prometheus, management or AMQP)."""
    amqp = amqp_endpoint(spec, namespace, ctx.secrets)
    broker = spec.broker
    source = broker.source
    if source == "prometheus":
        endpoint = prometheus_endpoint(spec, namespace, ctx.secrets)
        stats: QueueStats = ctx.pool.prometheus(endpoint).queue_stats(
            amqp.vhost, queue=broker.queue, queue_regex=broker.queue_regex, how=broker.aggregate,
            window_seconds=counter_rate_window(spec.behavior.poll_seconds))
        return stats
    if source == "management":
        mgmt = management_endpoint(spec, namespace, ctx.secrets, amqp)
        if mgmt is None:
            raise BrokerError("spec.broker.metricsSource management needs spec.broker.managementSecretRef")
        return ctx.pool.management(mgmt).queue_stats(amqp.vhost, queue=broker.queue, queue_regex=broker.queue_regex,
                                                     how=broker.aggregate)
    if broker.queue_regex:
        raise BrokerError("spec.broker.queueRegex needs an HTTP source (managementSecretRef or prometheusSecretRef)")
    return ctx.pool.amqp(amqp).queue_depth(broker.queue or "")


# --- gather: facts or failures, never an exception ---------------------------------------

def _failure(exc: BaseException, default_reason: str) -> Failure:
    """A failure fit for a condition. Our own errors carry a safe message; anything else
    is reported by type only (its text may hold a URL with credentials)."""
    if isinstance(exc, (BrokerError, kube.SecretError, kube.TargetError)):
        return Failure(getattr(exc, "reason", default_reason), str(exc))
    return Failure(default_reason, f"unexpected {type(exc).__name__} ({type(exc).__module__})")


def claimant(claims: Sequence[tuple[str, str]], name: str) -> str | None:
    """The EmailQueue that owns a target several claim: the oldest (then the first by name)."""
    if len(claims) < 2:
        return None
    owner = min(claims)
    return owner[1] if owner[1] != name else None


def gather(body: Mapping[str, Any], ctx: Context, claims: Sequence[tuple[str, str]] = ()) -> Facts:
    """Read the world for one poll. Never raises."""
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    facts = functools.partial(Facts, generation=meta.get("generation"), annotations=meta.get("annotations") or {},
                              previous_conditions=list((body.get("status") or {}).get("conditions") or []))
    generation = meta.get("generation")
    spec = ctx.specs.parse(str(meta.get("uid") or ""), generation if isinstance(generation, int) else None,
                           body.get("spec") or {})
    if isinstance(spec, Failure):
        return facts(spec=spec)
    ref = spec.scale_target
    try:
        target: Any = ctx.targets.read(namespace, ref.kind, ref.name)
    except Exception as exc:
        return facts(spec=spec, target=_failure(exc, "TargetUnreadable"))
    owner = claimant(claims, name)
    if owner is not None:
        return facts(spec=spec, target=target, claimed_by=owner)
    try:
        hpas = tuple(ctx.targets.conflicting_hpas(namespace, ref.kind, ref.name))
    except Exception as exc:  # unknown HPAs must not stop scaling; the failure is logged
        log.warning("%s/%s: listing HorizontalPodAutoscalers failed: %s", namespace, name, _failure(exc, "").message)
        hpas = ()
    started = time.monotonic()
    try:
        stats: Any = probe(spec, namespace, ctx)
    except Exception as exc:
        stats = _failure(exc, "ProbeFailed")
        if isinstance(exc, BrokerAuthError):
            # A rotated Secret is read again at the next poll, not when its cache expires.
            for secret in (spec.broker.amqp_secret_ref, spec.broker.management_secret_ref,
                           spec.broker.prometheus_secret_ref):
                if secret is not None:
                    ctx.secrets.invalidate(namespace, secret.name)
    ctx.metrics.probe_duration.labels(namespace, name).observe(time.monotonic() - started)
    return facts(spec=spec, target=target, stats=stats, hpas=hpas)


# --- act: patch /scale, keep the scale only if it happened -----------------------------------

def act(namespace: str, name: str, facts: Facts, step: Plan, ctx: Context, now: float) -> PollResult:
    """Carry the plan out and return what to persist and post."""
    events = list(step.events)
    state = step.applied_state
    status = dict(step.status)
    if step.scale_to is not None and isinstance(facts.spec, EmailQueueSpec):
        ref = facts.spec.scale_target
        try:
            if not ctx.may_scale():
                raise kube.TargetError("this operator replica lost the leader Lease before scaling; the new "
                                       "leader decides", "NotLeader")
            # The watch brings the new replica count back (milliseconds, long before the next poll).
            kube.scale_target(namespace, ref.kind, ref.name, step.scale_to)
        except Exception as exc:
            failure = _failure(exc, "ScaleFailed")
            events.append(Event("Warning", failure.reason, failure.message))
            state = step.unapplied_state
        else:
            direction = "up" if step.scale_to > (step.current or 0) else "down"
            ctx.metrics.scale_actions.labels(namespace, name, direction).inc()
            events.append(Event("Normal", step.scale_verb, step.scale_message))
            status["lastScaleTime"] = iso(now)
    elif step.scale_verb == "DryRun":
        events.append(Event("Normal", "DryRun", step.scale_message))
    status["conditions"] = conditions.merge(facts.previous_conditions, step.conditions, iso(now), facts.generation)
    status["observedGeneration"] = facts.generation
    _record_metrics(ctx, namespace, name, facts, step)
    return PollResult(state, status, events, step.poll_seconds)


def _record_metrics(ctx: Context, namespace: str, name: str, facts: Facts, step: Plan) -> None:
    m = ctx.metrics
    for direction in ("up", "down"):  # zeros, not missing series, until the first scale action
        m.scale_actions.labels(namespace, name, direction)
    for cond in step.conditions:
        m.condition.labels(namespace, name, cond.type).set(1 if cond.status else 0)
    for failure in (facts.spec, facts.target, facts.stats):
        if isinstance(failure, Failure):
            m.probe_errors.labels(namespace, name, failure.reason).inc()
    m.broker_connections.set(ctx.pool.open_connections())
    gauges = {"replicas_current": m.replicas_current, "replicas_ready": m.replicas_ready,
              "replicas_desired": m.replicas_desired, "replicas_min": m.replicas_min, "replicas_max": m.replicas_max,
              "slo_seconds": m.slo_seconds, "ack_rate": m.ack_rate, "arrival_rate": m.arrival_rate,
              "rate_per_replica": m.rate_per_replica, "oldest_age": m.oldest_age}
    for key, value in step.metrics.items():
        if key in gauges:
            gauges[key].labels(namespace, name).set(value)
    if "backlog_ready" in step.metrics:
        m.backlog.labels(namespace, name, "ready").set(step.metrics["backlog_ready"])
        m.backlog.labels(namespace, name, "unacked").set(step.metrics["backlog_unacked"])


def poll(body: Mapping[str, Any], state: PolicyState, ctx: Context,
         claims: Sequence[tuple[str, str]] = ()) -> PollResult:
    """One full poll of one EmailQueue: gather → plan → act. Never raises for bad input or
    an unreachable system: it reports them."""
    meta = body.get("metadata") or {}
    now = ctx.clock()
    facts = gather(body, ctx, claims)
    step = plan(facts, state, now)
    return act(meta.get("namespace", ""), meta.get("name", ""), facts, step, ctx, now)
