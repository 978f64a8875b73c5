"""deploy/'s operator and worker manifests are the Helm chart, rendered (deploy/render.py).

The sync test renders the chart again with deploy/render.py's value sets and fails, naming each
stale file, when deploy/ differs from it (`make manifests` rewrites them). It needs helm: the test
bed's pinned one (`testbed/build-bins.sh helm`), $HELM or helm on PATH; without one it fails and
says so. The other tests read deploy/ as a user applies it (`kubectl apply -k deploy/...`): what
the chart enforces (a grace period longer than the drain) holds there too, and an existing install
can be re-applied (Deployment selectors are immutable). The rendered objects are checked against a
real kube-apiserver by tests/integration/test_chart.py (server-side dry run of every Kustomization).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _render_module():
    spec = importlib.util.spec_from_file_location("deploy_render", DEPLOY / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


render = _render_module()


def _kustomization_files(folder: str) -> list[Path]:
    """The manifests `kubectl apply -k deploy/<folder>` applies (resources, recursively)."""
    root = DEPLOY / folder
    found: list[Path] = []
    for resource in yaml.safe_load((root / "kustomization.yaml").read_text(encoding="utf-8"))["resources"]:
        path = (root / resource).resolve()
        if path.is_dir():
            found.extend(_kustomization_files(str(path.relative_to(DEPLOY))))
        else:
            found.append(path)
    return found


def _objects(folder: str) -> list[dict[str, Any]]:
    return [doc for path in _kustomization_files(folder)
            for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {len(matches)}"
    return matches[0]


# --- the sync ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered() -> dict[Path, str]:
    try:
        return render.render()
    except render.RenderError as exc:
        pytest.fail(f"deploy/render.py cannot render the chart: {exc}")


def test_deploy_manifests_are_the_rendered_chart(rendered: dict[Path, str]) -> None:
    problems = render.stale(rendered)
    assert not problems, "deploy/ differs from charts/emailqueue-operator, run `make manifests`:\n" + \
        "\n".join(problems)


def test_every_rendered_file_is_applied_by_its_kustomization(rendered: dict[Path, str]) -> None:
    applied = {path for folder in ("operator", "operator/namespaced", "worker")
               for path in _kustomization_files(folder)}
    assert sorted(str(p.relative_to(REPO)) for p in set(rendered) - applied) == []
    for path, content in rendered.items():
        assert content.startswith(render.GENERATED_MARK), path


def test_render_refuses_an_object_without_a_place_in_deploy() -> None:
    """A template added to the chart must get a file in deploy/, not vanish from it."""
    worker = next(v for v in render.VALUE_SETS if v.name == "worker")
    extra = ("---\n# Source: emailqueue-operator/templates/worker/hpa.yaml\n"
             "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata:\n  name: email-worker\n"
             "  namespace: email\n")
    with pytest.raises(render.RenderError, match=r"HorizontalPodAutoscaler.*has no file in deploy/"):
        render.render_value_set(worker, extra)


def test_only_helm_bookkeeping_labels_are_left_out() -> None:
    text = ("apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n  labels:\n    helm.sh/chart: c-1\n"
            "    app.kubernetes.io/name: x\n    app.kubernetes.io/instance: r\n"
            "    app.kubernetes.io/managed-by: Helm\nspec:\n  selector:\n    app.kubernetes.io/name: x\n"
            "    app.kubernetes.io/instance: r\n")
    assert yaml.safe_load(render.strip_helm_labels(text)) == {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "labels": {"app.kubernetes.io/name": "x"}},
        "spec": {"selector": {"app.kubernetes.io/name": "x"}}}


# --- deploy/ as users apply it -------------------------------------------------------------

def test_worker_grace_period_outlasts_the_drain() -> None:
    """On scale-in, in-flight sends finish before SIGKILL: the chart's rule, now in deploy/worker."""
    pod = _one(_objects("worker"), "Deployment", "email-worker")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert pod["terminationGracePeriodSeconds"] > int(env["GRACE_SECONDS"]) + int(env["SMTP_TIMEOUT"])


@pytest.mark.parametrize("folder, name, component", [
    ("operator", "emailqueue-operator", "operator"),
    ("operator/namespaced", "emailqueue-operator", "operator"),
    ("worker", "email-worker", "worker"),
])
def test_selectors_stay_what_existing_installs_have(folder: str, name: str, component: str) -> None:
    """A Deployment's selector is immutable: `kubectl apply -k` over an install of 0.1/0.2's hand-written
    manifests must not change it, and the Service, PDB and NetworkPolicy must select the same pods."""
    objects = _objects(folder)
    selector = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component}
    deployment = _one(objects, "Deployment", name)["spec"]
    assert deployment["selector"] == {"matchLabels": selector}
    assert selector.items() <= deployment["template"]["metadata"]["labels"].items()
    assert _one(objects, "Service", name)["spec"]["selector"] == selector
    assert _one(objects, "PodDisruptionBudget", name)["spec"]["selector"] == {"matchLabels": selector}
    assert _one(objects, "NetworkPolicy", name)["spec"]["podSelector"] == {"matchLabels": selector}


@pytest.mark.parametrize("folder", ["", "operator/namespaced", "worker"])
def test_no_helm_bookkeeping_labels(folder: str) -> None:
    """kubectl, not Helm, manages these objects: a later `helm install` must not mistake them for its own."""
    for obj in _objects(folder):
        labels = obj["metadata"].get("labels", {})
        assert not set(labels) & set(render.HELM_LABELS), (obj["kind"], obj["metadata"]["name"])


def _grants(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def test_namespaced_variant_has_no_cluster_wide_workload_or_secret_rights() -> None:
    objects = _objects("operator/namespaced")
    cluster_rules = _one(objects, "ClusterRole")["rules"]
    for group, resource, verb in (("", "secrets", "get"), ("apps", "deployments/scale", "patch"),
                                  ("emailqueue.dev", "emailqueues", "watch")):
        assert not _grants(cluster_rules, group, resource, verb), (resource, verb)
    in_email = [r for o in objects if o["kind"] == "Role" and o["metadata"].get("namespace") == "email"
                for r in o["rules"]]
    for group, resource, verb in (("", "secrets", "get"), ("apps", "deployments/scale", "patch"),
                                  ("emailqueue.dev", "emailqueues", "watch")):
        assert _grants(in_email, group, resource, verb), (resource, verb)
    args = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=email" in args


@pytest.mark.parametrize("folder", ["operator", "operator/namespaced"])
def test_leader_election_lease_is_the_one_the_role_grants(folder: str) -> None:
    objects = _objects(folder)
    args = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    lease = next(a.split("=", 1)[1] for a in args if a.startswith("--leader-election-id="))
    role = _one(objects, "Role", "emailqueue-operator-leader-election")
    assert [r["resourceNames"] for r in role["rules"] if "update" in r["verbs"]] == [[lease]]
