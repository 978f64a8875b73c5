"""The test bed's real single-node cluster (issue 13): it runs pods, and `cluster down` leaves
the machine as it found it — no process, mount, cgroup, network namespace, link or host path
of ours, and the global sysctls the kubelet wants to change unchanged.

Marked `cluster`: `make e2e-cluster` runs it (root, runc, the CNI plugins and the cluster's
binaries are needed; `make cluster-deps` installs and builds them).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from emailqueue_testbed import cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

SYSCTLS = [Path("/proc/sys", name) for name in cluster.SHIELDED_SYSCTLS]


def _host_snapshot() -> dict[str, object]:
    with open("/proc/self/mountinfo") as mounts:
        points = sorted(line.split()[4] for line in mounts)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {
        "sysctls": {str(p): p.read_text() for p in SYSCTLS},
        "mounts": points,
        "links": sorted(line.split(":")[1].strip() for line in links.splitlines()),
        "cgroups": sorted(str(p) for root in cluster.controllers() for p in root.iterdir() if p.is_dir()),
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else [],
    }


def test_a_pod_runs_and_cluster_down_leaves_nothing_behind(tmp_path):
    assert cluster.leftovers() == [], "a cluster of an earlier run is still here: make cluster-down"
    before = _host_snapshot()
    images = [Path(p) for p in os.environ.get("EQ_CLUSTER_TEST_IMAGES", "").split() if p]
    try:
        record = cluster.up(images)
        nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json"))["items"]
        assert [n["metadata"]["name"] for n in nodes] == [cluster.NODE_NAME]
        ready = {c["type"]: c["status"] for c in nodes[0]["status"]["conditions"]}
        assert ready["Ready"] == "True", nodes[0]["status"]["conditions"]
        assert nodes[0]["status"]["nodeInfo"]["kubeletVersion"] == cluster.state.versions()["KUBERNETES_VERSION"]
        # A pod from the pause image (always imported): created, scheduled, started by containerd,
        # given an address on the node's bridge.
        cluster.kubectl("run", "probe", "--image", cluster.PAUSE_IMAGE, "--image-pull-policy", "Never",
                        "--restart", "Never")
        cluster.kubectl("wait", "--for=condition=Ready", "pod/probe", "--timeout=120s", timeout=130)
        pod = json.loads(cluster.kubectl("get", "pod", "probe", "-o", "json"))
        assert pod["status"]["podIP"].startswith("10.88."), pod["status"]
        assert pod["spec"]["nodeName"] == cluster.NODE_NAME
        # While it runs, the machine's own settings are still the machine's.
        assert {str(p): p.read_text() for p in SYSCTLS} == before["sysctls"]
        assert record.facts["up_seconds"] > 0
    finally:
        cluster.down()
    assert cluster.leftovers() == []
    after = _host_snapshot()
    assert after == before
