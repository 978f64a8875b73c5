"""`helm template` renders monitoring that watches the operator it installs, whatever it is called.

The ServiceMonitor gives the operator's scrape job (its `jobLabel` label on the selected
Service, else the Service's name, as the Prometheus Operator does); the rendered
EmailQueueOperatorDown rule and the dashboard's "operator up" query must match exactly that
job, or the critical alert fires forever. Renders only (no cluster), with the test bed's
cached helm binary ($HELM overrides it); skipped when it is not built (`make testbed-bins`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from emailqueue_testbed import state

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "emailqueue-operator"
MONITORING = ["--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true",
              "--set", "dashboard.enabled=true", "--set", "worker.enabled=true",
              "--set", "worker.smtp.host=smtp.example.com", "--set", "worker.amqpSecret.name=rabbitmq"]

# `helm template` checks Chart.yaml's kubeVersion against a default cluster version, which the test
# bed's helm (built without upstream's k8sVersion ldflags) has at v1.20.0: name a supported one.
KUBE_VERSION = ["--kube-version", "1.29.0"]

_UP_SELECTOR = re.compile(r'\bup\{([^}]*)\}')
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def _helm() -> str:
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    try:
        return str(state.binary("helm"))
    except state.TestbedError as exc:
        pytest.skip(str(exc))


def render(release: str, *values: str) -> list[dict[str, Any]]:
    result = subprocess.run([_helm(), "template", release, str(CHART), "--namespace", "mail", *KUBE_VERSION,
                             *MONITORING, *values],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def operator_job(docs: list[dict[str, Any]]) -> str:
    """The `job` label Prometheus gives the operator's targets through the rendered ServiceMonitor."""
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"
                and d["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == "operator"]
    assert len(monitors) == 1, "expected one operator ServiceMonitor"
    monitor = monitors[0]["spec"]
    services = [d for d in docs if d["kind"] == "Service"
                and monitor["selector"]["matchLabels"].items() <= d["metadata"].get("labels", {}).items()]
    assert len(services) == 1, "the operator ServiceMonitor must select exactly the operator Service"
    service = services[0]["metadata"]
    if "jobLabel" in monitor:
        return service["labels"][monitor["jobLabel"]]
    return service["name"]


def up_selectors_match(expr: str, job: str) -> list[bool]:
    """For every `up{...}` selector in expr: does it select a target with this job?"""
    results = []
    for selector in _UP_SELECTOR.findall(expr):
        ok = True
        for label, op, value in _MATCHER.findall(selector.replace('\\"', '"')):
            if label != "job":
                continue
            matched = re.fullmatch(value, job) is not None if op in ("=~", "!~") else value == job
            ok = ok and (matched if op in ("=", "=~") else not matched)
        results.append(ok)
    return results


def operator_down_expr(docs: list[dict[str, Any]]) -> str:
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    return next(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]
                if r.get("alert") == "EmailQueueOperatorDown")


def dashboard_operator_up_exprs(docs: list[dict[str, Any]]) -> list[str]:
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and "emailqueue-overview.json" in d.get("data", {}))
    dashboard = json.loads(configmap["data"]["emailqueue-overview.json"])
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if _UP_SELECTOR.search(t["expr"])]


@pytest.mark.parametrize("release, values", [
    ("x", ["--set", "fullnameOverride=x"]),                       # the reported bug: no chart name in the Service
    ("mail", []),                                                 # <release>-emailqueue-operator
    ("emailqueue-operator", []),                                  # release name alone
    ("prod", ["--set", "fullnameOverride=notifications-scaler"]),
    ("prod", ["--set", "nameOverride=mail-op"]),                  # the one value that changes the job
], ids=["fullnameOverride=x", "release-prefix", "release-is-chart", "fullnameOverride-other", "nameOverride"])
def test_operator_down_rule_matches_the_rendered_scrape_job(release: str, values: list[str]) -> None:
    docs = render(release, *values)
    job = operator_job(docs)
    expr = operator_down_expr(docs)
    matches = up_selectors_match(expr, job)
    assert matches and all(matches), f"EmailQueueOperatorDown ({expr!r}) does not select the operator's job {job!r}"
    # ... and only it: a worker target must not count as a healthy operator.
    assert not any(up_selectors_match(expr, "x-worker")), expr
    panels = dashboard_operator_up_exprs(docs)
    assert panels, "the dashboard lost its operator up query"
    for panel_expr in panels:
        assert all(up_selectors_match(panel_expr, job)), f"dashboard {panel_expr!r} misses job {job!r}"


def test_worker_job_names_its_deployment() -> None:
    """Worker alerts say `kubectl logs deploy/{{ $labels.job }}`: the job must be the Deployment's name."""
    docs = render("prod", "--set", "fullnameOverride=x")
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor"
                   and d["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == "worker")["spec"]
    assert "jobLabel" not in monitor
    service = next(d for d in docs if d["kind"] == "Service"
                   and monitor["selector"]["matchLabels"].items() <= d["metadata"].get("labels", {}).items())
    deployment = next(d for d in docs if d["kind"] == "Deployment"
                      and d["spec"]["selector"]["matchLabels"] == monitor["selector"]["matchLabels"])
    assert service["metadata"]["name"] == deployment["metadata"]["name"] == "x-worker"


# --- HA: two replicas, one leader --------------------------------------------------------

def _operator(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Deployment"
                and d["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == "operator")


def test_default_operator_runs_two_replicas_with_a_leader_a_pdb_and_a_spread() -> None:
    docs = render("prod")
    deployment = _operator(docs)
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["type"] == "RollingUpdate", "Recreate is only needed without a leader election"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    container = spec["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--leader-elect" in args and f"--leader-election-id={deployment['metadata']['name']}" in args
    assert {"--leader-elect-lease-duration=15", "--leader-elect-renew-deadline=10",
            "--leader-elect-retry-period=2"} <= set(args)
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env["POD_NAME"] == "metadata.name" and env["POD_NAMESPACE"] == "metadata.namespace"
    spread = spec["template"]["spec"]["topologySpreadConstraints"]
    assert spread == [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
                       "labelSelector": {"matchLabels": spec["selector"]["matchLabels"]}}]
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget"
               and d["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"])
    assert pdb["spec"]["maxUnavailable"] == 1
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-leader-election"))
    assert role["metadata"]["namespace"] == "mail"
    assert {(tuple(r["verbs"]), tuple(r.get("resourceNames", ()))) for r in role["rules"]} == {
        (("create",), ()), (("get", "update"), (deployment["metadata"]["name"],))}
    binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["roleRef"]["name"] == role["metadata"]["name"])
    assert binding["subjects"][0]["name"] == spec["template"]["spec"]["serviceAccountName"]


def test_single_replica_without_election_has_no_pdb_or_lease_role() -> None:
    docs = render("prod", "--set", "operator.replicaCount=1", "--set", "operator.leaderElection.enabled=false",
                  "--set", "operator.topologySpreadConstraints=null")
    spec = _operator(docs)["spec"]
    assert spec["replicas"] == 1 and "--leader-elect" not in spec["template"]["spec"]["containers"][0]["args"]
    assert "topologySpreadConstraints" not in spec["template"]["spec"]
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"
                and d["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]]
    assert not [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-leader-election")]


@pytest.mark.parametrize("values, message", [
    (["operator.replicaCount=2", "operator.leaderElection.enabled=false"], "needs operator.leaderElection.enabled"),
    (["operator.leaderElection.renewDeadline=20"], "retryPeriod < renewDeadline < leaseDuration"),
], ids=["replicas-without-election", "deadline-above-lease"])
def test_unsafe_ha_settings_are_refused(values: list[str], message: str) -> None:
    flags = [arg for value in values for arg in ("--set", value)]
    result = subprocess.run([_helm(), "template", "x", str(CHART), *KUBE_VERSION, *flags], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr


def test_chart_refuses_clusters_without_cel_validation() -> None:
    result = subprocess.run([_helm(), "template", "x", str(CHART), "--kube-version", "1.24.9"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "chart requires kubeVersion: >=1.25.0-0" in result.stderr


def test_crd_is_a_kept_template_behind_crds_install() -> None:
    crds = [d for d in render("prod") if d["kind"] == "CustomResourceDefinition"]
    assert [c["metadata"]["name"] for c in crds] == ["emailqueues.emailqueue.dev"]
    assert crds[0]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crds[0]["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert "metricsSource" in json.dumps(crds[0]["spec"])
    assert not [d for d in render("prod", "--set", "crds.install=false") if d["kind"] == "CustomResourceDefinition"]


# --- security context from values (OpenShift) ----------------------------------------------

def _pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"}


def test_pods_run_as_the_images_uid_by_default() -> None:
    pods = _pods(render("prod", "--set", "fullnameOverride=x"))
    assert set(pods) == {"x", "x-worker"}
    for name, pod in pods.items():
        context = pod["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (65532, 65532, 65532), name
        assert context["runAsNonRoot"] is True and context["seccompProfile"] == {"type": "RuntimeDefault"}
        container = pod["containers"][0]["securityContext"]
        assert container["readOnlyRootFilesystem"] is True and container["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("values", [
    ["--values", str(CHART / "values-openshift.yaml")],
    ["--set", "podSecurityContext.runAsUser=null", "--set", "podSecurityContext.runAsGroup=null",
     "--set", "podSecurityContext.fsGroup=null"],
], ids=["values-openshift.yaml", "set-null"])
def test_openshift_values_leave_the_uid_to_the_scc(values: list[str]) -> None:
    """restricted-v2 assigns UID, GID and fsGroup from the namespace's range and rejects pods naming
    others; the rest of the restricted profile stays."""
    pods = _pods(render("prod", *values))
    assert len(pods) == 2
    for name, pod in pods.items():
        contexts = [pod["securityContext"], *(c["securityContext"] for c in pod["containers"])]
        for context in contexts:
            assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(context), name
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


def test_security_context_is_settable() -> None:
    pods = _pods(render("prod", "--set", "podSecurityContext.runAsUser=1000700000",
                        "--set", "securityContext.readOnlyRootFilesystem=false"))
    for pod in pods.values():
        assert pod["securityContext"]["runAsUser"] == 1000700000
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is False


def test_worker_name_can_be_kept_from_deploy() -> None:
    """Moving from deploy/worker to the chart keeps the name the EmailQueue's scaleTargetRef and the
    worker alerts' job use."""
    docs = render("prod", "--set", "worker.fullnameOverride=email-worker")
    worker = [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "worker"]
    assert {(d["kind"], d["metadata"]["name"]) for d in worker} == {
        (kind, "email-worker") for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy",
                                            "ServiceMonitor")}
