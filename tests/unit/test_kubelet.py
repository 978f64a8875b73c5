"""The local kubelet's pure policy: which pods go, how many come, what status it reports.

These decide what the operator sees on the test bed (readyReplicas) and which workers get
SIGTERM on a scale-down, so a mistake here shows up as a wrong closed-loop result.
"""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from emailqueue_testbed.kubelet import (
    PENDING,
    READY,
    STARTING,
    TERMINATING,
    PodView,
    deployment_status,
    pods_to_create,
    pods_to_delete,
    restart_delay,
)


def pod(name: str, created: float, phase: str = READY) -> PodView:
    return PodView(name=name, created_at=created, phase=phase)


def test_scale_down_stops_the_newest_ready_pods_first():
    pods = [pod("w-001", 1), pod("w-002", 2), pod("w-003", 3)]
    assert pods_to_delete(pods, 1) == ("w-003", "w-002")


def test_scale_down_drops_pods_that_are_not_ready_before_working_ones():
    # A pending pod (not even spawned) and a starting one go before any ready worker,
    # even though the ready one is the newest: a ready worker is sending mail.
    pods = [pod("w-001", 1, PENDING), pod("w-002", 2, STARTING), pod("w-003", 3, READY)]
    assert pods_to_delete(pods, 1) == ("w-001", "w-002")


def test_equal_creation_times_fall_back_to_the_higher_serial():
    pods = [pod("w-001", 5), pod("w-002", 5)]
    assert pods_to_delete(pods, 1) == ("w-002",)


def test_terminating_pods_are_neither_stopped_again_nor_counted():
    pods = [pod("w-001", 1), pod("w-002", 2, TERMINATING)]
    assert pods_to_delete(pods, 1) == ()
    # Desired 2 with one terminating: a replacement is created (as the ReplicaSet does).
    assert pods_to_create(pods, 2) == 1


def test_nothing_to_do_at_the_desired_count():
    pods = [pod("w-001", 1), pod("w-002", 2)]
    assert pods_to_delete(pods, 2) == () and pods_to_create(pods, 2) == 0


def test_status_counts_ready_and_excludes_terminating():
    pods = [pod("a", 1, READY), pod("b", 2, STARTING), pod("c", 3, PENDING), pod("d", 0, TERMINATING)]
    assert deployment_status(pods, generation=7) == {
        "replicas": 3, "updatedReplicas": 3, "readyReplicas": 1, "availableReplicas": 1,
        "unavailableReplicas": 2, "observedGeneration": 7}


def test_status_of_an_empty_deployment():
    assert deployment_status([], None) == {"replicas": 0, "updatedReplicas": 0, "readyReplicas": 0,
                                           "availableReplicas": 0, "unavailableReplicas": 0}


def test_crash_loop_backoff_doubles_and_is_capped():
    assert [restart_delay(n) for n in range(6)] == [0.0, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert restart_delay(50) == 10.0


PHASES = st.sampled_from([PENDING, STARTING, READY, TERMINATING])
PODS = st.lists(st.tuples(st.floats(0, 100), PHASES), max_size=12).map(
    lambda items: [pod(f"w-{i:03d}", created, phase) for i, (created, phase) in enumerate(items)])


@settings(max_examples=200, deadline=None)
@given(pods=PODS, desired=st.integers(0, 15))
def test_one_reconcile_step_reaches_the_desired_live_count(pods, desired):
    deleted = set(pods_to_delete(pods, desired))
    live = [p for p in pods if p.phase != TERMINATING and p.name not in deleted]
    created = pods_to_create(pods, desired)
    # Never both create and delete in one step, and the result is exactly `desired` live pods.
    assert not (deleted and created)
    assert len(live) + created == desired
    assert all(p.phase != TERMINATING for p in pods if p.name in deleted)


@settings(max_examples=200, deadline=None)
@given(pods=PODS, desired=st.integers(0, 15))
def test_a_ready_pod_is_never_stopped_while_a_not_ready_one_survives(pods, desired):
    deleted = set(pods_to_delete(pods, desired))
    survivors = [p for p in pods if p.phase != TERMINATING and p.name not in deleted]
    if any(p.phase == READY for p in pods if p.name in deleted):
        assert all(p.phase == READY for p in survivors)
