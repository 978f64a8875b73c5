"""Typed, frozen view of an ``EmailQueue.spec``.

This module owns the translation from the loosely typed mapping kopf hands us (or a
simulator scenario's sparse dict) into frozen dataclasses the scaling policy can trust.
The CRD (``deploy/crds/emailqueue.dev_emailqueues.yaml``, shipped verbatim in this package
under ``crds/``) is the one source of field rules; nothing here restates a type, bound, enum
or default:

1. the spec is defaulted as the apiserver defaults it (nulls pruned, schema ``default``s
   applied), so an object the cluster defaulted and a sparse dict parse the same;
2. jsonschema validates it against the CRD's openAPIV3Schema (OpenAPI bits translated);
3. the CRD's CEL ``x-kubernetes-validations`` run in Python (:data:`CEL_RULES`, keyed by the
   rule text; messages come from the CRD), then what no schema can check
   (:data:`BEYOND_SCHEMA`: regular expressions compile, cron expressions parse);
4. every problem found is raised at once in one :class:`SpecError` (like KEDA's scaler
   metadata parsing), each prefixed by its field path, so a user fixes a manifest in one
   round trip; only then is the typed :class:`EmailQueueSpec` built.

Pure: values in, values out (the schema is package data, read once; croniter is a parser,
not a clock).
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from importlib import resources
from typing import Any, Final

import jsonschema
import yaml
from croniter import croniter
from jsonschema import FormatChecker, ValidationError
from jsonschema.protocols import Validator

__all__ = [
    "AGGREGATES",
    "METRICS_SOURCES",
    "AmqpSecretRef",
    "BEYOND_SCHEMA",
    "BehaviorSpec",
    "BrokerSpec",
    "CEL_RULES",
    "CRD_RESOURCE",
    "DEFAULT_BACKLOG_PER_REPLICA",
    "DEFAULT_SCALE_DOWN_POLICIES",
    "DEFAULT_SCALE_UP_POLICIES",
    "EmailQueueSpec",
    "FALLBACK_MODES",
    "FallbackSpec",
    "IGNORED_FIELDS",
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
    "crd_defaulted",
    "crd_spec_schema",
    "default_spec",
    "fields_read",
    "parse_spec",
    "rfc3339_timestamp",
    "spec_from_dict",
]

# The CRD's enums, named for callers (validation reads the CRD; tests/unit/test_crd.py checks they agree).
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
    start = datetime.fromtimestamp(minute_epoch + 1, tz=UTC)
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
            minute = math.floor(at / 60.0) * 60
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


# --------------------------------------------------------------------------- the CRD's schema

CRD_RESOURCE: Final = "crds/emailqueue.dev_emailqueues.yaml"
"""The CRD inside this package: a verbatim copy of deploy/crds/ (deploy/monitoring/sync.py keeps it so)."""

IGNORED_FIELDS: Final[frozenset[str]] = frozenset()
"""Fields the CRD declares under ``spec`` that the Spec builder deliberately does not read, as
schema-walk paths (``spec.schedule[].name``). Empty: the builder consumes every declared field.
``tests/unit/test_spec_schema.py`` fails when a declared field is neither read nor listed here."""

# jsonschema keyword carrying ``x-kubernetes-list-type: map`` (entries unique by their keys).
_LIST_MAP_KEYS: Final = "listMapKeys"
# Pattern names, so an error says what a pattern means rather than quoting the regex.
_PATTERN_NAMES: Final = {
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$":
        "a DNS subdomain name (lowercase letters, digits, '-' and '.', starting and ending alphanumeric)",
}

Steps = tuple[str, ...]
"""A schema-walk path below ``spec``: property names, ``[]`` for "each item of the list"."""
Parts = tuple[str | int, ...]
"""A concrete field path below ``spec``: property names and list indices."""


# libyaml's loader when PyYAML was built with it: ten times faster than the pure-Python one.
_YAML_LOADER: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.lru_cache(maxsize=1)
def _crd_spec() -> dict[str, Any]:
    text = resources.files("emailqueue_operator").joinpath(CRD_RESOURCE).read_text(encoding="utf-8")
    crd = yaml.load(text, Loader=_YAML_LOADER)
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def crd_spec_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema of ``spec`` (a copy), the one source of the field rules."""
    return copy.deepcopy(_crd_spec())


def _to_json_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3.0 structural schema node as a JSON Schema draft 4 node.

    Draft 4 already has OpenAPI 3.0's boolean ``exclusiveMinimum``. What it does not know:
    ``nullable`` (null joins the allowed types), ``x-kubernetes-int-or-string`` (integer or
    string), list types ``set`` (unique items) and ``map`` (entries unique by their key
    fields). The CEL ``x-kubernetes-validations`` run in Python (:data:`CEL_RULES`); every other
    ``x-kubernetes-*`` key (preserve-unknown-fields, embedded-resource, ...) is ignored, and
    ``default`` is applied before validation (:func:`_apply_defaults`), as the apiserver does.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _to_json_schema(child) for name, child in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, Mapping):
            out[key] = _to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_to_json_schema(child) for child in value]
        elif key == "x-kubernetes-int-or-string" and value:
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        elif key == "x-kubernetes-list-type" and value == "set":
            out["uniqueItems"] = True
        elif key == "x-kubernetes-list-map-keys" and node.get("x-kubernetes-list-type") == "map":
            out[_LIST_MAP_KEYS] = list(value)
        elif key.startswith("x-kubernetes-") or key in ("nullable", "default", "description", "example"):
            continue
        else:
            out[key] = value
    if node.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        elif "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    return out


def _is_integer(_: Any, instance: object) -> bool:
    # bool is an int in Python, but a YAML `true` is never a count; 3.0 is (the apiserver agrees).
    if isinstance(instance, bool):
        return False
    if isinstance(instance, int):
        return True
    return isinstance(instance, float) and math.isfinite(instance) and instance.is_integer()


def _is_number(_: Any, instance: object) -> bool:
    # JSON has no NaN or infinity, so the apiserver never sees one; Python callers can pass them.
    if isinstance(instance, bool):
        return False
    if isinstance(instance, int):
        return True
    return isinstance(instance, float) and math.isfinite(instance)


def _list_map_keys(
    validator: Any, keys: Sequence[str], instance: object, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    """``x-kubernetes-list-type: map``: no two entries share their key fields."""
    if not isinstance(instance, list):
        return
    first: dict[tuple[str, ...], int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict) or not all(key in item for key in keys):
            continue
        identity = tuple(repr(item[key]) for key in keys)
        if identity in first:
            described = " and ".join(f"{key} {item[key]!r}" for key in keys)
            yield ValidationError(
                f"duplicate entry: [{first[identity]}] has the same {described}", path=[index, keys[0]]
            )
        else:
            first[identity] = index


def rfc3339_timestamp(text: str) -> float:
    """Epoch seconds of an RFC 3339 date-time; ``ValueError`` says what is wrong with it."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"must be an RFC 3339 date-time, got {text!r}") from None
    if moment.tzinfo is None:
        # RFC 3339 requires an offset; the apiserver rejects naive times too.
        raise ValueError(f"must carry a time zone offset (e.g. Z), got {text!r}")
    return moment.timestamp()


_FORMATS: Final = FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _date_time(instance: object) -> bool:
    if isinstance(instance, str):
        rfc3339_timestamp(instance)
    return True


_SpecValidator: Final = jsonschema.validators.extend(  # type: ignore[no-untyped-call]  # stubs leave it untyped
    jsonschema.Draft4Validator,
    validators={_LIST_MAP_KEYS: _list_map_keys},
    type_checker=jsonschema.Draft4Validator.TYPE_CHECKER.redefine_many(
        {"integer": _is_integer, "number": _is_number}
    ),
)


@functools.lru_cache(maxsize=2)
def _validator(policy_only: bool) -> Validator:
    schema = _to_json_schema(_crd_spec())
    if policy_only:
        # The simulator and tests size fleets without a cluster or a broker to name.
        _drop_required(schema, ("scaleTargetRef", "broker"))
        _drop_required(schema["properties"]["broker"], ("amqpSecretRef",))
    _cel_rules()  # every CRD rule has a Python twin, or nothing validates at all
    validator: Validator = _SpecValidator(schema, format_checker=_FORMATS)
    return validator


def _drop_required(schema: dict[str, Any], names: Sequence[str]) -> None:
    required = [name for name in schema.get("required", []) if name not in names]
    if required:
        schema["required"] = required
    else:
        schema.pop("required", None)


# --------------------------------------------------------------------------- what the apiserver does first

def _as_json(value: Any) -> Any:
    """The value as kubectl sends it: mappings as objects, sequences as arrays, and YAML's
    unquoted timestamps (PyYAML datetimes) as RFC 3339 strings."""
    if isinstance(value, Mapping):
        return {str(key): _as_json(child) for key, child in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(child) for child in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()  # a naive datetime stays naive: the date-time format rejects it
    return value


def _prune_nulls(schema: Mapping[str, Any], value: Any) -> Any:
    """Drop ``null`` fields the schema does not mark ``nullable``: the apiserver prunes them
    before defaulting, so ``max: null`` means "unset" and gets the default."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        return {
            name: _prune_nulls(properties.get(name, {}), child)
            for name, child in value.items()
            if child is not None or properties.get(name, {}).get("nullable", False)
        }
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_prune_nulls(schema["items"], child) for child in value]
    return value


def _apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """Structural-schema defaulting as the apiserver does it: fill missing properties that have
    a ``default``, then default inside every present object and list item."""
    if isinstance(value, dict):
        result = dict(value)
        for name, child in schema.get("properties", {}).items():
            if name not in result and "default" in child:
                result[name] = copy.deepcopy(child["default"])
            if name in result:
                result[name] = _apply_defaults(child, result[name])
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_apply_defaults(schema["items"], child) for child in value]
    return value


def crd_defaulted(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` as the apiserver would store it: JSON values, nulls pruned, schema defaults applied.

    A raw dict and an object the cluster already defaulted come out the same, so they parse
    to the same :class:`EmailQueueSpec`.
    """
    schema = _crd_spec()
    defaulted: dict[str, Any] = _apply_defaults(schema, _prune_nulls(schema, _as_json(spec)))
    return defaulted


# --------------------------------------------------------------------------- rules across fields

def _has(node: object, *names: str) -> bool:
    """CEL ``has(self.a.b)``: every step of the path is present."""
    for name in names:
        if not isinstance(node, Mapping) or name not in node:
            return False
        node = node[name]
    return True


def _schedule_end_after_start(entry: Mapping[str, Any]) -> bool:
    if not (_has(entry, "start") and _has(entry, "end")):
        return True
    return rfc3339_timestamp(entry["end"]) > rfc3339_timestamp(entry["start"])


CEL_RULES: Final[Mapping[str, Callable[[Mapping[str, Any]], bool]]] = {
    # --- spec.broker
    "has(self.queue) != has(self.queueRegex)":
        lambda s: _has(s, "queue") != _has(s, "queueRegex"),
    "!has(self.tls) || !has(self.tls.caKey) || has(self.amqpSecretRef)":
        lambda s: not _has(s, "tls", "caKey") or _has(s, "amqpSecretRef"),
    "!has(self.queueRegex) || has(self.managementSecretRef) || has(self.prometheusSecretRef)":
        lambda s: not _has(s, "queueRegex") or _has(s, "managementSecretRef") or _has(s, "prometheusSecretRef"),
    "!has(self.metricsSource) || self.metricsSource != 'management' || has(self.managementSecretRef)":
        lambda s: s.get("metricsSource") != "management" or _has(s, "managementSecretRef"),
    "!has(self.metricsSource) || self.metricsSource != 'prometheus' || has(self.prometheusSecretRef)":
        lambda s: s.get("metricsSource") != "prometheus" or _has(s, "prometheusSecretRef"),
    "!has(self.metricsSource) || self.metricsSource != 'amqp' || has(self.queue)":
        lambda s: s.get("metricsSource") != "amqp" or _has(s, "queue"),
    # --- spec.broker.amqpSecretRef
    "has(self.uriKey) != has(self.hostKey)":
        lambda s: _has(s, "uriKey") != _has(s, "hostKey"),
    "!has(self.hostKey) || (has(self.usernameKey) && has(self.passwordKey))":
        lambda s: not _has(s, "hostKey") or (_has(s, "usernameKey") and _has(s, "passwordKey")),
    # --- spec.broker.amqpSecretRef, managementSecretRef and prometheusSecretRef
    "has(self.usernameKey) == has(self.passwordKey)":
        lambda s: _has(s, "usernameKey") == _has(s, "passwordKey"),
    # --- spec.replicas
    "!has(self.min) || !has(self.max) || self.min <= self.max":
        lambda s: not (_has(s, "min") and _has(s, "max")) or s["min"] <= s["max"],
    # --- spec.schedule[]
    "has(self.start) == has(self.end)":
        lambda s: _has(s, "start") == _has(s, "end"),
    "has(self.cron) == has(self.durationSeconds)":
        lambda s: _has(s, "cron") == _has(s, "durationSeconds"),
    "has(self.start) != has(self.cron)":
        lambda s: _has(s, "start") != _has(s, "cron"),
    "!has(self.start) || !has(self.end) || self.end > self.start":
        _schedule_end_after_start,
}
"""The CRD's ``x-kubernetes-validations``, keyed by their CEL text verbatim. Where each applies
and the message it gives come from the CRD itself (:func:`_cel_rules`); this table only says
how to evaluate the rule in Python, so the operator, the simulator and the planner reject
what ``kubectl apply`` rejects, with the same words."""


def _queue_regex_compiles(pattern: object) -> str | None:
    if not isinstance(pattern, str):
        return None
    try:
        re.compile(pattern, re.IGNORECASE)  # as rabbitmq.select_queues compiles it
    except re.error as err:
        return f"does not compile: {err}"
    return None


def _cron_parses(expression: object) -> str | None:
    if not isinstance(expression, str):
        return None
    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        return f"must be a 5-field cron expression, got {expression!r}"
    return None


BEYOND_SCHEMA: Final[Mapping[Steps, Callable[[object], str | None]]] = {
    ("broker", "queueRegex"): _queue_regex_compiles,
    ("schedule", "[]", "cron"): _cron_parses,
}
"""What neither OpenAPI nor CEL can check, by field: a problem text, or None. (RFC 3339
date-times with an offset are the schema's ``format: date-time``, checked in :func:`_date_time`.)"""


@functools.lru_cache(maxsize=1)
def _cel_rules() -> tuple[tuple[Steps, str, str], ...]:
    """Every ``x-kubernetes-validations`` rule of the CRD's spec schema: where, rule, message.

    Raises ``LookupError`` for a rule :data:`CEL_RULES` cannot evaluate: a CRD rule the
    operator silently skipped would let it act on objects the cluster rejects.
    """
    found: list[tuple[Steps, str, str]] = []

    def walk(node: Mapping[str, Any], steps: Steps) -> None:
        for rule in node.get("x-kubernetes-validations", []):
            if rule["rule"] not in CEL_RULES:
                raise LookupError(f"spec.py has no Python twin of the CRD rule {rule['rule']!r}")
            found.append((steps, rule["rule"], rule.get("message") or f"failed rule: {rule['rule']}"))
        for name, child in node.get("properties", {}).items():
            walk(child, (*steps, name))
        if isinstance(node.get("items"), Mapping):
            walk(node["items"], (*steps, "[]"))

    walk(_crd_spec(), ())
    return tuple(found)


def _nodes_at(value: Any, steps: Steps, parts: Parts = ()) -> Iterator[tuple[Parts, Any]]:
    """Every value at a schema-walk path, with its concrete path."""
    if not steps:
        yield parts, value
        return
    step, rest = steps[0], steps[1:]
    if step == "[]":
        if isinstance(value, list):
            for index, item in enumerate(value):
                yield from _nodes_at(item, rest, (*parts, index))
    elif isinstance(value, dict) and step in value:
        yield from _nodes_at(value[step], rest, (*parts, step))


def _rule_problems(spec: dict[str, Any]) -> Iterator[tuple[Parts, str]]:
    for steps, rule, message in _cel_rules():
        for parts, node in _nodes_at(spec, steps):
            if not isinstance(node, dict):
                continue  # the schema error names the wrong type already
            try:
                holds = CEL_RULES[rule](node)
            except (TypeError, ValueError):
                continue  # an input of the wrong type or format: the schema error names it already
            if not holds:
                yield parts, message
    for steps, check in BEYOND_SCHEMA.items():
        for parts, value in _nodes_at(spec, steps):
            problem = check(value)
            if problem is not None:
                yield parts, problem


# --------------------------------------------------------------------------- error messages

def _field(parts: Iterable[str | int]) -> str:
    path = "spec"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _order(parts: Parts) -> tuple[int, ...]:
    """Sort key: fields in the order the CRD declares them, a node before its children."""
    node: Mapping[str, Any] = _crd_spec()
    key: list[int] = []
    for part in parts:
        if isinstance(part, int):
            key.append(part)
            node = node.get("items", {})
        else:
            names = list(node.get("properties", {}))
            key.append(names.index(part) if part in names else len(names))
            node = node.get("properties", {}).get(part, {})
    return tuple(key)


_TYPE_WORDS: Final = {
    "integer": "an integer",
    "number": "a finite number",
    "string": "a string",
    "boolean": "true or false",
    "object": "an object",
    "array": "a list",
}


def _number(value: float) -> str:
    if isinstance(value, int):  # exact, and no float overflow for a 400-digit count
        text = str(value)
        return text if len(text) <= 24 else f"{text[:6]}...({len(text)} digits)"
    return f"{value:g}"


def _schema_problems(error: ValidationError) -> list[tuple[Parts, str]]:
    """One jsonschema error as ``(field, problem)`` pairs, in the words the old parser used."""
    parts: Parts = tuple(error.absolute_path)
    keyword = str(error.validator)
    expected: Any = error.validator_value
    value: Any = error.instance
    schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
    if keyword == "required":
        missing = [name for name in expected if not isinstance(value, dict) or name not in value]
        return [((*parts, name), "is required") for name in missing]
    if keyword == "type":
        kinds = [expected] if isinstance(expected, str) else list(expected)
        wanted = " or ".join(_TYPE_WORDS.get(kind, kind) for kind in kinds)
        got = type(value).__name__ if kinds == ["object"] else repr(value)
        return [(parts, f"must be {wanted}, got {got}")]
    if keyword == "minimum":
        op = ">" if schema.get("exclusiveMinimum") else ">="
        return [(parts, f"must be {op} {_number(expected)}, got {_number(value)}")]
    if keyword == "maximum":
        op = "<" if schema.get("exclusiveMaximum") else "<="
        return [(parts, f"must be {op} {_number(expected)}, got {_number(value)}")]
    if keyword == "enum":
        return [(parts, f"must be one of {', '.join(map(str, expected))}, got {value!r}")]
    if keyword == "minLength":
        return [(parts, "must not be empty" if expected == 1 else f"must be at least {expected} characters")]
    if keyword == "maxLength":
        return [(parts, f"must be at most {expected} characters")]
    if keyword == "pattern":
        return [(parts, f"must be {_PATTERN_NAMES.get(expected, f'matched by {expected}')}, got {value!r}")]
    if keyword == "minItems":
        return [(parts, "must hold at least one item" if expected == 1 else f"must hold at least {expected} items")]
    if keyword == "maxItems":
        return [(parts, f"must hold at most {expected} items")]
    if keyword == "format" and error.cause is not None:
        return [(parts, str(error.cause))]
    return [(parts, error.message)]


def _problems(spec: dict[str, Any], policy_only: bool) -> list[str]:
    found: list[tuple[Parts, str]] = []
    for error in _validator(policy_only).iter_errors(spec):
        found.extend(_schema_problems(error))
    found.extend(_rule_problems(spec))
    found.sort(key=lambda problem: _order(problem[0]))  # stable: same field keeps its order
    return list(dict.fromkeys(f"{_field(parts)}: {message}" for parts, message in found))


# --------------------------------------------------------------------------- building the Spec

class _Fields:
    """A validated object's fields. Records every field read (when asked to), so a test can
    prove the builder consumes each field the CRD declares."""

    def __init__(self, value: Mapping[str, Any], path: str, reads: set[str] | None) -> None:
        self._value = value
        self._path = path
        self._reads = reads

    def _note(self, key: str) -> str:
        path = f"{self._path}.{key}"
        if self._reads is not None:
            self._reads.add(path)
        return path

    def has(self, key: str) -> bool:
        self._note(key)
        return key in self._value

    def get(self, key: str) -> Any:
        self._note(key)
        return self._value.get(key)

    def section(self, key: str) -> _Fields:
        return _Fields(self._value.get(key) or {}, self._note(key), self._reads)

    def entries(self, key: str) -> list[_Fields]:
        path = self._note(key) + "[]"
        if self._reads is not None:
            self._reads.add(path)
        return [_Fields(item, path, self._reads) for item in self._value.get(key) or []]


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _build_target_ref(ref: _Fields) -> ScaleTargetRef:
    return ScaleTargetRef(api_version=str(ref.get("apiVersion")), kind=str(ref.get("kind")), name=str(ref.get("name")))


def _build_http_ref(broker: _Fields, key: str) -> ManagementSecretRef | None:
    """A Secret reference to an HTTP endpoint (management API or Prometheus plugin)."""
    if not broker.has(key):
        return None
    ref = broker.section(key)
    return ManagementSecretRef(
        name=str(ref.get("name")),
        url_key=str(ref.get("urlKey")),
        username_key=ref.get("usernameKey"),
        password_key=ref.get("passwordKey"),
    )


def _build_broker(broker: _Fields) -> BrokerSpec:
    amqp: AmqpSecretRef | None = None
    if broker.has("amqpSecretRef"):
        ref = broker.section("amqpSecretRef")
        amqp = AmqpSecretRef(
            name=str(ref.get("name")),
            uri_key=ref.get("uriKey"),
            host_key=ref.get("hostKey"),
            port_key=ref.get("portKey"),
            username_key=ref.get("usernameKey"),
            password_key=ref.get("passwordKey"),
        )
    tls = TlsSpec()
    if broker.has("tls"):  # no schema default for tls itself; inside it, the defaults are applied
        fields = broker.section("tls")
        tls = TlsSpec(
            enabled=bool(fields.get("enabled")),
            ca_key=fields.get("caKey"),
            server_name=fields.get("serverName"),
            insecure_skip_verify=bool(fields.get("insecureSkipVerify")),
        )
    return BrokerSpec(
        queue=broker.get("queue"),
        queue_regex=broker.get("queueRegex"),
        aggregate=str(broker.get("aggregate")),
        vhost=broker.get("vhost"),
        amqp_secret_ref=amqp,
        management_secret_ref=_build_http_ref(broker, "managementSecretRef"),
        prometheus_secret_ref=_build_http_ref(broker, "prometheusSecretRef"),
        metrics_source=str(broker.get("metricsSource")),
        tls=tls,
    )


def _build_target(target: _Fields) -> TargetSpec:
    drain = _optional_float(target.get("drainSeconds"))
    max_age = _optional_float(target.get("maxMessageAgeSeconds"))
    message_rate = _optional_float(target.get("messageRatePerReplica"))
    backlog = _optional_float(target.get("backlogPerReplica"))
    if backlog is None and drain is None and max_age is None and message_rate is None:
        # Conditional, so not a schema default: with an SLO set, a fixed 20 per replica
        # would dominate every decision and defeat the SLO.
        backlog = DEFAULT_BACKLOG_PER_REPLICA
    return TargetSpec(
        backlog_per_replica=backlog,
        message_rate_per_replica=message_rate,
        drain_seconds=drain,
        max_message_age_seconds=max_age,
        rate_per_replica=_optional_float(target.get("ratePerReplica")),
        rate_per_replica_floor=float(target.get("ratePerReplicaFloor")),
        max_send_rate=_optional_float(target.get("maxSendRate")),
        count_unacked=bool(target.get("countUnacked")),
        startup_seconds=float(target.get("startupSeconds")),
    )


def _build_rules(rules: _Fields) -> ScalingRules:
    return ScalingRules(
        stabilization_seconds=int(rules.get("stabilizationSeconds")),
        select_policy=str(rules.get("selectPolicy")),
        policies=tuple(
            ScalingPolicy(str(policy.get("type")), int(policy.get("value")), int(policy.get("periodSeconds")))
            for policy in rules.entries("policies")
        ),
        tolerance=_optional_float(rules.get("tolerance")),
    )


def _build_behavior(behavior: _Fields) -> BehaviorSpec:
    return BehaviorSpec(
        poll_seconds=int(behavior.get("pollSeconds")),
        tolerance=float(behavior.get("tolerance")),
        cooldown_seconds=int(behavior.get("cooldownSeconds")),
        scale_up=_build_rules(behavior.section("scaleUp")),
        scale_down=_build_rules(behavior.section("scaleDown")),
    )


def _build_schedule_entry(entry: _Fields) -> ScheduleEntry:
    start, end, cron, duration = entry.get("start"), entry.get("end"), entry.get("cron"), entry.get("durationSeconds")
    return ScheduleEntry(
        name=str(entry.get("name")),
        rate=float(entry.get("rate")),
        start=None if start is None else rfc3339_timestamp(start),
        end=None if end is None else rfc3339_timestamp(end),
        cron=cron,
        duration_seconds=_optional_float(duration),
    )


def _build(spec: _Fields) -> EmailQueueSpec:
    """The typed Spec from a validated, defaulted ``spec``: no checks left to make."""
    fallback: FallbackSpec | None = None
    if spec.has("fallback"):
        fields = spec.section("fallback")
        fallback = FallbackSpec(
            replicas=int(fields.get("replicas")),
            after_failures=int(fields.get("afterFailures")),
            mode=str(fields.get("mode")),
        )
    replicas = spec.section("replicas")
    return EmailQueueSpec(
        # both absent only in policy-only specs
        scale_target=(_build_target_ref(spec.section("scaleTargetRef")) if spec.has("scaleTargetRef")
                      else ScaleTargetRef()),
        broker=_build_broker(spec.section("broker")) if spec.has("broker") else BrokerSpec(queue="simulated"),
        replicas=ReplicaBounds(
            min=int(replicas.get("min")),
            max=int(replicas.get("max")),
            activation_backlog=int(replicas.get("activationBacklog")),
        ),
        target=_build_target(spec.section("target")),
        behavior=_build_behavior(spec.section("behavior")),
        fallback=fallback,
        schedule=tuple(_build_schedule_entry(entry) for entry in spec.entries("schedule")),
        paused=bool(spec.get("paused")),
        dry_run=bool(spec.get("dryRun")),
    )


# --------------------------------------------------------------------------- parsing

def _validated(spec: Mapping[str, Any], policy_only: bool) -> dict[str, Any]:
    if not isinstance(spec, Mapping):
        raise SpecError([f"spec: must be an object, got {type(spec).__name__}"])
    raw = dict(spec)
    if policy_only:
        for optional in ("scaleTargetRef", "broker"):
            if raw.get(optional) == {}:
                del raw[optional]  # an empty placeholder section means "none"
    defaulted = crd_defaulted(raw)
    problems = _problems(defaulted, policy_only)
    if problems:
        raise SpecError(problems)
    return defaulted


def parse_spec(spec: Mapping[str, Any], *, policy_only: bool = False) -> EmailQueueSpec:
    """Parse ``EmailQueue.spec`` into an :class:`EmailQueueSpec`.

    The spec is defaulted as the apiserver defaults it, validated against the CRD's own
    openAPIV3Schema, then checked by the CRD's CEL rules (:data:`CEL_RULES`) and what no schema
    can check (:data:`BEYOND_SCHEMA`). Raises :class:`SpecError` listing every problem, each
    with its field path. ``policy_only=True`` lets callers that never touch a cluster or broker
    (the simulator, tests) omit ``scaleTargetRef`` and ``broker``; placeholders are used instead.
    """
    return _build(_Fields(_validated(spec, policy_only), "spec", None))


def fields_read(spec: Mapping[str, Any], *, policy_only: bool = False) -> frozenset[str]:
    """The schema-walk paths (``spec.schedule[].name``) the Spec builder reads for ``spec``."""
    reads: set[str] = set()
    _build(_Fields(_validated(spec, policy_only), "spec", reads))
    return frozenset(reads)


def spec_from_dict(spec: Mapping[str, Any], *, policy_only: bool = False) -> EmailQueueSpec:
    """Alias of :func:`parse_spec` for callers that build specs from plain dicts."""
    return parse_spec(spec, policy_only=policy_only)


def default_spec(**sections: Any) -> EmailQueueSpec:
    """A policy-only spec from camelCase sections, for tests and the simulator.

    ``default_spec(replicas={"min": 0, "max": 60}, target={"ratePerReplica": 10})``;
    a top-level ``dryRun``/``paused`` may be given as keyword too.
    """
    return parse_spec(sections, policy_only=True)
