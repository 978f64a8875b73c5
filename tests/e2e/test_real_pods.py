"""The closed loop on real pods (issue 13), marked `kind`: run by `make e2e-cluster` (the test
bed's own kubelet + containerd cluster) and by `make e2e-kind` (kind on a Docker host), after
testbed/e2e-install.sh has installed RabbitMQ, the SMTP sink and the chart with the worker.

The same surge as the test bed's closed-loop test (the 2023-09-20 incident ×1/60: 20/s for 45 s,
3 emails/s per worker, ~7 workers at the peak, min 1, max 10), but every worker is a pod that
the Deployment controller creates, the scheduler places, containerd starts from our image and
the chart's readiness probe admits, and that scale-in stops with SIGTERM.

What a user relies on:
- every published email is delivered (none lost), scale-in included: a pod asked to stop
  finishes or returns what it holds;
- the fleet rises to what the peak needs and those pods become Ready, then returns to min;
- a worker pod stops on SIGTERM well inside its grace period (PID 1 handles the signal;
  the kubelet's SIGKILL at the end of the grace period would cut deliveries short);
- no worker container restarts (no crash, no failed liveness probe).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from emailqueue_testbed import cluster_surge
from emailqueue_testbed.demo_plan import preset

pytestmark = [pytest.mark.kind, pytest.mark.timeout(900)]

REPORT = Path(os.environ.get("EQ_E2E_REPORT", "out/e2e-cluster/report.json"))


@pytest.fixture(scope="module")
def target() -> cluster_surge.Target:
    kubeconfig = os.environ.get("EQ_E2E_KUBECONFIG")
    if not kubeconfig:
        pytest.fail("EQ_E2E_KUBECONFIG is not set: run these tests with `make e2e-cluster` or `make e2e-kind`, "
                    "which install the chart first")
    return cluster_surge.Target(kubeconfig=kubeconfig, kubectl=os.environ.get("EQ_E2E_KUBECTL", "kubectl"),
                                namespace=os.environ.get("EQ_E2E_NAMESPACE", "email"))


def test_surge_on_real_pods_loses_nothing_and_scales_back(target):
    plan = preset("e2e")
    run = cluster_surge.run(target, plan, cluster_surge.credentials(target))
    report = cluster_surge.summarize(run)
    report["cluster"] = os.environ.get("EQ_E2E_CLUSTER", "unknown")
    cluster_surge.write_report(report, REPORT)
    shown = json.dumps({k: v for k, v in report.items() if k != "events"}, indent=1, default=str)
    print(shown)

    # Every email delivered, none lost (scale-in included).
    assert report["published"] == plan.total_emails(), shown
    assert report["lost"] == 0 and report["delivered"] == report["published"], shown

    # The fleet rose to what the peak needs, those pods became Ready, and it came back to min.
    assert report["peak_replicas_desired"] >= plan.peak_replicas_needed, shown
    assert report["peak_replicas_ready"] >= plan.peak_replicas_needed, shown
    assert report["pod_startup_seconds"]["to_ready_max"] is not None, shown
    assert run.settled, shown
    assert any(e["reason"] == "ScaledUp" for e in report["events"]), report["events"]
    assert any(e["reason"] == "ScaledDown" for e in report["events"]), report["events"]

    # Scale-in: pods stopped on SIGTERM, well inside their grace period, not killed at its end.
    scale_in = report["scale_in"]
    assert scale_in["pods_stopped"] >= plan.peak_replicas_needed - plan.min_replicas, shown
    assert scale_in["stop_seconds_max"] < scale_in["grace_seconds"] - 5, shown
    assert set(scale_in["exit_codes_seen"]) <= {0}, shown

    # No worker restarted (no crash, no failed liveness probe).
    assert report["restarts"] == 0, shown
