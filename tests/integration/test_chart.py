"""The Helm chart and the deploy/ manifests against the test bed's real kube-apiserver.

`helm lint --strict`; `helm template` output and every deploy/ Kustomization pass
`kubectl apply --dry-run=server` (admission included: the pods meet the "restricted" Pod
Security Standard, checked through the namespace's warn label); `helm install` creates the
RBAC and Deployments (no kubelet here, so no pod runs: objects are checked, not pods);
values.schema.json turns typos and wrong types into install failures. Each test uses its own
release and namespace; cluster-scoped objects are removed by `helm uninstall`. Installs here
set crds.install=false: the test bed's CRD is shared (applied from deploy/crds) and one Helm
release may own it; test_chart_upgrade.py installs and upgrades the CRD under a private group.
"""
from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from emailqueue_testbed import state

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "emailqueue-operator"
DEPLOY = REPO / "deploy"
PSA_WARNING = "would violate PodSecurity"

# Minimal stand-ins for the Prometheus Operator CRDs, so ServiceMonitor/PrometheusRule objects
# can be dry-run and installed on a bare apiserver. Created only when absent.
MONITORING_CRD_STUB = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {plural}.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {{kind: {kind}, plural: {plural}, singular: {singular}, listKind: {kind}List}}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}
"""


def helm_env(kube_env: Any, home: Path) -> dict[str, str]:
    env = kube_env.env()
    # Helm's cache/config/data inside the test's temp dir: no state shared with the user's helm.
    # KUBECACHEDIR: helm's discovery cache apart from kubectl's (~/.kube/cache), so a CRD a chart test
    # installs in a group of its own never makes `kubectl get emailqueue` ambiguous for later tests.
    env.update(HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
               HELM_DATA_HOME=str(home / "data"), KUBECACHEDIR=str(home / "kube-cache"))
    return env


@pytest.fixture(scope="session")
def helm(kube_env: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the pinned helm against the test bed: helm("install", ..., check=True)."""
    binary = str(state.binary("helm"))
    env = helm_env(kube_env, tmp_path_factory.mktemp("helm"))

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=180)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    return run


@pytest.fixture(scope="session")
def monitoring_crds(kube_env: Any) -> None:
    for kind, plural in (("ServiceMonitor", "servicemonitors"), ("PrometheusRule", "prometheusrules")):
        if kube_env.kubectl("get", "crd", f"{plural}.monitoring.coreos.com", check=False).returncode != 0:
            kube_env.kubectl("apply", "-f", "-", input=MONITORING_CRD_STUB.format(
                kind=kind, plural=plural, singular=kind.lower()))
        kube_env.kubectl("wait", "--for=condition=Established", f"crd/{plural}.monitoring.coreos.com",
                         "--timeout=60s")


@pytest.fixture
def restricted_namespace(kube_env: Any, namespace: str) -> str:
    """The test namespace, warning on anything that breaks the restricted Pod Security Standard."""
    kube_env.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/warn=restricted",
                     "pod-security.kubernetes.io/warn-version=latest")
    return namespace


@pytest.fixture
def release(helm: Callable[..., subprocess.CompletedProcess[str]], namespace: str) -> Iterator[str]:
    """A unique release name, uninstalled afterwards (its ClusterRole/Binding are cluster-scoped)."""
    name = f"eq{uuid.uuid4().hex[:8]}"
    yield name
    helm("uninstall", name, "-n", namespace, "--wait=false", check=False)


# `helm template` checks kubeVersion against a default cluster version: v1.20.0 in the test bed's
# helm (built without upstream's k8sVersion ldflags). Name the test bed's.
KUBE_VERSION = ["--kube-version", "1.36.0"]
# The shared test bed's CRD belongs to no release (see the module docstring).
SHARED_CRD = ["--set", "crds.install=false"]


def chart_meta() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))


def full_values(namespace: str) -> list[str]:
    """--set flags turning every optional part on."""
    return ["--set", "worker.enabled=true", "--set", "worker.smtp.host=smtp.example.com",
            "--set", "worker.amqpSecret.name=rabbitmq", "--set", "worker.smtp.credentialsSecret.name=smtp",
            "--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true",
            "--set", "dashboard.enabled=true", "--set", f"rbac.secretNamespaces={{{namespace}}}"]


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def rehome(docs: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """deploy/ targets namespaces emailqueue-system and email: move everything into the test's."""
    moved = []
    for doc in docs:
        if doc["kind"] == "Namespace":
            continue
        if doc["metadata"].get("namespace") or doc["kind"] not in ("ClusterRole", "ClusterRoleBinding",
                                                                     "CustomResourceDefinition"):
            doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects", []):
            subject["namespace"] = namespace
        moved.append(doc)
    return moved


def dry_run_server(kube_env: Any, docs: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    result = kube_env.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(docs), check=False)
    assert result.returncode == 0, result.stderr
    return result


# --- lint and schema -------------------------------------------------------------------

def test_helm_lint_strict(helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    helm("lint", "--strict", str(CHART))
    helm("lint", "--strict", str(CHART), *full_values("email"))


@pytest.mark.parametrize("flag, message", [
    ("operator.logFromat=json", "additional properties 'logFromat' not allowed"),
    ("workerr.enabled=true", "additional properties 'workerr' not allowed"),
    ("operator.metricsPort=eighty", "want integer"),
    ("worker.smtp.tls=ssl", "value must be one of"),
], ids=["misspelled-nested", "misspelled-top", "wrong-type", "bad-enum"])
def test_schema_rejects_bad_values_on_install(helm: Callable[..., subprocess.CompletedProcess[str]],
                                              namespace: str, release: str, flag: str, message: str) -> None:
    result = helm("install", release, str(CHART), "-n", namespace, *SHARED_CRD, "--set", flag, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert helm("status", release, "-n", namespace, check=False).returncode != 0, "nothing may be installed"


def test_worker_grace_period_shorter_than_drain_is_refused(helm: Callable[..., subprocess.CompletedProcess[str]],
                                                           namespace: str) -> None:
    result = helm("template", "x", str(CHART), *KUBE_VERSION, "-n", namespace, *full_values(namespace),
                  "--set", "worker.terminationGracePeriodSeconds=40", check=False)
    assert result.returncode != 0
    assert "must exceed worker.graceSeconds + worker.smtp.timeoutSeconds" in result.stderr


# --- rendered objects -------------------------------------------------------------------

def test_rendered_pods_are_locked_down(helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    docs = documents(helm("template", "x", str(CHART), *KUBE_VERSION, "-n", "email", *full_values("email")).stdout)
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"x-emailqueue-operator", "x-emailqueue-operator-worker"}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 65532, "the images' USER"
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert context["seccompProfile"]["type"] == "RuntimeDefault", name
            assert "runAsUser" not in context, "UIDs are set once, in podSecurityContext"
            assert container["image"].endswith(f":{chart_meta()['appVersion']}"), "image tag defaults to appVersion"
            assert container["livenessProbe"] and container["readinessProbe"]
            assert container["resources"]["requests"]
    worker = deployments["x-emailqueue-operator-worker"]["spec"]
    env = {e["name"]: e.get("value") for e in worker["template"]["spec"]["containers"][0]["env"]}
    assert worker["template"]["spec"]["terminationGracePeriodSeconds"] > \
        float(env["GRACE_SECONDS"]) + float(env["SMTP_TIMEOUT"])
    assert "replicas" not in worker, "the operator owns the worker's replica count"
    assert deployments["x-emailqueue-operator"]["spec"]["replicas"] == 2, "a leader and a follower"


def test_network_policies_admit_only_metrics(helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    docs = documents(helm("template", "x", str(CHART), *KUBE_VERSION, "-n", "email", *full_values("email")).stdout)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert len(policies) == 2
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        assert [port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]] == ["metrics"]
        assert policy["spec"]["egress"] == [{}]


def test_operator_scrape_keeps_the_emailqueue_namespace_label(
        helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    docs = documents(helm("template", "x", str(CHART), *KUBE_VERSION, "-n", "email", *full_values("email")).stdout)
    monitor = next(d for d in docs
                   if d["kind"] == "ServiceMonitor" and d["metadata"]["name"] == "x-emailqueue-operator")
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True


# --- against the apiserver --------------------------------------------------------------

def test_helm_template_passes_server_dry_run(kube_env: Any, helm: Callable[..., subprocess.CompletedProcess[str]],
                                            crds: None, monitoring_crds: None, restricted_namespace: str) -> None:
    namespace = restricted_namespace
    for extra in ([], ["--set", f"operator.watchNamespaces={{{namespace}}}"]):
        rendered = helm("template", f"dry{uuid.uuid4().hex[:6]}", str(CHART), *KUBE_VERSION, "-n", namespace,
                        *full_values(namespace), *extra).stdout
        result = dry_run_server(kube_env, documents(rendered))
        assert PSA_WARNING not in result.stderr, result.stderr


@pytest.mark.parametrize("folder", ["", "operator", "operator/namespaced", "worker", "rabbitmq", "monitoring"])
def test_deploy_kustomization_passes_server_dry_run(kube_env: Any, crds: None, monitoring_crds: None,
                                                    restricted_namespace: str, folder: str) -> None:
    rendered = kube_env.kubectl("kustomize", str(DEPLOY / folder)).stdout
    docs = rehome(documents(rendered), restricted_namespace)
    assert docs
    result = dry_run_server(kube_env, docs)
    assert PSA_WARNING not in result.stderr, result.stderr


def test_helm_install_creates_rbac_and_deployments(kube_env: Any, helm: Callable[..., subprocess.CompletedProcess[str]],
                                                   crds: None, monitoring_crds: None, namespace: str,
                                                   release: str) -> None:
    result = helm("install", release, str(CHART), "-n", namespace, *full_values(namespace), *SHARED_CRD)
    assert "kubectl get eq" in result.stdout, "NOTES tell the user how to check it works"
    fullname = f"{release}-emailqueue-operator"
    kube_env.kubectl("get", "crd", "emailqueues.emailqueue.dev")
    kube_env.kubectl("get", "clusterrole", fullname)
    kube_env.kubectl("get", "clusterrolebinding", fullname)
    kube_env.kubectl("-n", namespace, "get", "serviceaccount", fullname)
    kube_env.kubectl("-n", namespace, "get", "role,rolebinding", f"{fullname}-secrets")
    kube_env.kubectl("-n", namespace, "get", "deployment", fullname, f"{fullname}-worker")
    kube_env.kubectl("-n", namespace, "get", "poddisruptionbudget", fullname, f"{fullname}-worker")
    kube_env.kubectl("-n", namespace, "get", "role,rolebinding", f"{fullname}-leader-election")
    assert "get lease" in result.stdout, "NOTES tell the user how to find the leader"
    kube_env.kubectl("-n", namespace, "get", "networkpolicy", fullname, f"{fullname}-worker")
    kube_env.kubectl("-n", namespace, "get", "servicemonitor", fullname)
    kube_env.kubectl("-n", namespace, "get", "prometheusrule", fullname)
    dashboard = kube_env.kubectl("-n", namespace, "get", "configmap", f"{fullname}-dashboard",
                                 "-o", "jsonpath={.metadata.labels.grafana_dashboard}").stdout
    assert dashboard == "1"

    helm("uninstall", release, "-n", namespace)
    assert kube_env.kubectl("get", "clusterrole", fullname, check=False).returncode != 0
    kube_env.kubectl("get", "crd", "emailqueues.emailqueue.dev")  # not the release's: untouched


def test_rbac_manifests_match_the_chart(kube_env: Any, helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """deploy/operator's ClusterRole and leader-election Role grant the same rules as the chart's
    cluster-wide ClusterRole and Role (release `emailqueue-operator`: the Lease has the same name).
    deploy/render.py writes them from the chart; this checks the result, whatever helm renders."""
    chart_docs = documents(helm("template", "emailqueue-operator", str(CHART), *KUBE_VERSION,
                                "-n", "emailqueue-system").stdout)
    as_set = lambda rules: {(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(sorted(r["verbs"])),  # noqa: E731
                             tuple(r.get("resourceNames", ()))) for r in rules}
    for kind, plain_file in (("ClusterRole", "clusterrole.yaml"), ("Role", "base/leader-election-role.yaml")):
        chart_rules = next(d for d in chart_docs if d["kind"] == kind)["rules"]
        plain = yaml.safe_load((DEPLOY / "operator" / plain_file).read_text(encoding="utf-8"))["rules"]
        assert as_set(chart_rules) == as_set(plain), kind
    roles = [d["metadata"]["name"] for d in chart_docs if d["kind"] == "Role"]
    assert roles == ["emailqueue-operator-leader-election"], "the default install's only Role is the Lease's"

