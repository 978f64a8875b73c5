"""The operator's ServiceAccount can do its job and nothing more (`kubectl auth can-i --as`).

Installed by the real chart into the test bed's apiserver (RBAC authorizer on). Checked: it
may read a Deployment and patch its /scale, patch EmailQueues and their status, post Events,
list HPAs; it may not delete anything, create pods, update Deployments beyond /scale, or list
Secrets; in namespaced-Secrets mode it reads Secrets only where allowed; in the Role variant
it scales only in the watched namespace; it may create Leases and get/update only its own, and
only in the release namespace (leader election).
"""
from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.test_chart import CHART, SHARED_CRD, helm, release  # noqa: F401 (shared fixtures)

pytestmark = pytest.mark.integration

Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(autouse=True)
def _emailqueue_crd(crds: None) -> None:
    """`kubectl auth can-i` answers no for a resource discovery does not know: the EmailQueue CRD must
    be there (installs here set crds.install=false), not only when an earlier test applied it."""


@pytest.fixture
def other_namespace(kube_env: Any) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube_env.kubectl("create", "namespace", name)
    yield name
    kube_env.kubectl("delete", "namespace", name, "--wait=false", check=False)


def can_i(kube_env: Any, service_account: str, verb: str, resource: str, namespace: str | None,
          subresource: str | None = None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={service_account}"]
    args += ["-n", namespace] if namespace else []
    args += [f"--subresource={subresource}"] if subresource else []
    result = kube_env.kubectl(*args, check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stderr
    return answer == "yes"


def install(helm: Helm, release: str, namespace: str, *flags: str) -> str:
    helm("install", release, str(CHART), "-n", namespace, *SHARED_CRD, *flags)
    return f"system:serviceaccount:{namespace}:{release}-emailqueue-operator"


def test_cluster_wide_operator_scales_and_cannot_do_more(kube_env: Any, helm: Helm, namespace: str,
                                                         other_namespace: str, release: str) -> None:
    # Secrets only in the operator's own namespace (the namespaced-Secrets mode).
    sa = install(helm, release, namespace, "--set", f"rbac.secretNamespaces={{{namespace}}}")
    for ns in (namespace, other_namespace):
        assert can_i(kube_env, sa, "get", "deployments.apps", ns)
        assert can_i(kube_env, sa, "patch", "deployments.apps", ns, subresource="scale")
        assert can_i(kube_env, sa, "patch", "statefulsets.apps", ns, subresource="scale")
        assert can_i(kube_env, sa, "patch", "emailqueues.emailqueue.dev", ns)
        assert can_i(kube_env, sa, "patch", "emailqueues.emailqueue.dev", ns, subresource="status")
        assert can_i(kube_env, sa, "create", "events", ns)
        assert can_i(kube_env, sa, "create", "events.events.k8s.io", ns)
        assert can_i(kube_env, sa, "list", "horizontalpodautoscalers.autoscaling", ns)
        # what it must never do
        assert not can_i(kube_env, sa, "create", "pods", ns)
        assert not can_i(kube_env, sa, "update", "deployments.apps", ns), "only /scale, never the spec"
        assert not can_i(kube_env, sa, "patch", "deployments.apps", ns), "only /scale, never the spec"
        assert not can_i(kube_env, sa, "list", "secrets", ns)
        assert not can_i(kube_env, sa, "create", "secrets", ns)
        for resource in ("deployments.apps", "emailqueues.emailqueue.dev", "pods", "secrets", "events"):
            assert not can_i(kube_env, sa, "delete", resource, ns), f"may delete {resource}"
    assert can_i(kube_env, sa, "get", "secrets", namespace)
    assert not can_i(kube_env, sa, "get", "secrets", other_namespace), "reads Secrets outside its scope"
    assert can_i(kube_env, sa, "watch", "customresourcedefinitions.apiextensions.k8s.io", None)
    assert can_i(kube_env, sa, "list", "namespaces", None)
    assert not can_i(kube_env, sa, "delete", "customresourcedefinitions.apiextensions.k8s.io", None)
    lease = f"leases.coordination.k8s.io/{release}-emailqueue-operator"
    assert can_i(kube_env, sa, "create", "leases.coordination.k8s.io", namespace)
    assert can_i(kube_env, sa, "get", lease, namespace) and can_i(kube_env, sa, "update", lease, namespace)
    assert not can_i(kube_env, sa, "update", "leases.coordination.k8s.io/someone-elses", namespace)
    assert not can_i(kube_env, sa, "delete", lease, namespace)
    assert not can_i(kube_env, sa, "create", "leases.coordination.k8s.io", other_namespace)
    assert not can_i(kube_env, sa, "create", "clusterrolebindings.rbac.authorization.k8s.io", None)


def test_default_install_reads_secrets_everywhere_but_only_by_name(kube_env: Any, helm: Helm, namespace: str,
                                                                   other_namespace: str, release: str) -> None:
    sa = install(helm, release, namespace)
    assert can_i(kube_env, sa, "get", "secrets", other_namespace)
    assert not can_i(kube_env, sa, "list", "secrets", other_namespace)
    assert not can_i(kube_env, sa, "watch", "secrets", other_namespace)


def test_role_variant_scales_only_in_watched_namespaces(kube_env: Any, helm: Helm, namespace: str,
                                                        other_namespace: str, release: str) -> None:
    sa = install(helm, release, namespace, "--set", f"operator.watchNamespaces={{{namespace}}}")
    assert can_i(kube_env, sa, "patch", "deployments.apps", namespace, subresource="scale")
    assert can_i(kube_env, sa, "get", "secrets", namespace)
    assert can_i(kube_env, sa, "patch", "emailqueues.emailqueue.dev", namespace, subresource="status")
    assert not can_i(kube_env, sa, "patch", "deployments.apps", other_namespace, subresource="scale")
    assert not can_i(kube_env, sa, "get", "secrets", other_namespace)
    assert not can_i(kube_env, sa, "list", "emailqueues.emailqueue.dev", other_namespace)
    args = kube_env.kubectl("-n", namespace, "get", "deployment", f"{release}-emailqueue-operator",
                            "-o", "jsonpath={.spec.template.spec.containers[0].args}").stdout
    assert f"--namespace={namespace}" in args, "the operator must watch what its Roles allow"
