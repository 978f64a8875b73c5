"""The operator's liveness and metrics endpoints, as a kubelet and Prometheus reach them."""
from __future__ import annotations

import json
import urllib.request

import pytest

from emailqueue_testbed.state import free_port

from ..exposition import series_names
from .support import wait_for

pytestmark = pytest.mark.integration


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status, resp.read().decode()
    except OSError:
        return 0, ""


def test_liveness_and_metrics_answer(kube_env, crds, namespace, start_operator):
    health_port = free_port()
    operator = start_operator(namespace, "--health-port", str(health_port))
    status, body = wait_for(lambda: (r := _get(f"http://127.0.0.1:{health_port}/healthz"))[0] == 200 and r, 30,
                            "the liveness endpoint")
    assert "brokerConnections" in json.loads(body)["pollers"]
    status, scrape = _get(f"http://127.0.0.1:{operator.metrics_port}/metrics")
    assert status == 200 and "emailqueue_broker_connections" in series_names(scrape)
    operator.stop()
    assert _get(f"http://127.0.0.1:{health_port}/healthz")[0] == 0
