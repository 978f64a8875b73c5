"""Invalid EmailQueues are rejected by the real apiserver with a message that says why."""
from __future__ import annotations

import json

import pytest
import yaml

from emailqueue_operator.spec import parse_spec

pytestmark = pytest.mark.integration

BASE = {"scaleTargetRef": {"name": "w"}, "broker": {"queue": "q", "amqpSecretRef": {"name": "s", "uriKey": "uri"}}}


def _with(**changes):
    spec = yaml.safe_load(yaml.safe_dump(BASE))
    for path, value in changes.items():
        node = spec
        keys = path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return spec


CASES = [
    # min above max: a CEL rule
    ("min-above-max", _with(replicas={"min": 5, "max": 2}), "min"),
    # a negative minimum
    ("negative-min", _with(replicas={"min": -1, "max": 2}), "spec.replicas.min"),
    # an absurd maximum
    ("huge-max", _with(replicas={"min": 1, "max": 10_000_000}), "spec.replicas.max"),
    # neither queue nor queueRegex
    ("no-queue", _with(broker__queue=None), "queue"),
    # both queue and queueRegex
    ("both-queues", _with(broker__queueRegex="emails-.*"), "queue"),
    # a target kind the operator cannot scale
    ("wrong-kind", _with(scaleTargetRef={"name": "w", "kind": "DaemonSet"}), "spec.scaleTargetRef.kind"),
    # the target name is required
    ("no-target-name", _with(scaleTargetRef={"kind": "Deployment"}), "name"),
    # an unknown aggregate
    ("bad-aggregate", _with(broker__aggregate="median"), "spec.broker.aggregate"),
    # a zero poll interval
    ("zero-poll", _with(behavior={"pollSeconds": 0}), "spec.behavior.pollSeconds"),
    # a string where a number belongs
    ("string-number", _with(target={"backlogPerReplica": "lots"}), "spec.target.backlogPerReplica"),
]


@pytest.mark.parametrize("name, spec, mentions", CASES, ids=[c[0] for c in CASES])
def test_invalid_emailqueue_is_rejected(kube_env, crds, namespace, name, spec, mentions):
    doc = {"apiVersion": "emailqueue.dev/v1alpha1", "kind": "EmailQueue", "metadata": {"name": name}, "spec": spec}
    result = kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert result.returncode != 0, f"{name} was accepted"
    assert "is invalid" in result.stderr and mentions in result.stderr, result.stderr


def test_valid_minimal_emailqueue_gets_defaults(kube_env, crds, namespace):
    doc = {"apiVersion": "emailqueue.dev/v1alpha1", "kind": "EmailQueue", "metadata": {"name": "ok"}, "spec": BASE}
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(doc))
    obj = json.loads(kube_env.kubectl("-n", namespace, "get", "eq", "ok", "-o", "json").stdout)
    assert obj["spec"]["behavior"]["pollSeconds"] == 5
    assert obj["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert obj["spec"]["replicas"] == {"min": 1, "max": 10, "activationBacklog": 0}
    # With no other target, the operator uses KEDA QueueLength's default of 20 per replica.
    assert parse_spec(obj["spec"]).target.backlog_per_replica == 20


def test_unknown_fields_are_rejected_by_strict_validation(kube_env, crds, namespace):
    doc = {"apiVersion": "emailqueue.dev/v1alpha1", "kind": "EmailQueue", "metadata": {"name": "typo"},
           "spec": {**BASE, "replica": {"max": 3}}}
    result = kube_env.kubectl("-n", namespace, "apply", "--validate=strict", "-f", "-", input=yaml.safe_dump(doc),
                              check=False)
    assert result.returncode != 0 and 'unknown field "spec.replica"' in result.stderr


def test_kubectl_explain_describes_fields(kube_env, crds):
    out = kube_env.kubectl("explain", "emailqueue.spec.target.drainSeconds").stdout
    assert "DESCRIPTION" in out and len(out.split("DESCRIPTION", 1)[1].strip()) > 20


def test_bad_resource_name_is_rejected(kube_env, crds, namespace):
    doc = {"apiVersion": "emailqueue.dev/v1alpha1", "kind": "EmailQueue", "metadata": {"name": "Bad_Name!"},
           "spec": BASE}
    result = kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert result.returncode != 0 and "RFC 1123" in result.stderr, result.stderr


def test_bad_target_and_secret_names_are_rejected(kube_env, crds, namespace):
    spec = yaml.safe_load(yaml.safe_dump(BASE))
    spec["scaleTargetRef"]["name"] = "Not A Name"
    doc = {"apiVersion": "emailqueue.dev/v1alpha1", "kind": "EmailQueue", "metadata": {"name": "badref"},
           "spec": spec}
    result = kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert result.returncode != 0 and "spec.scaleTargetRef.name" in result.stderr, result.stderr
