"""Static checks of the EmailQueue CRD: what `kubectl explain`, `kubectl get` and the apiserver's
defaulting give users must agree with what the operator parses and writes."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from emailqueue_operator import spec as spec_module
from emailqueue_operator.scaling import PolicyState, Saturation, ThroughputSample
from emailqueue_operator.spec import parse_spec

CRD_PATH = Path(__file__).resolve().parents[2] / "deploy" / "crds" / "emailqueue.dev_emailqueues.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return loaded


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    (served,) = crd["spec"]["versions"]
    return served  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def root(version: dict[str, Any]) -> dict[str, Any]:
    return version["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its dotted path (array items as ``[]``)."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        yield from walk(extra, f"{path}{{}}")


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural-schema defaulting as the apiserver does it: fill missing properties that have a
    default, then default inside every present object and array item."""
    if isinstance(value, dict):
        result = dict(value)
        for name, child in schema.get("properties", {}).items():
            if name not in result and "default" in child:
                result[name] = copy.deepcopy(child["default"])
            if name in result:
                result[name] = apply_defaults(child, result[name])
        return result
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def test_names_scope_and_subresources(crd: dict[str, Any], version: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "emailqueues.emailqueue.dev"
    assert crd["spec"]["group"] == "emailqueue.dev"
    assert crd["spec"]["scope"] == "Namespaced"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == ("EmailQueue", "emailqueues", "emailqueue")
    assert names["shortNames"] == ["eq"] and names["categories"] == ["emailqueue"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_every_field_is_described_for_kubectl_explain(root: dict[str, Any]) -> None:
    undocumented = [path for path, node in walk(root) if path and path != "metadata" and not node.get("description")]
    assert undocumented == []


def test_printer_columns(version: dict[str, Any]) -> None:
    columns = {column["name"]: column["jsonPath"] for column in version["additionalPrinterColumns"]}
    assert columns == {
        "Target": ".spec.scaleTargetRef.name",
        "Backlog": ".status.backlog.total",
        "Rate": ".status.arrivalRate",
        "Replicas": ".status.currentReplicas",
        "Desired": ".status.desiredReplicas",
        "Ready": '.status.conditions[?(@.type=="Ready")].status',
        "Age": ".metadata.creationTimestamp",
    }


@pytest.mark.parametrize(
    "user_spec",
    [
        # the smallest valid object
        {"scaleTargetRef": {"name": "w"}, "broker": {"queue": "q", "amqpSecretRef": {"name": "s", "uriKey": "uri"}}},
        # optional objects present, so their nested defaults apply too
        {
            "scaleTargetRef": {"name": "w"},
            "broker": {"queue": "q", "amqpSecretRef": {"name": "s", "uriKey": "uri"}, "tls": {}},
            "fallback": {"replicas": 2},
            "behavior": {"scaleUp": {}, "scaleDown": {"stabilizationSeconds": 60}},
            "schedule": [{"name": "n", "cron": "0 8 * * *", "durationSeconds": 60, "rate": 5}],
        },
        # an SLO target: backlogPerReplica must stay unset on both sides
        {"scaleTargetRef": {"name": "w"}, "broker": {"queue": "q", "amqpSecretRef": {"name": "s", "uriKey": "uri"}},
         "target": {"drainSeconds": 60}},
    ],
)
def test_crd_defaults_equal_parser_defaults(root: dict[str, Any], user_spec: dict[str, Any]) -> None:
    # What the apiserver stores after defaulting must parse exactly like the sparse dict the
    # simulator (or an object stored before a default existed) hands the parser.
    defaulted = apply_defaults(root["properties"]["spec"], user_spec)
    assert defaulted != user_spec  # defaulting did something
    assert parse_spec(defaulted) == parse_spec(user_spec)


def test_fields_whose_absence_means_something_have_no_schema_default(root: dict[str, Any]) -> None:
    nodes = dict(walk(root))
    # unset vhost: the AMQP URI's vhost (a defaulted "/" would override it)
    assert "default" not in nodes["spec.broker.vhost"]
    assert "wins over" in nodes["spec.broker.vhost"]["description"]
    # unset direction tolerance: behavior.tolerance
    for direction in ("scaleUp", "scaleDown"):
        node = nodes[f"spec.behavior.{direction}.tolerance"]
        assert "default" not in node and "behavior.tolerance" in node["description"]
    # the regex semantics and the no-match choice are documented where users read them
    regex = nodes["spec.broker.queueRegex"]["description"]
    assert "case-insensitive" in regex and "QueueNotFound" in regex


def test_backlog_per_replica_has_no_schema_default(root: dict[str, Any]) -> None:
    # Its default (20) is conditional on no SLO target being set, which only the parser can do.
    node = root["properties"]["spec"]["properties"]["target"]["properties"]["backlogPerReplica"]
    assert "default" not in node
    assert "20" in node["description"]


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("spec.scaleTargetRef.kind", spec_module.TARGET_KINDS),
        ("spec.broker.aggregate", spec_module.AGGREGATES),
        ("spec.behavior.scaleUp.selectPolicy", spec_module.SELECT_POLICIES),
        ("spec.behavior.scaleDown.selectPolicy", spec_module.SELECT_POLICIES),
        ("spec.behavior.scaleUp.policies[].type", spec_module.POLICY_TYPES),
        ("spec.behavior.scaleDown.policies[].type", spec_module.POLICY_TYPES),
        ("spec.fallback.mode", spec_module.FALLBACK_MODES),
    ],
)
def test_enums_match_parser(root: dict[str, Any], path: str, allowed: tuple[str, ...]) -> None:
    nodes = dict(walk(root))
    assert tuple(nodes[path]["enum"]) == allowed


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("spec.replicas.min", "integer"),
        ("spec.replicas.max", "integer"),
        ("spec.replicas.activationBacklog", "integer"),
        ("spec.target.backlogPerReplica", "number"),
        ("spec.target.ratePerReplica", "number"),
        ("spec.target.maxSendRate", "number"),
        ("spec.behavior.tolerance", "number"),
        ("spec.behavior.scaleUp.tolerance", "number"),
        ("spec.behavior.scaleDown.tolerance", "number"),
        ("spec.behavior.pollSeconds", "integer"),
        ("spec.fallback.replicas", "integer"),
        ("spec.schedule[].start", "string"),
        ("status.lastDecision.terms{}", "number"),
    ],
)
def test_counts_are_integers_and_rates_numbers(root: dict[str, Any], path: str, kind: str) -> None:
    assert dict(walk(root))[path]["type"] == kind


def test_cel_rules_have_messages_and_bounded_inputs(root: dict[str, Any]) -> None:
    rules = [(path, rule) for path, node in walk(root) for rule in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 10
    for path, rule in rules:
        assert rule.get("message"), f"{path}: rule {rule['rule']!r} has no message"
    # Cost estimation multiplies by list sizes: every list holding rule-checked items is bounded.
    for path, node in walk(root):
        if node.get("type") == "array" and "x-kubernetes-validations" in node.get("items", {}):
            assert "maxItems" in node, path


def test_cross_field_rules_present(root: dict[str, Any]) -> None:
    rules = {rule["rule"] for _, node in walk(root) for rule in node.get("x-kubernetes-validations", [])}
    assert "!has(self.min) || !has(self.max) || self.min <= self.max" in rules
    assert "has(self.queue) != has(self.queueRegex)" in rules
    assert "has(self.uriKey) != has(self.hostKey)" in rules
    assert "!has(self.start) || !has(self.end) || self.end > self.start" in rules
    # KEDA rejects useRegex without the HTTP API when it parses the trigger; we do at admission
    assert "!has(self.queueRegex) || has(self.managementSecretRef) || has(self.prometheusSecretRef)" in rules


def test_direction_tolerance_bounds_match_parser(root: dict[str, Any]) -> None:
    nodes = dict(walk(root))
    for direction in ("scaleUp", "scaleDown"):
        node = nodes[f"spec.behavior.{direction}.tolerance"]
        assert (node["minimum"], node["maximum"]) == (0, spec_module.MAX_DIRECTION_TOLERANCE)


def test_list_maps(root: dict[str, Any]) -> None:
    nodes = dict(walk(root))
    assert nodes["status.conditions"]["x-kubernetes-list-type"] == "map"
    assert nodes["status.conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert nodes["status.conditions[].status"]["enum"] == ["True", "False", "Unknown"]
    assert nodes["spec.schedule"]["x-kubernetes-list-map-keys"] == ["name"]


def schema_keys(node: dict[str, Any]) -> Any:
    if node.get("type") == "array":
        return [schema_keys(node["items"])]
    if "properties" in node:
        return {name: schema_keys(child) for name, child in node["properties"].items()}
    return None


def value_keys(value: Any) -> Any:
    if isinstance(value, list):
        return [value_keys(value[0])]
    if isinstance(value, dict):
        return {name: value_keys(child) for name, child in value.items()}
    return None


def test_status_policy_schema_matches_policy_state(root: dict[str, Any]) -> None:
    # Status fields the schema omits are pruned silently: the restart-safe state would vanish.
    sample = ThroughputSample(1.0, 4, 40.0)
    state = PolicyState(
        recommendations=((1.0, 3),),
        scale_events=((1.0, 1),),
        last_active_at=1.0,
        learned_rate=10.0,
        consecutive_failures=1,
        fleet_replicas=4,
        fleet_since=1.0,
        throughput_baseline=sample,
        saturation=Saturation(2.0, sample, ThroughputSample(2.0, 6, 41.0)),
        last_backlog=10,
        last_at=1.0,
    )
    policy_schema = root["properties"]["status"]["properties"]["policy"]
    assert schema_keys(policy_schema) == value_keys(state.to_status())


def test_status_has_every_field_the_operator_writes(root: dict[str, Any]) -> None:
    status = root["properties"]["status"]["properties"]
    assert set(status) >= {
        "observedGeneration",
        "backlog",
        "consumers",
        "arrivalRate",
        "ackRate",
        "ratePerReplica",
        "oldestMessageAgeSeconds",
        "currentReplicas",
        "desiredReplicas",
        "lastScaleTime",
        "lastDecision",
        "consecutiveFailures",
        "policy",
        "conditions",
    }
    assert set(status["backlog"]["properties"]) == {"ready", "unacked", "total"}
    assert set(status["lastDecision"]["properties"]) == {"replicas", "reason", "at", "terms", "limits"}
