"""Typed, frozen view of an ``EmailQueue.spec``.

This module owns the translation from the loosely typed mapping kopf hands us (or a
simulator scenario's sparse dict) into frozen dataclasses the scaling policy can trust.

- Defaults here are the CRD schema's defaults (``deploy/crds/emailqueue.dev_emailqueues.yaml``);
  ``tests/unit/test_crd.py`` checks the two agree. Objects stored before a default existed,
  and simulator scenarios, arrive without them, so parsing applies them again.
- :func:`parse_spec` collects *every* problem before raising one :class:`SpecError`
  (like KEDA's scaler metadata parsing), so a user fixes a manifest in one round trip.
- It also checks what an OpenAPI/CEL schema cannot: regular expressions compile, cron
  expressions parse, schedule times are real instants.

Pure: values in, values out (croniter is a parser, not a clock).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final

from croniter import croniter

__all__ = [
    "AGGREGATES",
    "METRICS_SOURCES",
    "AmqpSecretRef",
    "BehaviorSpec",
    "BrokerSpec",
    "DEFAULT_BACKLOG_PER_REPLICA",
    "DEFAULT_SCALE_DOWN_POLICIES",
    "DEFAULT_SCALE_UP_POLICIES",
    "EmailQueueSpec",
    "FALLBACK_MODES",
    "FallbackSpec",
    "ManagementSecretRef",
    "POLICY_TYPES",
    "ReplicaBounds",
    "SELECT_POLICIES",
    "ScaleTargetRef",
    "ScalingPolicy",
    "ScalingRules",
    "ScheduleEntry",
    "SpecError",
    "TARGET_KINDS",
    "TargetSpec",
    "TlsSpec",
    "default_spec",
    "parse_spec",
    "spec_from_dict",
]

TARGET_KINDS: Final = ("Deployment", "StatefulSet")
AGGREGATES: Final = ("sum", "max", "avg")
METRICS_SOURCES: Final = ("auto", "amqp", "management", "prometheus")
SELECT_POLICIES: Final = ("Max", "Min", "Disabled")
POLICY_TYPES: Final = ("Pods", "Percent")
FALLBACK_MODES: Final = ("static", "currentIfHigher")

# KEDA's RabbitMQ QueueLength default target. Applied only when no other target
# (drain/age SLO, message rate) is configured: with an SLO set, a fixed 20-per-pod
# backlog term would dominate every decision and defeat the SLO.
DEFAULT_BACKLOG_PER_REPLICA: Final = 20.0
MAX_REPLICAS_LIMIT: Final = 10_000
# The HPA sets no upper bound on behavior.scaleUp/scaleDown.tolerance; 100 (demand a hundred
# times the fleet before scaling up) is past any useful value and keeps the number sane.
MAX_DIRECTION_TOLERANCE: Final = 100.0


class SpecError(ValueError):
    """The spec is invalid; ``problems`` lists every problem found, each prefixed by its path."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class ScaleTargetRef:
    """The workload whose ``/scale`` subresource the operator drives."""

    api_version: str = "apps/v1"
    kind: str = "Deployment"
    name: str = ""


@dataclass(frozen=True)
class AmqpSecretRef:
    """Keys of a Secret (in the EmailQueue's namespace) holding AMQP connection details.

    Either ``uri_key`` (a full amqp(s):// URI) or ``host_key`` with ``username_key`` and
    ``password_key``; separate username/password keys are never URL-decoded, so special
    characters need no escaping. With ``uri_key``, username/password keys override the
    URI's user info.
    """

    name: str
    uri_key: str | None = None
    host_key: str | None = None
    port_key: str | None = None
    username_key: str | None = None
    password_key: str | None = None


@dataclass(frozen=True)
class ManagementSecretRef:
    """Keys of a Secret holding the RabbitMQ management HTTP API URL and credentials."""

    name: str
    url_key: str
    username_key: str | None = None
    password_key: str | None = None


@dataclass(frozen=True)
class TlsSpec:
    """TLS options for the AMQP connection. ``ca_key`` is a key in the AMQP Secret."""

    enabled: bool = False
    ca_key: str | None = None
    server_name: str | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True)
class BrokerSpec:
    """Which queue(s) to watch and how to reach the broker.

    Exactly one of ``queue`` / ``queue_regex``. ``amqp_secret_ref`` is required on real
    objects; it is None only in policy-only specs (simulator, tests).
    """

    queue: str | None = None
    queue_regex: str | None = None
    aggregate: str = "sum"
    vhost: str | None = None
    """Wins over the AMQP URI's vhost when set (KEDA's ``vhostName``); None: the URI's, else ``/``."""
    amqp_secret_ref: AmqpSecretRef | None = None
    management_secret_ref: ManagementSecretRef | None = None
    prometheus_secret_ref: ManagementSecretRef | None = None
    """RabbitMQ's Prometheus plugin (same Secret shape as the management API's)."""
    metrics_source: str = "auto"
    tls: TlsSpec = field(default_factory=TlsSpec)

    @property
    def source(self) -> str:
        """The metrics source in effect: ``auto`` resolved to prometheus, management or amqp."""
        if self.metrics_source != "auto":
            return self.metrics_source
        if self.prometheus_secret_ref is not None:
            return "prometheus"
        if self.management_secret_ref is not None:
            return "management"
        return "amqp"


@dataclass(frozen=True)
class ReplicaBounds:
    """Replica bounds. ``min`` 0 enables scale to zero; ``activation_backlog`` gates 0→1."""

    min: int = 1
    max: int = 10
    activation_backlog: int = 0


@dataclass(frozen=True)
class TargetSpec:
    """What the fleet is sized for. None means "not configured"."""

    backlog_per_replica: float | None = DEFAULT_BACKLOG_PER_REPLICA
    message_rate_per_replica: float | None = None
    drain_seconds: float | None = None
    max_message_age_seconds: float | None = None
    rate_per_replica: float | None = None
    rate_per_replica_floor: float = 0.1
    max_send_rate: float | None = None
    count_unacked: bool = True
    startup_seconds: float = 30.0


@dataclass(frozen=True)
class ScalingPolicy:
    """One HPA rate policy: at most ``value`` Pods (or Percent) change per ``period_seconds``."""

    type: str
    value: int
    period_seconds: int


@dataclass(frozen=True)
class ScalingRules:
    """HPA ``HPAScalingRules`` for one direction."""

    stabilization_seconds: int
    select_policy: str
    policies: tuple[ScalingPolicy, ...]
    tolerance: float | None = None
    """HPA ``behavior.scaleUp/scaleDown.tolerance`` (Kubernetes 1.33+); None: ``behavior.tolerance``."""


DEFAULT_SCALE_UP_POLICIES: Final = (ScalingPolicy("Percent", 100, 15), ScalingPolicy("Pods", 4, 15))
DEFAULT_SCALE_DOWN_POLICIES: Final = (ScalingPolicy("Percent", 100, 15),)


def _default_scale_up() -> ScalingRules:
    return ScalingRules(0, "Max", DEFAULT_SCALE_UP_POLICIES)


def _default_scale_down() -> ScalingRules:
    return ScalingRules(300, "Max", DEFAULT_SCALE_DOWN_POLICIES)


@dataclass(frozen=True)
class BehaviorSpec:
    """Poll interval, HPA tolerance, N→0 cooldown and per-direction scaling rules."""

    poll_seconds: int = 5
    tolerance: float = 0.1
    """Default of both directions' tolerance (the HPA's ``--horizontal-pod-autoscaler-tolerance``)."""
    cooldown_seconds: int = 300
    scale_up: ScalingRules = field(default_factory=_default_scale_up)
    scale_down: ScalingRules = field(default_factory=_default_scale_down)

    @property
    def scale_up_tolerance(self) -> float:
        """Demand up to ``(1 + this) × current`` keeps the current count."""
        return self.tolerance if self.scale_up.tolerance is None else self.scale_up.tolerance

    @property
    def scale_down_tolerance(self) -> float:
        """Demand down to ``(1 − this) × current`` keeps the current count."""
        return self.tolerance if self.scale_down.tolerance is None else self.scale_down.tolerance


@dataclass(frozen=True)
class FallbackSpec:
    """Replicas to run while metrics are unavailable for ``after_failures`` polls in a row."""

    replicas: int
    after_failures: int = 3
    mode: str = "static"


@functools.lru_cache(maxsize=4096)
def _cron_prev_fire(cron: str, minute_epoch: int) -> float:
    """Latest fire time <= ``minute_epoch`` (UTC). Cron resolution is one minute, so the
    answer depends only on the minute: caching by minute keeps per-second callers cheap."""
    start = datetime.fromtimestamp(minute_epoch + 1, tz=timezone.utc)
    fire: float = croniter(cron, start).get_prev(float)
    return fire


@dataclass(frozen=True)
class ScheduleEntry:
    """An announced campaign: ``rate`` emails/s expected in a window.

    Either a fixed window (``start``/``end``, epoch seconds) or a recurring one
    (``cron``, 5 fields, UTC, plus ``duration_seconds``).
    """

    name: str
    rate: float
    start: float | None = None
    end: float | None = None
    cron: str | None = None
    duration_seconds: float | None = None

    def active_rate(self, now_epoch: float, lookahead_s: float) -> float:
        """The rate this entry expects at ``now_epoch + lookahead_s`` (0 outside its window)."""
        at = now_epoch + lookahead_s
        if self.start is not None and self.end is not None:
            return self.rate if self.start <= at < self.end else 0.0
        if self.cron is not None and self.duration_seconds is not None:
            minute = int(math.floor(at / 60.0)) * 60
            fired = _cron_prev_fire(self.cron, minute)
            return self.rate if fired <= at < fired + self.duration_seconds else 0.0
        return 0.0


@dataclass(frozen=True)
class EmailQueueSpec:
    """The whole ``EmailQueue.spec``, defaults applied."""

    scale_target: ScaleTargetRef = field(default_factory=ScaleTargetRef)
    broker: BrokerSpec = field(default_factory=BrokerSpec)
    replicas: ReplicaBounds = field(default_factory=ReplicaBounds)
    target: TargetSpec = field(default_factory=TargetSpec)
    behavior: BehaviorSpec = field(default_factory=BehaviorSpec)
    fallback: FallbackSpec | None = None
    schedule: tuple[ScheduleEntry, ...] = ()
    paused: bool = False
    dry_run: bool = False

    def scheduled_rate(self, now_epoch: float, lookahead_s: float) -> float:
        """Sum of the announced rates expected at ``now_epoch + lookahead_s``."""
        return sum(entry.active_rate(now_epoch, lookahead_s) for entry in self.schedule)


# --------------------------------------------------------------------------- parsing

_MISSING: Final = object()


class _Reader:
    """Reads typed fields and records problems instead of raising on the first one."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def section(self, parent: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
        value = parent.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problem(f"{path}.{key}", f"must be an object, got {type(value).__name__}")
            return {}
        return value

    def _bounded(
        self,
        path: str,
        value: float,
        minimum: float | None,
        maximum: float | None,
        exclusive_minimum: bool,
    ) -> bool:
        if minimum is not None:
            if exclusive_minimum and not value > minimum:
                self.problem(path, f"must be > {minimum:g}, got {value:g}")
                return False
            if not exclusive_minimum and value < minimum:
                self.problem(path, f"must be >= {minimum:g}, got {value:g}")
                return False
        if maximum is not None and value > maximum:
            self.problem(path, f"must be <= {maximum:g}, got {value:g}")
            return False
        return True

    def integer(
        self,
        mapping: Mapping[str, Any],
        key: str,
        path: str,
        default: Any = _MISSING,
        minimum: int | None = None,
        maximum: int | None = None,
        exclusive_minimum: bool = False,
    ) -> Any:
        raw = mapping.get(key)
        full = f"{path}.{key}"
        if raw is None:
            if default is _MISSING:
                self.problem(full, "is required")
                return None
            return default
        # bool is an int in Python; a YAML `true` is never a replica count.
        if isinstance(raw, bool) or not (
            isinstance(raw, int) or (isinstance(raw, float) and raw.is_integer())
        ):
            self.problem(full, f"must be an integer, got {raw!r}")
            return None if default is _MISSING else default
        value = int(raw)
        if not self._bounded(full, value, minimum, maximum, exclusive_minimum):
            return None if default is _MISSING else default
        return value

    def number(
        self,
        mapping: Mapping[str, Any],
        key: str,
        path: str,
        default: Any = _MISSING,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_minimum: bool = False,
    ) -> Any:
        raw = mapping.get(key)
        full = f"{path}.{key}"
        if raw is None:
            if default is _MISSING:
                self.problem(full, "is required")
                return None
            return default
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            self.problem(full, f"must be a finite number, got {raw!r}")
            return None if default is _MISSING else default
        value = float(raw)
        if not self._bounded(full, value, minimum, maximum, exclusive_minimum):
            return None if default is _MISSING else default
        return value

    def boolean(self, mapping: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        raw = mapping.get(key)
        if raw is None:
            return default
        if not isinstance(raw, bool):
            self.problem(f"{path}.{key}", f"must be true or false, got {raw!r}")
            return default
        return raw

    def string(
        self,
        mapping: Mapping[str, Any],
        key: str,
        path: str,
        default: Any = _MISSING,
        max_length: int = 253,
    ) -> Any:
        raw = mapping.get(key)
        full = f"{path}.{key}"
        if raw is None:
            if default is _MISSING:
                self.problem(full, "is required")
            return None if default is _MISSING else default
        if not isinstance(raw, str):
            self.problem(full, f"must be a string, got {raw!r}")
            return None if default is _MISSING else default
        if raw == "":
            self.problem(full, "must not be empty")
            return None if default is _MISSING else default
        if len(raw) > max_length:
            self.problem(full, f"must be at most {max_length} characters")
            return None if default is _MISSING else default
        return raw

    def enum(
        self, mapping: Mapping[str, Any], key: str, path: str, allowed: Sequence[str], default: str
    ) -> str:
        raw = mapping.get(key)
        if raw is None:
            return default
        if raw not in allowed:
            self.problem(f"{path}.{key}", f"must be one of {', '.join(allowed)}, got {raw!r}")
            return default
        return str(raw)

    def timestamp(self, mapping: Mapping[str, Any], key: str, path: str) -> float | None:
        raw = mapping.get(key)
        if raw is None:
            return None
        full = f"{path}.{key}"
        if isinstance(raw, datetime):  # PyYAML turns unquoted timestamps into datetimes
            moment = raw
        elif isinstance(raw, str):
            try:
                moment = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                self.problem(full, f"must be an RFC 3339 date-time, got {raw!r}")
                return None
        else:
            self.problem(full, f"must be an RFC 3339 date-time, got {raw!r}")
            return None
        if moment.tzinfo is None:
            # RFC 3339 requires an offset; the apiserver rejects naive times too.
            self.problem(full, f"must carry a time zone offset (e.g. Z), got {raw!r}")
            return None
        return moment.timestamp()


def _parse_target_ref(r: _Reader, spec: Mapping[str, Any], policy_only: bool) -> ScaleTargetRef:
    path = "spec.scaleTargetRef"
    m = r.section(spec, "scaleTargetRef", "spec")
    if not m and policy_only:
        return ScaleTargetRef()
    return ScaleTargetRef(
        api_version=r.string(m, "apiVersion", path, default="apps/v1"),
        kind=r.enum(m, "kind", path, TARGET_KINDS, "Deployment"),
        name=r.string(m, "name", path) or "",
    )


def _parse_broker(r: _Reader, spec: Mapping[str, Any], policy_only: bool) -> BrokerSpec:
    path = "spec.broker"
    m = r.section(spec, "broker", "spec")
    if not m and policy_only:
        return BrokerSpec(queue="simulated")
    queue = r.string(m, "queue", path, default=None, max_length=255)
    queue_regex = r.string(m, "queueRegex", path, default=None, max_length=1024)
    if (m.get("queue") is None) == (m.get("queueRegex") is None):
        r.problem(path, "set exactly one of queue or queueRegex")
    if queue_regex is not None:
        try:
            re.compile(queue_regex, re.IGNORECASE)  # as rabbitmq.select_queues compiles it
        except re.error as err:
            r.problem(f"{path}.queueRegex", f"does not compile: {err}")

    amqp: AmqpSecretRef | None = None
    am = r.section(m, "amqpSecretRef", path)
    if not am and not policy_only:
        r.problem(f"{path}.amqpSecretRef", "is required")
    if am:
        apath = f"{path}.amqpSecretRef"
        amqp = AmqpSecretRef(
            name=r.string(am, "name", apath) or "",
            uri_key=r.string(am, "uriKey", apath, default=None),
            host_key=r.string(am, "hostKey", apath, default=None),
            port_key=r.string(am, "portKey", apath, default=None),
            username_key=r.string(am, "usernameKey", apath, default=None),
            password_key=r.string(am, "passwordKey", apath, default=None),
        )
        if (amqp.uri_key is None) == (amqp.host_key is None):
            r.problem(apath, "set exactly one of uriKey or hostKey")
        if amqp.host_key is not None and (amqp.username_key is None or amqp.password_key is None):
            r.problem(apath, "hostKey needs usernameKey and passwordKey")
        if (amqp.username_key is None) != (amqp.password_key is None):
            r.problem(apath, "set usernameKey and passwordKey together")

    mgmt = _parse_http_ref(r, m, "managementSecretRef", path)
    prom = _parse_http_ref(r, m, "prometheusSecretRef", path)
    source = r.enum(m, "metricsSource", path, METRICS_SOURCES, "auto")
    if queue_regex is not None and mgmt is None and prom is None:
        r.problem(f"{path}.queueRegex", "needs managementSecretRef or prometheusSecretRef (AMQP cannot list queues)")
    if source == "management" and mgmt is None:
        r.problem(f"{path}.metricsSource", "management needs broker.managementSecretRef")
    if source == "prometheus" and prom is None:
        r.problem(f"{path}.metricsSource", "prometheus needs broker.prometheusSecretRef")
    if source == "amqp" and queue_regex is not None:
        r.problem(f"{path}.metricsSource", "amqp watches one queue; set broker.queue, not queueRegex")

    tm = r.section(m, "tls", path)
    tpath = f"{path}.tls"
    tls = TlsSpec(
        enabled=r.boolean(tm, "enabled", tpath, False),
        ca_key=r.string(tm, "caKey", tpath, default=None),
        server_name=r.string(tm, "serverName", tpath, default=None),
        insecure_skip_verify=r.boolean(tm, "insecureSkipVerify", tpath, False),
    )
    if tls.ca_key is not None and amqp is None:
        r.problem(f"{tpath}.caKey", "needs broker.amqpSecretRef (the CA is read from that Secret)")

    return BrokerSpec(
        queue=queue,
        queue_regex=queue_regex,
        aggregate=r.enum(m, "aggregate", path, AGGREGATES, "sum"),
        vhost=r.string(m, "vhost", path, default=None),
        amqp_secret_ref=amqp,
        management_secret_ref=mgmt,
        prometheus_secret_ref=prom,
        metrics_source=source,
        tls=tls,
    )


def _parse_http_ref(r: _Reader, broker: Mapping[str, Any], key: str, path: str) -> ManagementSecretRef | None:
    """A Secret reference to an HTTP endpoint (management API or Prometheus plugin)."""
    mm = r.section(broker, key, path)
    if not mm:
        return None
    mpath = f"{path}.{key}"
    ref = ManagementSecretRef(
        name=r.string(mm, "name", mpath) or "",
        url_key=r.string(mm, "urlKey", mpath) or "",
        username_key=r.string(mm, "usernameKey", mpath, default=None),
        password_key=r.string(mm, "passwordKey", mpath, default=None),
    )
    if (ref.username_key is None) != (ref.password_key is None):
        r.problem(mpath, "set usernameKey and passwordKey together")
    return ref


def _parse_replicas(r: _Reader, spec: Mapping[str, Any]) -> ReplicaBounds:
    path = "spec.replicas"
    m = r.section(spec, "replicas", "spec")
    lo = r.integer(m, "min", path, default=1, minimum=0, maximum=MAX_REPLICAS_LIMIT)
    hi = r.integer(m, "max", path, default=10, minimum=1, maximum=MAX_REPLICAS_LIMIT)
    activation = r.integer(m, "activationBacklog", path, default=0, minimum=0)
    if lo > hi:
        r.problem(path, f"min ({lo}) must be <= max ({hi})")
    return ReplicaBounds(min=lo, max=hi, activation_backlog=activation)


def _parse_target(r: _Reader, spec: Mapping[str, Any]) -> TargetSpec:
    path = "spec.target"
    m = r.section(spec, "target", "spec")
    positive = {"default": None, "minimum": 0.0, "exclusive_minimum": True}
    message_rate = r.number(m, "messageRatePerReplica", path, **positive)
    drain = r.number(m, "drainSeconds", path, default=None, minimum=1.0)
    max_age = r.number(m, "maxMessageAgeSeconds", path, default=None, minimum=1.0)
    backlog = r.number(m, "backlogPerReplica", path, **positive)
    if backlog is None and m.get("backlogPerReplica") is None and not (drain or max_age or message_rate):
        backlog = DEFAULT_BACKLOG_PER_REPLICA
    startup = r.number(m, "startupSeconds", path, default=30.0, minimum=0.0, maximum=3600.0)
    target = TargetSpec(
        backlog_per_replica=backlog,
        message_rate_per_replica=message_rate,
        drain_seconds=drain,
        max_message_age_seconds=max_age,
        rate_per_replica=r.number(m, "ratePerReplica", path, **positive),
        rate_per_replica_floor=r.number(
            m, "ratePerReplicaFloor", path, default=0.1, minimum=0.0, exclusive_minimum=True
        ),
        max_send_rate=r.number(m, "maxSendRate", path, **positive),
        count_unacked=r.boolean(m, "countUnacked", path, True),
        startup_seconds=startup,
    )
    if (
        target.backlog_per_replica is None
        and target.drain_seconds is None
        and target.max_message_age_seconds is None
        and target.message_rate_per_replica is None
    ):
        r.problem(
            path,
            "set at least one of backlogPerReplica, messageRatePerReplica, drainSeconds or "
            "maxMessageAgeSeconds",
        )
    return target


def _parse_rules(
    r: _Reader, behavior: Mapping[str, Any], key: str, default: ScalingRules
) -> ScalingRules:
    path = f"spec.behavior.{key}"
    m = r.section(behavior, key, "spec.behavior")
    policies: tuple[ScalingPolicy, ...] = default.policies
    raw_policies = m.get("policies")
    if raw_policies is not None:
        if not isinstance(raw_policies, Sequence) or isinstance(raw_policies, (str, bytes)):
            r.problem(f"{path}.policies", "must be a list")
        elif not raw_policies:
            r.problem(f"{path}.policies", "must hold at least one policy (use selectPolicy: Disabled)")
        else:
            parsed: list[ScalingPolicy] = []
            for i, item in enumerate(raw_policies):
                ppath = f"{path}.policies[{i}]"
                if not isinstance(item, Mapping):
                    r.problem(ppath, "must be an object")
                    continue
                ptype = item.get("type")
                if ptype not in POLICY_TYPES:
                    r.problem(f"{ppath}.type", f"must be one of {', '.join(POLICY_TYPES)}, got {ptype!r}")
                value = r.integer(item, "value", ppath, minimum=0, exclusive_minimum=True)
                period = r.integer(item, "periodSeconds", ppath, minimum=1, maximum=1800)
                if ptype in POLICY_TYPES and value is not None and period is not None:
                    parsed.append(ScalingPolicy(str(ptype), value, period))
            policies = tuple(parsed)
    return ScalingRules(
        stabilization_seconds=r.integer(
            m, "stabilizationSeconds", path, default=default.stabilization_seconds, minimum=0, maximum=3600
        ),
        select_policy=r.enum(m, "selectPolicy", path, SELECT_POLICIES, default.select_policy),
        policies=policies,
        tolerance=r.number(m, "tolerance", path, default=None, minimum=0.0, maximum=MAX_DIRECTION_TOLERANCE),
    )


def _parse_behavior(r: _Reader, spec: Mapping[str, Any]) -> BehaviorSpec:
    path = "spec.behavior"
    m = r.section(spec, "behavior", "spec")
    return BehaviorSpec(
        poll_seconds=r.integer(m, "pollSeconds", path, default=5, minimum=1, maximum=3600),
        tolerance=r.number(m, "tolerance", path, default=0.1, minimum=0.0, maximum=0.99),
        cooldown_seconds=r.integer(m, "cooldownSeconds", path, default=300, minimum=0, maximum=86400),
        scale_up=_parse_rules(r, m, "scaleUp", _default_scale_up()),
        scale_down=_parse_rules(r, m, "scaleDown", _default_scale_down()),
    )


def _parse_fallback(r: _Reader, spec: Mapping[str, Any]) -> FallbackSpec | None:
    path = "spec.fallback"
    if spec.get("fallback") is None:
        return None
    m = r.section(spec, "fallback", "spec")
    replicas = r.integer(m, "replicas", path, minimum=0, maximum=MAX_REPLICAS_LIMIT)
    return FallbackSpec(
        replicas=replicas if replicas is not None else 0,
        after_failures=r.integer(m, "afterFailures", path, default=3, minimum=1, maximum=1000),
        mode=r.enum(m, "mode", path, FALLBACK_MODES, "static"),
    )


def _parse_schedule(r: _Reader, spec: Mapping[str, Any]) -> tuple[ScheduleEntry, ...]:
    raw = spec.get("schedule")
    if raw is None:
        return ()
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        r.problem("spec.schedule", "must be a list")
        return ()
    entries: list[ScheduleEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        path = f"spec.schedule[{i}]"
        if not isinstance(item, Mapping):
            r.problem(path, "must be an object")
            continue
        name = r.string(item, "name", path, max_length=63)
        if name is not None:
            if name in seen:
                r.problem(f"{path}.name", f"duplicate schedule name {name!r}")
            seen.add(name)
        rate = r.number(item, "rate", path, minimum=0.0)
        start = r.timestamp(item, "start", path)
        end = r.timestamp(item, "end", path)
        cron = r.string(item, "cron", path, default=None, max_length=100)
        duration = r.number(item, "durationSeconds", path, default=None, minimum=1.0, maximum=604800.0)
        fixed = item.get("start") is not None or item.get("end") is not None
        recurring = item.get("cron") is not None or item.get("durationSeconds") is not None
        if fixed == recurring:
            r.problem(path, "set either start and end, or cron and durationSeconds")
        elif fixed:
            if item.get("start") is None or item.get("end") is None:
                r.problem(path, "a fixed window needs both start and end")
            elif start is not None and end is not None and end <= start:
                r.problem(f"{path}.end", "must be after start")
        else:
            if item.get("cron") is None or item.get("durationSeconds") is None:
                r.problem(path, "a recurring window needs both cron and durationSeconds")
            if cron is not None:
                if len(cron.split()) != 5 or not croniter.is_valid(cron):
                    r.problem(f"{path}.cron", f"must be a 5-field cron expression, got {cron!r}")
                    cron = None
        if name is not None and rate is not None:
            entries.append(
                ScheduleEntry(
                    name=name,
                    rate=rate,
                    start=start if fixed else None,
                    end=end if fixed else None,
                    cron=cron if not fixed else None,
                    duration_seconds=duration if not fixed else None,
                )
            )
    return tuple(entries)


def parse_spec(spec: Mapping[str, Any], *, policy_only: bool = False) -> EmailQueueSpec:
    """Parse ``EmailQueue.spec`` into an :class:`EmailQueueSpec`, applying the CRD defaults.

    Raises :class:`SpecError` listing every problem. ``policy_only=True`` lets callers that
    never touch a cluster or broker (the simulator, tests) omit ``scaleTargetRef`` and
    ``broker``; placeholders are used instead.
    """
    if not isinstance(spec, Mapping):
        raise SpecError([f"spec: must be an object, got {type(spec).__name__}"])
    r = _Reader()
    parsed = EmailQueueSpec(
        scale_target=_parse_target_ref(r, spec, policy_only),
        broker=_parse_broker(r, spec, policy_only),
        replicas=_parse_replicas(r, spec),
        target=_parse_target(r, spec),
        behavior=_parse_behavior(r, spec),
        fallback=_parse_fallback(r, spec),
        schedule=_parse_schedule(r, spec),
        paused=r.boolean(spec, "paused", "spec", False),
        dry_run=r.boolean(spec, "dryRun", "spec", False),
    )
    if r.problems:
        raise SpecError(r.problems)
    return parsed


def spec_from_dict(spec: Mapping[str, Any], *, policy_only: bool = False) -> EmailQueueSpec:
    """Alias of :func:`parse_spec` for callers that build specs from plain dicts."""
    return parse_spec(spec, policy_only=policy_only)


def default_spec(**sections: Any) -> EmailQueueSpec:
    """A policy-only spec from camelCase sections, for tests and the simulator.

    ``default_spec(replicas={"min": 0, "max": 60}, target={"ratePerReplica": 10})``;
    a top-level ``dryRun``/``paused`` may be given as keyword too.
    """
    return parse_spec(sections, policy_only=True)
