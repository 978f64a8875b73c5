"""spec.py's Python twins of the CRD's CEL rules agree with the real apiserver (issue 15).

The objects of tests/unit/test_spec_schema.py's CEL_CASES go to a real kube-apiserver with
`kubectl apply --dry-run=server` (full validation, nothing stored): each object breaking a
rule is rejected with the rule's own message, as `parse_spec` rejects it, and each fixed
object is accepted, as `parse_spec` accepts it. One difference is by design: the apiserver
skips CEL rules on an object that already breaks its schema, `parse_spec` reports both.
"""
from __future__ import annotations

from typing import Any

import pytest
import yaml

from emailqueue_operator.spec import SpecError, parse_spec
from tests.unit.test_spec_schema import CEL_CASES, crd_rules

pytestmark = pytest.mark.integration


def _apply(kube_env: Any, namespace: str, name: str, spec: dict[str, Any]) -> Any:
    doc = {"apiVersion": "emailqueue.dev/v1alpha1", "kind": "EmailQueue", "metadata": {"name": name}, "spec": spec}
    return kube_env.kubectl("-n", namespace, "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(doc),
                            check=False)


@pytest.mark.parametrize(
    ("declared_at", "field", "rule", "bad", "fixed"), CEL_CASES, ids=[f"{c[0]}: {c[2]}" for c in CEL_CASES]
)
def test_apiserver_and_parse_spec_agree_on_each_cel_rule(
    kube_env: Any, crds: None, namespace: str,
    declared_at: str, field: str, rule: str, bad: dict[str, Any], fixed: dict[str, Any],
) -> None:
    message = crd_rules()[(declared_at, rule)]
    rejected = _apply(kube_env, namespace, "bad", bad)
    assert rejected.returncode != 0, f"the apiserver accepted an object breaking {rule!r}"
    with pytest.raises(SpecError) as caught:
        parse_spec(bad)
    assert f"{field}: {message}" in caught.value.problems
    if caught.value.problems == [f"{field}: {message}"]:
        assert message in rejected.stderr, rejected.stderr
    else:
        # The apiserver runs CEL rules only on objects its schema accepts (parse_spec reports
        # both at once): e.g. tls.caKey's rule, whose object also lacks the required amqpSecretRef.
        assert "validation rules were not checked" in rejected.stderr, rejected.stderr

    accepted = _apply(kube_env, namespace, "fixed", fixed)
    assert accepted.returncode == 0, accepted.stderr
    parse_spec(fixed)


def test_what_no_schema_can_check_is_left_to_parse_spec(kube_env: Any, crds: None, namespace: str) -> None:
    # A regex Python cannot compile and an impossible cron pass admission; the operator reports them.
    spec = {
        "scaleTargetRef": {"name": "w"},
        "broker": {"queueRegex": "emails(", "amqpSecretRef": {"name": "s", "uriKey": "uri"},
                   "managementSecretRef": {"name": "m", "urlKey": "url"}},
        "schedule": [{"name": "c", "cron": "61 8 * * *", "durationSeconds": 60, "rate": 1}],
    }
    assert _apply(kube_env, namespace, "beyond", spec).returncode == 0
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    assert [problem.split(":")[0] for problem in caught.value.problems] == [
        "spec.broker.queueRegex", "spec.schedule[0].cron"]
