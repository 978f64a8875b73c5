"""The demo's pure parts: the compressed surge plan and the report's figures.

`make demo` and `make bench` publish these numbers (lost, duplicates, time in queue,
time to drain, replica-seconds) as the live evidence; they must mean what they say.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from emailqueue_operator.sim import load_scenario
from emailqueue_testbed.demo import (
    QUORUM_STATS_SPEC,
    Sample,
    ScaleEvent,
    SurgePlan,
    SurgeRun,
    job_id_from_message_id,
    percentile,
    preset,
    summarize,
    time_to_drain,
)


def sample(t: float, backlog: int | None = 0, pods: int = 1, ready: int = 1, desired: int | None = 1,
           published: int = 0, received: int = 0, reason: str = "") -> Sample:
    return Sample(t=t, published=published, received=received, backlog_ready=backlog, backlog_unacked=0,
                  desired=desired, pods=pods, ready=ready, reason=reason)


def tiny_plan() -> SurgePlan:
    return SurgePlan(name="tiny", steps=((0.0, 1.0), (10.0, 10.0), (20.0, 1.0)), duration_seconds=30,
                     rate_per_replica=2, pod_start_delay_seconds=1, min_replicas=1, max_replicas=8, drain_seconds=10,
                     poll_seconds=2)


def run_of(plan: SurgePlan, published, receipts, samples, events=()) -> SurgeRun:
    return SurgeRun(plan=plan, started_at=1000.0, published=published, receipts=tuple(receipts),
                    samples=tuple(samples), scale_events=tuple(events), kubelet_events=(), drained=True, settled=True)


# --- the plan ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["full", "quick", "e2e"])
def test_presets_keep_the_incident_shape(name):
    original = load_scenario("incident-2023-09-20")
    plan = preset(name)
    f = plan.compression
    # Same surge, shrunk: base → 20× base → base, with times and rates scaled by the stated factors.
    assert [t for t, _ in plan.steps] == pytest.approx([t * f["time"] for t in original.arrival.times])
    assert [r for _, r in plan.steps] == pytest.approx([r * f["arrival_rate"] for r in original.arrival.rates])
    assert plan.peak_rate / plan.base_rate == pytest.approx(20)
    assert plan.duration_seconds == pytest.approx(original.duration_seconds * f["time"])
    assert plan.min_replicas <= plan.peak_replicas_needed <= plan.max_replicas


def test_the_full_demo_fits_two_cores_and_ten_minutes():
    plan = preset("full")
    # The brief: 2-5 emails/s per worker, ~15-20 workers at the peak, a surge of a few minutes.
    assert 2 <= plan.rate_per_replica <= 5
    assert 15 <= plan.peak_replicas_needed <= 20
    assert 120 <= plan.surge_end - plan.surge_start <= 300
    assert plan.duration_seconds <= 420
    assert preset("quick").duration_seconds <= 150


def test_published_by_is_the_area_under_the_steps():
    plan = tiny_plan()
    assert plan.published_by(0) == 0
    assert plan.published_by(10) == pytest.approx(10)
    assert plan.published_by(15) == pytest.approx(60)
    assert plan.published_by(30) == pytest.approx(10 + 100 + 10)
    assert plan.published_by(99) == plan.published_by(30)  # nothing after the end
    assert plan.total_emails() == 120
    assert (plan.surge_start, plan.surge_end) == (10.0, 20.0)


@settings(max_examples=200, deadline=None)
@given(a=st.floats(-5, 40), b=st.floats(-5, 40))
def test_published_by_never_decreases(a, b):
    plan = tiny_plan()
    lo, hi = sorted((a, b))
    assert plan.published_by(lo) <= plan.published_by(hi) + 1e-9


def test_the_operator_and_the_simulator_get_the_same_spec():
    plan = preset("e2e")
    spec = plan.emailqueue_spec()
    assert spec["scaleTargetRef"]["name"] == "email-worker"
    assert spec["target"]["ratePerReplica"] == plan.rate_per_replica
    assert spec["target"]["drainSeconds"] == plan.drain_seconds
    assert spec["replicas"] == {"min": plan.min_replicas, "max": plan.max_replicas}
    assert spec["behavior"]["pollSeconds"] == plan.poll_seconds
    assert spec["behavior"]["scaleDown"]["stabilizationSeconds"] == \
        QUORUM_STATS_SPEC["behavior"]["scaleDown"]["stabilizationSeconds"]
    assert dict(plan.scenario().spec_overrides) == dict(QUORUM_STATS_SPEC)


# --- the report -------------------------------------------------------------------------

def test_message_ids_map_back_to_job_ids():
    assert job_id_from_message_id("<abc-000001@demo.emailqueue.dev>") == "abc-000001"
    assert job_id_from_message_id("") is None
    assert job_id_from_message_id("abc@x") is None


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0


def test_delivery_accounting_counts_lost_duplicates_and_strays():
    published = {"a": 10.0, "b": 11.0, "c": 12.0}
    receipts = [("a", 10.5), ("b", 14.0), ("a", 20.0), ("zz", 13.0)]  # c lost, a twice, zz never published
    report = summarize(run_of(tiny_plan(), published, receipts, [sample(0), sample(1)]))
    assert (report["published"], report["delivered"], report["lost"]) == (3, 2, 1)
    assert report["duplicates"] == 1 and report["unexpected_receipts"] == 1
    # Time in queue from the first receipt: a 0.5 s, b 3 s (a's duplicate does not count).
    assert report["time_in_queue_seconds"]["max"] == 3.0
    assert report["time_in_queue_seconds"]["p50"] == 0.5


def test_replica_seconds_integrate_pods_over_time():
    samples = [sample(0, pods=2, ready=1), sample(2, pods=4, ready=4), sample(3, pods=1, ready=1)]
    report = summarize(run_of(tiny_plan(), {}, [], samples))
    assert report["replica_seconds"] == pytest.approx(2 * 2 + 4 * 1)
    assert report["ready_replica_seconds"] == pytest.approx(1 * 2 + 4 * 1)


def test_peak_backlog_and_replica_changes_with_reasons():
    samples = [sample(0, backlog=0, desired=1), sample(1, backlog=40, desired=5, reason="drain term"),
               sample(2, backlog=None, desired=5), sample(3, backlog=7, desired=1, reason="idle")]
    events = [ScaleEvent(1.2, "ScaledUp", "1 → 5 replicas: drain term")]
    report = summarize(run_of(tiny_plan(), {}, [], samples, events))
    assert (report["peak_backlog"], report["peak_backlog_at"]) == (40, 1.0)
    assert report["replica_changes"] == [{"at": 1.0, "from": 1, "to": 5, "reason": "drain term"},
                                         {"at": 3.0, "from": 5, "to": 1, "reason": "idle"}]
    assert report["peak_replicas_desired"] == 5
    assert report["scale_events"][0]["reason"] == "ScaledUp"


def test_time_to_drain_counts_from_the_surge_end():
    samples = [sample(t, backlog=b) for t, b in [(18, 50), (20, 30), (22, 9), (24, 1), (26, 0)]]
    assert time_to_drain(samples, surge_end=20, threshold=1) == (4, True)
    assert time_to_drain(samples, surge_end=24, threshold=1) == (0, True)
    assert time_to_drain(samples[:3], surge_end=20, threshold=1) == (2, False)  # never drained: the rest of the run
    assert time_to_drain([sample(10, backlog=None)], surge_end=5, threshold=1) == (None, False)


def test_a_report_carries_the_simulated_prediction_beside_the_live_figures():
    report = summarize(run_of(tiny_plan(), {}, [], [sample(0)]), simulated={"policy": "ours", "peak_backlog": 3})
    assert report["simulated"] == {"policy": "ours", "peak_backlog": 3}
    assert report["scenario"]["compression"] == {}
    assert math.isclose(report["drain_threshold"], 1.0)


def test_an_interrupted_run_reports_undelivered_not_lost():
    plan = tiny_plan()
    run = SurgeRun(plan=plan, started_at=0.0, published={"a": 1.0, "b": 2.0}, receipts=(("a", 1.5),),
                   samples=(sample(0),), scale_events=(), kubelet_events=(), drained=False, settled=False,
                   interrupted=True)
    report = summarize(run)
    # Still queued when Ctrl-C came: not delivered yet, but nothing says it would have been lost.
    assert report["lost"] is None and report["undelivered"] == 1 and report["interrupted"]
