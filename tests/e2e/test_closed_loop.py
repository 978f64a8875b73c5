"""The closed loop under a surge (issue 7): operator + local kubelet + real workers + RabbitMQ + SMTP.

`make demo`'s building blocks (`emailqueue_testbed.demo`) with the `e2e` plan: the
2023-09-20 surge compressed ×1/60 in time (1/s → 20/s for 45 s → 1/s, 90 s in all),
3 emails/s per worker (RATE_LIMIT), ~7 workers needed at the peak, min 1, max 10,
drainSeconds 15, pollSeconds 2, ~4 s pod start-up. About two minutes.

What a user relies on, and the slack allowed for it:
- every published email reaches the SMTP server at least once (none lost);
- no email waits longer than the SLO plus the time to notice and start workers:
  drainSeconds + startup (4 s) + two polls (4 s) + one RabbitMQ stats tick (5 s: a quorum
  queue's counters and rates in the management API move every 5 s) = 28 s; the backlog is
  back to ~0 within the same bound after the surge ends;
- the fleet rises to at least what the peak needs, soon after the surge starts, and
  returns to min afterwards;
- (4.0 run) a Prometheus scrapes the operator, every worker and RabbitMQ with the shipped
  rules loaded (`for:` and windows ×1/60 like the timeline): the congestion alert fires after
  the surge starts and before any email waits longer than the SLO, no critical alert fires
  while the system is healthy, and every query of the shipped dashboard returns data.
"""
from __future__ import annotations

import json

import pytest

from emailqueue_testbed.demo import DemoStack, Endpoints, preset, run_surge, summarize

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(290)]

RABBIT_STATS_TICK_SECONDS = 5.0


# RabbitMQ 3.10.8 read through the management API, and 4.0.x through its Prometheus plugin
# (per-queue counters): the loop must close on both.
@pytest.fixture(params=["3.10-management", "4.0-prometheus"])
def endpoints(request, kube_env) -> Endpoints:
    variant, source = request.param.split("-")
    broker = request.getfixturevalue("rabbitmq" if variant == "3.10" else "rabbitmq4")
    user, password = broker.mgmt_auth
    return Endpoints(kubeconfig=kube_env.kubeconfig, amqp_url=broker.amqp_url(), mgmt_url=broker.mgmt_url,
                     user=user, password=password, prom_url=broker.prom_url if source == "prometheus" else None,
                     broker_metrics_url=broker.prom_url)


def test_surge_is_absorbed_without_loss_and_the_fleet_returns_to_min(endpoints, tmp_path):
    plan = preset("e2e")
    slack = plan.startup_seconds + 2 * plan.poll_seconds + RABBIT_STATS_TICK_SECONDS
    # One Prometheus (on the run whose operator reads the broker's Prometheus plugin, like the
    # demo) is enough to prove the alerts and the dashboard; two on two cores would disturb the
    # loops they watch. (The 3.10 management API's rates blink to 0 for ~3.5 s of every 5 s at the
    # test bed's 1 s statistics interval: an alert's `for:` compressed to 3 s cannot span that.)
    with_prometheus = endpoints.prom_url is not None
    with DemoStack(plan, endpoints, tmp_path, say=print, prometheus=with_prometheus) as stack:
        run = run_surge(stack, settle_timeout=60)
    report = summarize(run)
    shown = json.dumps({k: v for k, v in report.items() if k not in ("scale_events",)}, indent=1, default=str)

    # Every email delivered at least once, none lost.
    assert report["published"] == plan.total_emails(), shown
    assert report["lost"] == 0 and report["delivered"] == report["published"], shown
    assert report["unexpected_receipts"] == 0, shown

    # The SLO, with the slack stated above.
    assert report["time_in_queue_seconds"]["max"] <= plan.drain_seconds + slack, shown
    assert report["drained"] and report["time_to_drain_seconds"] <= plan.drain_seconds + slack, shown

    # The fleet rises with the surge: enough workers, asked for within a poll or two of the
    # broker noticing, and they became ready.
    first_up = next(s.t for s in run.samples if (s.desired or 0) > plan.min_replicas)
    assert plan.surge_start <= first_up <= plan.surge_start + slack, shown
    assert report["peak_replicas_desired"] >= plan.peak_replicas_needed, shown
    assert report["peak_replicas_ready"] >= plan.peak_replicas_needed, shown
    assert any(e["reason"] == "ScaledUp" for e in report["scale_events"]), report["scale_events"]

    # ...and returns to min afterwards, with every surplus worker stopped.
    assert run.settled, shown
    assert report["final_replicas"] == {"desired": plan.min_replicas, "ready": plan.min_replicas}, shown
    assert any(e["reason"] == "ScaledDown" for e in report["scale_events"]), report["scale_events"]
    assert report["kubelet"]["crash"] == 0, "a worker crashed: see the pod logs in " + str(tmp_path / "pods")

    if not with_prometheus:
        return
    # The early warning: the congestion alert fires once the surge is on, before any email has
    # waited longer than the SLO; nothing critical fires while the system is healthy.
    alerting = report["alerting"]
    timeline = json.dumps(alerting, indent=1)
    assert alerting["congestion_firing_at"] is not None, timeline
    assert plan.surge_start < alerting["congestion_firing_at"] < plan.surge_end, timeline
    assert alerting["fired_before_breach"] is True, timeline
    assert alerting["false_critical"] == [], timeline
    assert alerting["annotations"], timeline
    assert not [name for name, text in alerting["annotations"].items() if "<no value>" in json.dumps(text)], timeline
    # Every query of the shipped dashboard answers with data from this run.
    dashboard = report["dashboard"]
    assert dashboard["queries"] >= 20 and not [d for d in dashboard["results"] if d["error"]], dashboard
    assert dashboard["without_data"] == [], dashboard["without_data"]
