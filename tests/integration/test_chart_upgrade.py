"""`helm upgrade` from chart v0.1 to the working tree brings the new CRD to the cluster.

v0.1 shipped the CRD in crds/, which Helm installs once and never upgrades, so a field added
since (spec.broker.metricsSource) never reached clusters that installed v0.1. Now the CRD is a
template behind crds.install, kept on uninstall. Chart v0.1 is the chart of the first commit
on main that has one (`git archive`). The test bed's EmailQueue CRD is shared by every test,
so both charts' CRDs are moved to a group of this test's own (the only edit to either chart):
Helm sees exactly what it would see on a cluster with v0.1 installed.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_chart import CHART, REPO, helm, release  # noqa: F401 (shared fixtures)

pytestmark = pytest.mark.integration

Helm = Callable[..., subprocess.CompletedProcess[str]]
CHART_PATH = "charts/emailqueue-operator"


def wait_for_or_false(check: Callable[[], bool], timeout: float) -> bool:
    """Like support.wait_for, but lets the caller report the apiserver's last refusal."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def first_chart_commit() -> str:
    result = subprocess.run(["git", "rev-list", "--reverse", "HEAD", "--", f"{CHART_PATH}/Chart.yaml"], cwd=REPO,
                            capture_output=True, text=True)
    commits = result.stdout.split()
    if result.returncode != 0 or not commits:
        pytest.skip(f"no git history of {CHART_PATH} (shallow clone?): {result.stderr.strip()}")
    return commits[0]


def old_chart(commit: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", commit, CHART_PATH], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / CHART_PATH


def private_group(crd: Path, group: str) -> None:
    crd.write_text(crd.read_text(encoding="utf-8").replace("emailqueue.dev", group), encoding="utf-8")


def emailqueue_with_metrics_source(group: str, name: str) -> str:
    return yaml.safe_dump({
        "apiVersion": f"{group}/v1alpha1", "kind": "EmailQueue", "metadata": {"name": name},
        "spec": {"scaleTargetRef": {"name": "email-worker"},
                 "broker": {"queue": "emails", "metricsSource": "amqp",
                            "amqpSecretRef": {"name": "rabbit", "uriKey": "uri"}}}})


def test_helm_upgrade_from_v0_1_serves_the_new_crd_field(kube_env: Any, helm: Helm, namespace: str, release: str,
                                                          tmp_path: Path) -> None:
    commit = first_chart_commit()
    old = old_chart(commit, tmp_path / "old")
    new = tmp_path / "new" / "emailqueue-operator"
    shutil.copytree(CHART, new)
    group = f"t{uuid.uuid4().hex[:8]}.emailqueue.dev"
    crd_name = f"emailqueues.{group}"
    assert "metricsSource" not in (old / "crds" / "emailqueue.dev_emailqueues.yaml").read_text(), \
        f"the chart of {commit[:8]} already has the field: pick a newer one for this test"
    # This test's kubectl keeps its discovery cache apart: the shared one (~/.kube/cache) must never
    # learn of the private group, or every later `kubectl get emailqueue` is ambiguous until it expires.
    cache = tmp_path / "kubectl-cache"

    def kubectl(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return kube_env.kubectl("--cache-dir", str(cache), *args, **kwargs)

    private_group(old / "crds" / "emailqueue.dev_emailqueues.yaml", group)
    private_group(new / "templates" / "crds" / "emailqueue.dev_emailqueues.yaml", group)
    try:
        helm("install", release, str(old), "-n", namespace)
        assert yaml.safe_load((old / "Chart.yaml").read_text())["version"] == "0.1.0"
        refused = kubectl("-n", namespace, "create", "--dry-run=server", "-f", "-", check=False,
                                   input=emailqueue_with_metrics_source(group, "probe"))
        assert refused.returncode != 0 and "metricsSource" in refused.stderr, "v0.1's CRD must lack the field"

        # Helm does not adopt the CRD v0.1 installed from crds/ unasked (README: upgrade once with --take-ownership).
        plain = helm("upgrade", release, str(new), "-n", namespace, check=False)
        assert plain.returncode != 0 and "invalid ownership metadata" in plain.stderr
        helm("upgrade", release, str(new), "-n", namespace, "--take-ownership")

        errors: list[str] = []

        def created() -> bool:
            result = kubectl("-n", namespace, "apply", "-f", "-", check=False,
                                      input=emailqueue_with_metrics_source(group, "upgraded"))
            errors.append(result.stderr)
            return result.returncode == 0

        assert wait_for_or_false(created, 15), errors[-1]
        stored = json.loads(kubectl("-n", namespace, "get", crd_name, "upgraded", "-o", "json").stdout)
        assert stored["spec"]["broker"]["metricsSource"] == "amqp", "the field must be served, not pruned"
        crd = json.loads(kubectl("get", "crd", crd_name, "-o", "json").stdout)["metadata"]
        assert crd["annotations"]["meta.helm.sh/release-name"] == release
        assert crd["annotations"]["helm.sh/resource-policy"] == "keep"

        helm("upgrade", release, str(new), "-n", namespace)  # owned now: later upgrades need nothing
        helm("uninstall", release, "-n", namespace)
        kubectl("get", "crd", crd_name)  # kept, and with it every EmailQueue
        kubectl("-n", namespace, "get", crd_name, "upgraded")
    finally:
        # Gone before the next test: a kubectl that discovered both groups would find `emailqueue` ambiguous.
        kubectl("delete", "crd", crd_name, "--timeout=60s", check=False)
