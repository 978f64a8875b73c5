"""The CRD is the one source of EmailQueue field rules (issue 15).

`parse_spec` validates against the CRD's own openAPIV3Schema and evaluates the CRD's CEL rules
in Python. These tests pin that: every CEL rule of the CRD has a Python twin that rejects the
same object with the CRD's own message (and accepts the object once fixed); every field the
CRD declares under spec is read by the Spec builder or listed as ignored; what the apiserver
does before validating (null pruning, defaulting) happens here too.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from emailqueue_operator import spec as spec_module
from emailqueue_operator.spec import (
    CEL_RULES,
    IGNORED_FIELDS,
    SpecError,
    crd_defaulted,
    crd_spec_schema,
    fields_read,
    parse_spec,
)

CRD_PATH = Path(__file__).resolve().parents[2] / "deploy" / "crds" / "emailqueue.dev_emailqueues.yaml"

AMQP: dict[str, Any] = {"name": "rabbit", "uriKey": "uri"}
MGMT: dict[str, Any] = {"name": "rabbit-mgmt", "urlKey": "url"}
PROM: dict[str, Any] = {"name": "rabbit-prom", "urlKey": "url"}
TARGET: dict[str, Any] = {"name": "worker"}
T1, T2 = "2026-12-01T09:00:00Z", "2026-12-01T11:00:00Z"


def spec_with(**sections: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"scaleTargetRef": TARGET, "broker": {"queue": "emails", "amqpSecretRef": AMQP}}
    return {**base, **sections}


def broker(**fields: Any) -> dict[str, Any]:
    return spec_with(broker=fields)


def schedule(**entry: Any) -> dict[str, Any]:
    return spec_with(schedule=[{"name": "campaign", "rate": 10, **entry}])


def spec_schema_from_deploy() -> dict[str, Any]:
    return copy.deepcopy(_deployed_spec_schema())


@functools.lru_cache(maxsize=1)
def _deployed_spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def walk(node: dict[str, Any], path: str = "spec") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node below ``spec`` with its schema-walk path (list items as ``[]``)."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")


def crd_rules() -> dict[tuple[str, str], str]:
    """(where the CRD declares it, rule text) -> the CRD's message, read from deploy/crds/."""
    return {
        (path, rule["rule"]): rule["message"]
        for path, node in walk(spec_schema_from_deploy())
        for rule in node.get("x-kubernetes-validations", [])
    }


# Each CRD rule: where it is declared, the field the apiserver names, an object breaking only
# that rule, and the same object fixed. tests/integration/test_spec_cel_parity.py applies the
# same objects to a real apiserver.
CEL_CASES: list[tuple[str, str, str, dict[str, Any], dict[str, Any]]] = [
    ("spec.broker", "spec.broker", "has(self.queue) != has(self.queueRegex)",
     broker(amqpSecretRef=AMQP),
     broker(amqpSecretRef=AMQP, queue="emails")),
    ("spec.broker", "spec.broker", "!has(self.tls) || !has(self.tls.caKey) || has(self.amqpSecretRef)",
     # amqpSecretRef is required on real objects; the rule matters to policy-only specs too
     broker(queue="emails", tls={"enabled": True, "caKey": "ca.crt"}),
     broker(queue="emails", tls={"enabled": True, "caKey": "ca.crt"}, amqpSecretRef=AMQP)),
    ("spec.broker", "spec.broker",
     "!has(self.queueRegex) || has(self.managementSecretRef) || has(self.prometheusSecretRef)",
     broker(queueRegex="^emails-.*$", amqpSecretRef=AMQP),
     broker(queueRegex="^emails-.*$", amqpSecretRef=AMQP, prometheusSecretRef=PROM)),
    ("spec.broker", "spec.broker",
     "!has(self.metricsSource) || self.metricsSource != 'management' || has(self.managementSecretRef)",
     broker(queue="emails", amqpSecretRef=AMQP, metricsSource="management", prometheusSecretRef=PROM),
     broker(queue="emails", amqpSecretRef=AMQP, metricsSource="management", managementSecretRef=MGMT)),
    ("spec.broker", "spec.broker",
     "!has(self.metricsSource) || self.metricsSource != 'prometheus' || has(self.prometheusSecretRef)",
     broker(queue="emails", amqpSecretRef=AMQP, metricsSource="prometheus", managementSecretRef=MGMT),
     broker(queue="emails", amqpSecretRef=AMQP, metricsSource="prometheus", prometheusSecretRef=PROM)),
    ("spec.broker", "spec.broker", "!has(self.metricsSource) || self.metricsSource != 'amqp' || has(self.queue)",
     broker(queueRegex="^emails-.*$", amqpSecretRef=AMQP, managementSecretRef=MGMT, metricsSource="amqp"),
     broker(queue="emails", amqpSecretRef=AMQP, managementSecretRef=MGMT, metricsSource="amqp")),
    ("spec.broker.amqpSecretRef", "spec.broker.amqpSecretRef", "has(self.uriKey) != has(self.hostKey)",
     broker(queue="emails", amqpSecretRef={"name": "s", "usernameKey": "u", "passwordKey": "p"}),
     broker(queue="emails", amqpSecretRef={"name": "s", "hostKey": "h", "usernameKey": "u", "passwordKey": "p"})),
    ("spec.broker.amqpSecretRef", "spec.broker.amqpSecretRef",
     "!has(self.hostKey) || (has(self.usernameKey) && has(self.passwordKey))",
     broker(queue="emails", amqpSecretRef={"name": "s", "hostKey": "h"}),
     broker(queue="emails", amqpSecretRef={"name": "s", "hostKey": "h", "usernameKey": "u", "passwordKey": "p"})),
    ("spec.broker.amqpSecretRef", "spec.broker.amqpSecretRef", "has(self.usernameKey) == has(self.passwordKey)",
     broker(queue="emails", amqpSecretRef={"name": "s", "uriKey": "uri", "passwordKey": "p"}),
     broker(queue="emails", amqpSecretRef={"name": "s", "uriKey": "uri", "usernameKey": "u", "passwordKey": "p"})),
    ("spec.broker.managementSecretRef", "spec.broker.managementSecretRef",
     "has(self.usernameKey) == has(self.passwordKey)",
     broker(queue="emails", amqpSecretRef=AMQP, managementSecretRef={**MGMT, "usernameKey": "u"}),
     broker(queue="emails", amqpSecretRef=AMQP, managementSecretRef={**MGMT, "usernameKey": "u", "passwordKey": "p"})),
    ("spec.broker.prometheusSecretRef", "spec.broker.prometheusSecretRef",
     "has(self.usernameKey) == has(self.passwordKey)",
     broker(queue="emails", amqpSecretRef=AMQP, prometheusSecretRef={**PROM, "passwordKey": "p"}),
     broker(queue="emails", amqpSecretRef=AMQP, prometheusSecretRef={**PROM, "usernameKey": "u", "passwordKey": "p"})),
    ("spec.replicas", "spec.replicas", "!has(self.min) || !has(self.max) || self.min <= self.max",
     spec_with(replicas={"min": 5, "max": 2}),
     spec_with(replicas={"min": 2, "max": 5})),
    ("spec.schedule[]", "spec.schedule[0]", "has(self.start) == has(self.end)",
     schedule(start=T1),
     schedule(start=T1, end=T2)),
    ("spec.schedule[]", "spec.schedule[0]", "has(self.cron) == has(self.durationSeconds)",
     schedule(cron="0 8 * * *"),
     schedule(cron="0 8 * * *", durationSeconds=600)),
    ("spec.schedule[]", "spec.schedule[0]", "has(self.start) != has(self.cron)",
     schedule(),
     schedule(start=T1, end=T2)),
    ("spec.schedule[]", "spec.schedule[0]", "!has(self.start) || !has(self.end) || self.end > self.start",
     schedule(start=T2, end=T1),
     schedule(start=T1, end=T2)),
]


def test_every_crd_rule_has_a_python_twin_and_a_case() -> None:
    declared = crd_rules()
    assert {rule for _, rule in declared} == set(CEL_RULES), "CEL_RULES must mirror the CRD's rules exactly"
    assert {(where, rule) for where, _, rule, _, _ in CEL_CASES} == set(declared), "one case per CRD rule"


@pytest.mark.parametrize(
    ("declared_at", "field", "rule", "bad", "fixed"), CEL_CASES, ids=[f"{c[0]}: {c[2]}" for c in CEL_CASES]
)
def test_object_breaking_a_crd_rule_is_rejected_with_the_crd_message(
    declared_at: str, field: str, rule: str, bad: dict[str, Any], fixed: dict[str, Any]
) -> None:
    message = crd_rules()[(declared_at, rule)]
    with pytest.raises(SpecError) as caught:
        parse_spec(bad)
    assert f"{field}: {message}" in caught.value.problems
    # The same object with that one thing fixed is accepted: the rule, not something else, said no.
    parse_spec(fixed)


def test_the_packaged_crd_is_the_deployed_one() -> None:
    # The operator validates against the schema the cluster enforces, not a stale copy.
    assert crd_spec_schema() == spec_schema_from_deploy()


def test_every_field_the_crd_declares_is_read_or_listed_as_ignored() -> None:
    declared = {path for path, _ in walk(spec_schema_from_deploy()) if path != "spec"}
    # Between them these set every optional section, so every field a builder could read is read.
    full_specs = [
        yaml.safe_load(
            """
            scaleTargetRef: {apiVersion: apps/v1, kind: StatefulSet, name: mailer}
            broker:
              queue: emails
              aggregate: max
              vhost: mail
              amqpSecretRef: {name: rabbit, hostKey: host, portKey: port, usernameKey: user, passwordKey: pass}
              managementSecretRef: {name: rabbit-mgmt, urlKey: url, usernameKey: u, passwordKey: p}
              prometheusSecretRef: {name: rabbit-prom, urlKey: url, usernameKey: u, passwordKey: p}
              metricsSource: prometheus
              tls: {enabled: true, caKey: ca.crt, serverName: rabbit.local, insecureSkipVerify: false}
            replicas: {min: 0, max: 60, activationBacklog: 5}
            target: {backlogPerReplica: 30, messageRatePerReplica: 4, drainSeconds: 60, maxMessageAgeSeconds: 300,
                     ratePerReplica: 10, ratePerReplicaFloor: 0.5, maxSendRate: 500, countUnacked: false,
                     startupSeconds: 20}
            behavior:
              pollSeconds: 10
              tolerance: 0.2
              cooldownSeconds: 60
              scaleUp: {tolerance: 0.5, stabilizationSeconds: 30, selectPolicy: Min,
                        policies: [{type: Pods, value: 2, periodSeconds: 60}]}
              scaleDown: {tolerance: 0.1, stabilizationSeconds: 60, selectPolicy: Disabled,
                          policies: [{type: Percent, value: 50, periodSeconds: 60}]}
            fallback: {afterFailures: 2, replicas: 6, mode: currentIfHigher}
            schedule:
              - {name: newsletter, start: "2026-12-01T09:00:00Z", end: "2026-12-01T11:00:00Z", rate: 300}
              - {name: daily, cron: "0 8 * * *", durationSeconds: 1800, rate: 120}
            paused: true
            dryRun: true
            """
        ),
        spec_with(broker={"queueRegex": "^emails-.*$", "amqpSecretRef": AMQP, "managementSecretRef": MGMT}),
    ]
    read = frozenset().union(*(fields_read(spec) for spec in full_specs))
    assert declared >= IGNORED_FIELDS, "IGNORED_FIELDS names a field the CRD no longer declares"
    assert not (IGNORED_FIELDS & read), "a field listed as ignored is read: remove it from IGNORED_FIELDS"
    assert sorted(declared - IGNORED_FIELDS - read) == [], "consume these fields or list them in IGNORED_FIELDS"
    assert sorted(read - declared) == [], "the builder reads fields the CRD does not declare (pruned by the apiserver)"


def test_defaulting_matches_the_apiserver_nulls_included() -> None:
    # `max: null` is pruned before defaulting (the field is not nullable), so it means the default.
    assert parse_spec(spec_with(replicas={"min": 2, "max": None})).replicas.max == 10
    defaulted = crd_defaulted(spec_with(behavior={"scaleUp": {}}))
    assert defaulted["behavior"]["scaleUp"]["policies"] == [
        {"type": "Percent", "value": 100, "periodSeconds": 15},
        {"type": "Pods", "value": 4, "periodSeconds": 15},
    ]
    assert defaulted["replicas"] == {"min": 1, "max": 10, "activationBacklog": 0}
    # Defaulting twice changes nothing: an object the cluster stored parses like the dict sent.
    assert crd_defaulted(defaulted) == defaulted
    assert parse_spec(defaulted) == parse_spec(spec_with(behavior={"scaleUp": {}}))


def test_schema_rule_and_beyond_schema_problems_come_together_in_crd_order() -> None:
    bad = spec_with(
        scaleTargetRef={"name": "Worker_1"},  # schema: not a DNS name
        broker={"queueRegex": "emails(", "amqpSecretRef": AMQP, "managementSecretRef": MGMT},  # does not compile
        replicas={"min": 7, "max": 3},  # CEL rule
        target={"ratePerReplica": math.nan},  # Python can pass NaN; JSON cannot
        schedule=[{"name": "x", "rate": 1, "cron": "99 * * * *", "durationSeconds": 1.5}],
    )
    with pytest.raises(SpecError) as caught:
        parse_spec(bad)
    assert [problem.split(":")[0] for problem in caught.value.problems] == [
        "spec.scaleTargetRef.name",
        "spec.broker.queueRegex",
        "spec.replicas",
        "spec.target.ratePerReplica",
        "spec.schedule[0].cron",
        "spec.schedule[0].durationSeconds",
    ]
    assert "must be a finite number, got nan" in caught.value.problems[3]
    assert "must be an integer, got 1.5" in caught.value.problems[5]
    assert "DNS subdomain name" in caught.value.problems[0]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        # a CEL rule over a field of the wrong type is not evaluated: only the type is reported
        (spec_with(replicas={"min": "two", "max": 3}), "spec.replicas.min: must be an integer, got 'two'"),
        (schedule(start="yesterday", end=T2), "spec.schedule[0].start: must be an RFC 3339 date-time"),
        (spec_with(broker="emails"), "spec.broker: must be an object, got str"),
        # a number far past any bound is still just out of range
        (spec_with(replicas={"max": 10**400}), "spec.replicas.max: must be <= 10000"),
    ],
)
def test_wrong_types_are_reported_not_raised(spec: dict[str, Any], problem: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    assert any(found.startswith(problem) for found in caught.value.problems), caught.value.problems


def test_integral_floats_are_integers_as_the_apiserver_reads_them() -> None:
    parsed = parse_spec(spec_with(replicas={"min": 2.0, "max": 4.0}))
    assert (parsed.replicas.min, parsed.replicas.max) == (2, 4)
    assert isinstance(parsed.replicas.max, int)


@pytest.mark.parametrize(
    ("node", "accepted", "rejected"),
    [
        ({"type": "string", "nullable": True}, [None, "x"], [3]),
        ({"x-kubernetes-int-or-string": True}, [3, "50%"], [1.5, True]),
        ({"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"}, [["a", "b"]], [["a", "a"]]),
        (
            {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
             "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
            [[{"name": "a"}, {"name": "b"}]],
            [[{"name": "a"}, {"name": "a"}]],
        ),
        # unknown x-kubernetes-* keys are ignored, not rejected
        ({"type": "object", "x-kubernetes-preserve-unknown-fields": True}, [{"any": 1}], ["x"]),
    ],
)
def test_openapi_extensions_translate_to_json_schema(node: dict[str, Any], accepted: list[Any],
                                                     rejected: list[Any]) -> None:
    validator = spec_module._SpecValidator(spec_module._to_json_schema(copy.deepcopy(node)))
    for value in accepted:
        assert list(validator.iter_errors(value)) == [], value
    for value in rejected:
        assert list(validator.iter_errors(value)) != [], value
