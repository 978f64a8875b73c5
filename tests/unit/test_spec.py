"""Parsing EmailQueue.spec: defaults, every problem reported at once, what the schema cannot check."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from emailqueue_operator.spec import (
    DEFAULT_SCALE_DOWN_POLICIES,
    DEFAULT_SCALE_UP_POLICIES,
    AmqpSecretRef,
    ScalingPolicy,
    ScheduleEntry,
    SpecError,
    default_spec,
    parse_spec,
    spec_from_dict,
)

AMQP: dict[str, Any] = {"name": "rabbit", "uriKey": "uri"}
MINIMAL: dict[str, Any] = {"scaleTargetRef": {"name": "worker"}, "broker": {"queue": "emails", "amqpSecretRef": AMQP}}


def with_(**sections: Any) -> dict[str, Any]:
    return {**MINIMAL, **sections}


def test_minimal_spec_gets_crd_defaults() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.scale_target.api_version == "apps/v1"
    assert spec.scale_target.kind == "Deployment"
    assert spec.broker.vhost is None  # unset: the AMQP URI's vhost, else /
    assert spec.broker.aggregate == "sum"
    assert spec.broker.amqp_secret_ref == AmqpSecretRef("rabbit", uri_key="uri")
    assert (spec.replicas.min, spec.replicas.max, spec.replicas.activation_backlog) == (1, 10, 0)
    assert spec.target.backlog_per_replica == 20.0
    assert spec.target.count_unacked is True
    assert spec.target.startup_seconds == 30.0
    assert spec.behavior.poll_seconds == 5
    assert spec.behavior.tolerance == 0.1
    assert spec.behavior.cooldown_seconds == 300
    assert spec.behavior.scale_up.stabilization_seconds == 0
    assert spec.behavior.scale_up.policies == DEFAULT_SCALE_UP_POLICIES
    assert spec.behavior.scale_down.stabilization_seconds == 300
    assert spec.behavior.scale_down.policies == DEFAULT_SCALE_DOWN_POLICIES
    assert spec.fallback is None
    assert spec.schedule == ()
    assert not spec.paused and not spec.dry_run


@pytest.mark.parametrize(
    ("target", "expected_backlog_per_replica"),
    [
        ({}, 20.0),  # nothing configured: KEDA QueueLength default
        ({"drainSeconds": 60}, None),  # SLO only: a fixed 20/replica would override the SLO
        ({"maxMessageAgeSeconds": 120}, None),  # age SLO only
        ({"messageRatePerReplica": 5}, None),  # KEDA MessageRate only
        ({"drainSeconds": 60, "backlogPerReplica": 50}, 50.0),  # explicit value always kept
    ],
)
def test_backlog_per_replica_defaults_only_without_other_targets(
    target: dict[str, Any], expected_backlog_per_replica: float | None
) -> None:
    assert parse_spec(with_(target=target)).target.backlog_per_replica == expected_backlog_per_replica


def test_full_spec_parses_into_typed_values() -> None:
    manifest = yaml.safe_load(
        """
        scaleTargetRef: {apiVersion: apps/v1, kind: StatefulSet, name: mailer}
        broker:
          queueRegex: "^emails\\\\..*"
          aggregate: max
          vhost: mail
          amqpSecretRef: {name: rabbit, hostKey: host, portKey: port, usernameKey: user, passwordKey: pass}
          managementSecretRef: {name: rabbit-mgmt, urlKey: url}
          tls: {enabled: true, caKey: ca.crt, serverName: rabbit.local}
        replicas: {min: 0, max: 60, activationBacklog: 5}
        target: {drainSeconds: 60, maxMessageAgeSeconds: 300, ratePerReplica: 10, maxSendRate: 500.5}
        behavior:
          pollSeconds: 10
          scaleUp: {stabilizationSeconds: 30, selectPolicy: Min, policies: [{type: Pods, value: 2, periodSeconds: 60}]}
          scaleDown: {selectPolicy: Disabled}
        fallback: {afterFailures: 2, replicas: 6, mode: currentIfHigher}
        schedule:
          - {name: newsletter, start: 2026-12-01T09:00:00Z, end: "2026-12-01T11:00:00+01:00", rate: 300}
          - {name: daily, cron: "0 8 * * *", durationSeconds: 1800, rate: 120}
        paused: true
        dryRun: true
        """
    )
    spec = parse_spec(manifest)
    assert spec.scale_target.kind == "StatefulSet"
    assert spec.broker.queue is None and spec.broker.queue_regex == "^emails\\..*"
    assert spec.broker.amqp_secret_ref == AmqpSecretRef("rabbit", None, "host", "port", "user", "pass")
    assert spec.broker.management_secret_ref is not None and spec.broker.management_secret_ref.url_key == "url"
    assert spec.broker.tls.enabled and spec.broker.tls.ca_key == "ca.crt"
    assert spec.replicas.min == 0 and spec.replicas.activation_backlog == 5
    assert spec.target.max_send_rate == 500.5 and spec.target.backlog_per_replica is None
    assert spec.behavior.scale_up.policies == (ScalingPolicy("Pods", 2, 60),)
    assert spec.behavior.scale_up.select_policy == "Min"
    assert spec.behavior.scale_down.select_policy == "Disabled"
    assert spec.behavior.scale_down.stabilization_seconds == 300  # untouched default
    assert spec.fallback is not None and spec.fallback.mode == "currentIfHigher"
    # YAML's unquoted timestamp (a datetime) and a quoted offset string both parse
    newsletter = spec.schedule[0]
    assert newsletter.start == datetime(2026, 12, 1, 9, tzinfo=UTC).timestamp()
    assert newsletter.end == datetime(2026, 12, 1, 10, tzinfo=UTC).timestamp()
    assert spec.paused and spec.dry_run


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # missing sections a real object always has
        ({}, ["spec.scaleTargetRef: is required", "spec.broker: is required"]),
        (with_(scaleTargetRef={"kind": "Deployment"}), ["spec.scaleTargetRef.name: is required"]),
        (with_(broker={"amqpSecretRef": AMQP}), ["spec.broker: set exactly one of broker.queue or broker.queueRegex"]),
        # both queue forms
        (with_(broker={"queue": "a", "queueRegex": "a.*", "amqpSecretRef": AMQP}), ["spec.broker: set exactly one"]),
        # regex the schema accepts but Python cannot compile
        (with_(broker={"queueRegex": "emails(", "amqpSecretRef": AMQP}), ["spec.broker.queueRegex: does not compile"]),
        # min > max
        (with_(replicas={"min": 5, "max": 2}),
         ["spec.replicas: replicas.min must be less than or equal to replicas.max"]),
        # bool is not an integer even though Python says so
        (with_(replicas={"max": True}), ["spec.replicas.max: must be an integer"]),
        # out of range
        (with_(replicas={"max": 10001}), ["spec.replicas.max: must be <= 10000"]),
        (with_(target={"ratePerReplica": 0}), ["spec.target.ratePerReplica: must be > 0"]),
        (with_(behavior={"pollSeconds": 0}), ["spec.behavior.pollSeconds: must be >= 1"]),
        # enums
        (with_(scaleTargetRef={"name": "w", "kind": "Job"}), ["spec.scaleTargetRef.kind: must be one of"]),
        (with_(behavior={"scaleUp": {"selectPolicy": "Fast"}}), ["spec.behavior.scaleUp.selectPolicy"]),
        (
            with_(behavior={"scaleDown": {"policies": [{"type": "Replicas", "value": 1, "periodSeconds": 15}]}}),
            ["spec.behavior.scaleDown.policies[0].type"],
        ),
        (with_(behavior={"scaleUp": {"policies": []}}), ["spec.behavior.scaleUp.policies: must hold at least one"]),
        # secret refs: uri xor host, host needs credentials
        (
            with_(broker={"queue": "q", "amqpSecretRef": {"name": "s", "uriKey": "u", "hostKey": "h"}}),
            ["spec.broker.amqpSecretRef: amqpSecretRef needs exactly one of uriKey or hostKey"],
        ),
        (
            with_(broker={"queue": "q", "amqpSecretRef": {"name": "s", "hostKey": "h", "usernameKey": "u"}}),
            ["spec.broker.amqpSecretRef: amqpSecretRef.hostKey needs usernameKey and passwordKey",
             "spec.broker.amqpSecretRef: set amqpSecretRef usernameKey and passwordKey together"],
        ),
        (
            with_(broker={"queue": "q", "tls": {"enabled": True, "caKey": "ca"}}),
            ["spec.broker.amqpSecretRef: is required",
             "spec.broker: broker.tls.caKey is read from the amqpSecretRef Secret; set broker.amqpSecretRef"],
        ),
        # fallback without replicas
        (with_(fallback={"afterFailures": 2}), ["spec.fallback.replicas: is required"]),
        # schedule: backwards window, half a window, both kinds, bad cron, duplicate names
        (
            with_(schedule=[{"name": "a", "start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z", "rate": 1}]),
            ["spec.schedule[0]: schedule end must be after start"],
        ),
        (with_(schedule=[{"name": "a", "cron": "0 8 * * *", "rate": 1}]),
         ["spec.schedule[0]: a recurring schedule window needs both cron and durationSeconds"]),
        (
            with_(schedule=[{"name": "a", "cron": "0 8 * * *", "durationSeconds": 60,
                             "start": "2026-01-01T00:00:00Z", "rate": 1}]),
            ["spec.schedule[0]: set either start and end, or cron and durationSeconds"],
        ),
        (
            with_(schedule=[{"name": "a", "cron": "61 8 * * *", "durationSeconds": 60, "rate": 1}]),
            ["spec.schedule[0].cron: must be a 5-field cron expression"],
        ),
        (
            with_(schedule=[{"name": "a", "cron": "0 8 * * * *", "durationSeconds": 60, "rate": 1}]),
            ["spec.schedule[0].cron: must be a 5-field cron expression"],
        ),
        (
            with_(schedule=[{"name": "a", "start": "2026-01-01T00:00:00", "end": "2026-01-02T00:00:00Z", "rate": 1}]),
            ["spec.schedule[0].start: must carry a time zone offset"],
        ),
        (
            with_(
                schedule=[
                    {"name": "a", "cron": "0 8 * * *", "durationSeconds": 60, "rate": 1},
                    {"name": "a", "cron": "0 9 * * *", "durationSeconds": 60, "rate": 1},
                ]
            ),
            ["spec.schedule[1].name: duplicate entry: [0] has the same name 'a'"],
        ),
        # metrics sources (KEDA rejects a regex without the HTTP API at parse time too)
        (with_(broker={"queueRegex": "e.*", "amqpSecretRef": AMQP}),
         ["spec.broker: broker.queueRegex needs managementSecretRef or prometheusSecretRef"]),
        (with_(broker={"queue": "q", "amqpSecretRef": AMQP, "metricsSource": "prometheus"}),
         ["spec.broker: broker.metricsSource prometheus needs broker.prometheusSecretRef"]),
        (with_(broker={"queue": "q", "amqpSecretRef": AMQP, "metricsSource": "management"}),
         ["spec.broker: broker.metricsSource management needs broker.managementSecretRef"]),
        (with_(broker={"queue": "q", "amqpSecretRef": AMQP, "metricsSource": "statsd"}),
         ["spec.broker.metricsSource"]),
        (with_(broker={"queue": "q", "amqpSecretRef": AMQP, "prometheusSecretRef": {"name": "p", "urlKey": "u",
                                                                                     "usernameKey": "x"}}),
         ["spec.broker.prometheusSecretRef: set prometheusSecretRef usernameKey and passwordKey together"]),
        # wrong shapes
        (with_(replicas=[1, 2]), ["spec.replicas: must be an object"]),
        (with_(paused="yes"), ["spec.paused: must be true or false"]),
    ],
)
def test_invalid_specs_name_each_problem(spec: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    message = str(caught.value)
    for fragment in expected:
        assert fragment in message


def test_all_problems_are_reported_together() -> None:
    spec = with_(
        replicas={"min": -1, "max": 0},
        target={"startupSeconds": -5},
        behavior={"tolerance": 2},
        broker={"queueRegex": "(", "amqpSecretRef": AMQP, "managementSecretRef": {"name": "m", "urlKey": "url"}},
    )
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    paths = [problem.split(":")[0] for problem in caught.value.problems]
    assert paths == [
        "spec.broker.queueRegex",
        "spec.replicas.min",
        "spec.replicas.max",
        "spec.target.startupSeconds",
        "spec.behavior.tolerance",
    ]


def test_policy_only_specs_may_omit_target_and_broker() -> None:
    spec = default_spec(replicas={"min": 3, "max": 60}, target={"ratePerReplica": 10, "drainSeconds": 60})
    assert spec.replicas.max == 60 and spec.target.drain_seconds == 60
    assert spec_from_dict({"replicas": {"max": 4}}, policy_only=True).replicas.max == 4
    with pytest.raises(SpecError):
        spec_from_dict({"replicas": {"max": 4}})  # a real object must name its target and queue


# 2026-12-01 is a Tuesday; 08:00 UTC
TUESDAY_8AM = datetime(2026, 12, 1, 8, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("entry", "now", "lookahead", "expected"),
    [
        # fixed window: rate inside [start, end), 0 outside
        (ScheduleEntry("w", 100.0, start=1000.0, end=2000.0), 1000.0, 0.0, 100.0),
        (ScheduleEntry("w", 100.0, start=1000.0, end=2000.0), 2000.0, 0.0, 0.0),
        (ScheduleEntry("w", 100.0, start=1000.0, end=2000.0), 999.0, 0.0, 0.0),
        # lookahead sees a campaign before it starts (pre-scaling)
        (ScheduleEntry("w", 100.0, start=1000.0, end=2000.0), 965.0, 35.0, 100.0),
        # cron: daily at 08:00 for 30 minutes
        (ScheduleEntry("c", 50.0, cron="0 8 * * *", duration_seconds=1800), TUESDAY_8AM, 0.0, 50.0),
        (ScheduleEntry("c", 50.0, cron="0 8 * * *", duration_seconds=1800), TUESDAY_8AM + 1799, 0.0, 50.0),
        (ScheduleEntry("c", 50.0, cron="0 8 * * *", duration_seconds=1800), TUESDAY_8AM + 1800, 0.0, 0.0),
        (ScheduleEntry("c", 50.0, cron="0 8 * * *", duration_seconds=1800), TUESDAY_8AM - 40, 35.0, 0.0),
        (ScheduleEntry("c", 50.0, cron="0 8 * * *", duration_seconds=1800), TUESDAY_8AM - 30, 35.0, 50.0),
        # cron on Mondays only: Tuesday 08:00 is outside
        (ScheduleEntry("m", 50.0, cron="0 8 * * 1", duration_seconds=1800), TUESDAY_8AM, 0.0, 0.0),
    ],
)
def test_schedule_entry_active_rate(entry: ScheduleEntry, now: float, lookahead: float, expected: float) -> None:
    assert entry.active_rate(now, lookahead) == expected


def test_overlapping_campaigns_add_up() -> None:
    spec = default_spec(
        schedule=[
            {"name": "a", "start": "2026-12-01T08:00:00Z", "end": "2026-12-01T09:00:00Z", "rate": 100},
            {"name": "b", "cron": "0 8 * * *", "durationSeconds": 600, "rate": 30},
        ]
    )
    assert spec.scheduled_rate(TUESDAY_8AM + 60, 0.0) == 130.0
    assert spec.scheduled_rate(TUESDAY_8AM + 900, 0.0) == 100.0


@pytest.mark.parametrize(
    "broker, source",
    [
        # auto prefers the Prometheus plugin, then the management API, then AMQP
        ({}, "amqp"),
        ({"managementSecretRef": {"name": "m", "urlKey": "url"}}, "management"),
        ({"prometheusSecretRef": {"name": "p", "urlKey": "url"}}, "prometheus"),
        ({"managementSecretRef": {"name": "m", "urlKey": "url"}, "prometheusSecretRef": {"name": "p", "urlKey": "url"}},
         "prometheus"),
        # an explicit choice wins over auto
        ({"managementSecretRef": {"name": "m", "urlKey": "url"}, "prometheusSecretRef": {"name": "p", "urlKey": "url"},
          "metricsSource": "management"}, "management"),
        ({"managementSecretRef": {"name": "m", "urlKey": "url"}, "metricsSource": "amqp"}, "amqp"),
    ],
)
def test_metrics_source_resolves(broker: dict[str, Any], source: str) -> None:
    spec = parse_spec(with_(broker={"queue": "q", "amqpSecretRef": AMQP, **broker}))
    assert spec.broker.source == source


@pytest.mark.parametrize(
    ("behavior", "up", "down"),
    [
        ({}, 0.1, 0.1),  # both default to behavior.tolerance
        ({"tolerance": 0.2}, 0.2, 0.2),
        ({"scaleUp": {"tolerance": 0.5}}, 0.5, 0.1),  # HPA behavior.scaleUp.tolerance (1.33+)
        ({"tolerance": 0.3, "scaleDown": {"tolerance": 0}}, 0.3, 0.0),
        ({"scaleUp": {"tolerance": 2}, "scaleDown": {"tolerance": 0.36}}, 2.0, 0.36),  # upstream's own values
    ],
)
def test_scale_up_and_scale_down_tolerances(behavior: dict[str, Any], up: float, down: float) -> None:
    spec = parse_spec(with_(behavior=behavior))
    assert (spec.behavior.scale_up_tolerance, spec.behavior.scale_down_tolerance) == (up, down)


@pytest.mark.parametrize("value", [-0.1, 101, "0.1", True])
def test_direction_tolerance_bounds(value: Any) -> None:
    with pytest.raises(SpecError, match=r"spec\.behavior\.scaleDown\.tolerance"):
        parse_spec(with_(behavior={"scaleDown": {"tolerance": value}}))


def test_vhost_is_unset_unless_given() -> None:
    assert parse_spec(MINIMAL).broker.vhost is None
    assert parse_spec(with_(broker={"queue": "q", "vhost": "mail", "amqpSecretRef": AMQP})).broker.vhost == "mail"
