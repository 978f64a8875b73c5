"""The scaling policy, behaviour by behaviour: KEDA parity, SLO terms, HPA shaping, zero handling,
fallback and downstream saturation. Table-driven; each case says what a user relies on."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC
from typing import Any

import pytest

from emailqueue_operator.scaling import (
    Decision,
    Observation,
    PolicyState,
    Saturation,
    ThroughputSample,
    decide,
)
from emailqueue_operator.spec import EmailQueueSpec, default_spec

NOW = 1_800_000_000.0

# No scale-down stabilization and no rate limits: isolates the demand terms.
UNSHAPED: dict[str, Any] = {
    "scaleDown": {"stabilizationSeconds": 0},
    "scaleUp": {"policies": [{"type": "Percent", "value": 1000, "periodSeconds": 1}]},
}


def make_spec(*, behavior: dict[str, Any] | None = None, **sections: Any) -> EmailQueueSpec:
    sections.setdefault("replicas", {"min": 1, "max": 100})
    return default_spec(behavior=behavior if behavior is not None else UNSHAPED, **sections)


def obs(
    ready: int = 0,
    *,
    current: int = 1,
    unacked: int | None = None,
    consumers: int | None = None,
    publish: float | None = None,
    ack: float | None = None,
    age: float | None = None,
    ready_replicas: int | None = None,
) -> Observation:
    return Observation(
        ok=True,
        error=None,
        ready=ready,
        unacked=unacked,
        consumers=consumers,
        publish_rate=publish,
        ack_rate=ack,
        oldest_age_seconds=age,
        current_replicas=current,
        ready_replicas=current if ready_replicas is None else ready_replicas,
    )


def run(spec: EmailQueueSpec, observation: Observation, state: PolicyState | None = None, now: float = NOW) -> Decision:
    return decide(spec, observation, state or PolicyState(last_active_at=now), now)


# --------------------------------------------------------------------------- KEDA parity


@pytest.mark.parametrize(
    ("observation", "target", "expected", "limit"),
    [
        # QueueLength: 100 messages / 20 per replica = 5 replicas, already there
        (obs(100, current=5), {"backlogPerReplica": 20}, 5, None),
        # 104/20 = 5.2: within 10 % tolerance of 5 -> keep 5 (HPA tolerance)
        (obs(104, current=5), {"backlogPerReplica": 20}, 5, "tolerance"),
        # 120/20 = 6: ratio 1.2 is outside tolerance -> ceil -> 6
        (obs(120, current=5), {"backlogPerReplica": 20}, 6, None),
        # 360/20 = 18: exactly 10 % below 20 -> still within tolerance (<=), keep 20
        (obs(360, current=20), {"backlogPerReplica": 20}, 20, "tolerance"),
        # 340/20 = 17: 15 % below -> 17
        (obs(340, current=20), {"backlogPerReplica": 20}, 17, None),
        # 60/20 = 3: scale down (stabilization disabled in UNSHAPED)
        (obs(60, current=5), {"backlogPerReplica": 20}, 3, None),
        # unacked messages count by default (KEDA cannot): 80 + 40 = 120 -> 6
        (obs(80, unacked=40, current=1), {"backlogPerReplica": 20}, 6, None),
        # ... and not when countUnacked is false: 80 -> 4
        (obs(80, unacked=40, current=1), {"backlogPerReplica": 20, "countUnacked": False}, 4, None),
        # no management API (unacked unknown): ready only
        (obs(80, current=1), {"backlogPerReplica": 20}, 4, None),
        # MessageRate: 50/s published, 10/s per replica -> 5
        (obs(0, publish=50.0, current=1), {"messageRatePerReplica": 10}, 5, None),
        # fractional targets are allowed: 10 / 2.5 = 4
        (obs(10, current=1), {"backlogPerReplica": 2.5}, 4, None),
    ],
)
def test_keda_parity(observation: Observation, target: dict[str, Any], expected: int, limit: str | None) -> None:
    decision = run(make_spec(target=target), observation)
    assert decision.replicas == expected
    if limit is not None:
        assert limit in decision.limits


# --------------------------------------------------------------------------- SLO terms


@pytest.mark.parametrize(
    ("observation", "target", "term", "expected_term"),
    [
        # drain: (λ + B/drain)/μ = (300 + 6000/60)/10 = 40; 40 ready replicas keep up, no lookahead
        (obs(6000, publish=300.0, current=40), {"ratePerReplica": 10, "drainSeconds": 60}, "drain", 40.0),
        # lookahead: 10 replicas serve 100/s of 300/s, so 200/s pile up for 30 s of start-up:
        # B_eff = 6000 + 6000 -> (300 + 12000/60)/10 = 50
        (obs(6000, publish=300.0, current=10), {"ratePerReplica": 10, "drainSeconds": 60}, "drain", 50.0),
        # a surge with an empty queue is met in one poll: B_eff = 0 + (400-30)*30 = 11100
        (obs(0, publish=400.0, current=3), {"ratePerReplica": 10, "drainSeconds": 60}, "drain", 58.5),
        # age: head is 100 s old, SLO 300 s, start-up 30 s -> 170 s left: (100 + 3400/170)/10 = 12
        (
            obs(3400, publish=100.0, age=100.0, current=10),
            {"ratePerReplica": 10, "maxMessageAgeSeconds": 300},
            "age",
            12.0,
        ),
        # age unknown: Little's law B/ack = 3400/100 = 34 s -> 300-34-30 = 236 s left
        (
            obs(3400, publish=100.0, ack=100.0, current=10),
            {"ratePerReplica": 10, "maxMessageAgeSeconds": 300},
            "age",
            (100 + 3400 / 236) / 10,
        ),
        # SLO already breached: budget floors at one poll (5 s): (100 + 3400/5)/10 = 78
        (
            obs(3400, publish=100.0, age=400.0, current=10),
            {"ratePerReplica": 10, "maxMessageAgeSeconds": 300},
            "age",
            78.0,
        ),
    ],
)
def test_slo_terms(observation: Observation, target: dict[str, Any], term: str, expected_term: float) -> None:
    decision = run(make_spec(target=target), observation)
    assert decision.terms[term] == pytest.approx(expected_term)


def test_slo_decision_and_reason_explain_the_numbers() -> None:
    spec = make_spec(target={"ratePerReplica": 10, "drainSeconds": 60}, replicas={"min": 1, "max": 100})
    decision = run(spec, obs(4200, publish=310.0, current=34))
    # (310 + 4200/60)/10 = 38 -> 38 replicas
    assert decision.replicas == 38
    assert decision.direction == "up"
    assert decision.reason.startswith("backlog 4200, 310.0/s arriving, 10.00/s per replica; drain term 38.0")
    assert "→ 38 replicas" in decision.reason


def test_the_slo_replaces_the_backlog_per_replica_rule() -> None:
    # 2000 queued but 20 replicas drain it in 10 s: a 20-per-replica rule would ask for 100.
    spec = make_spec(target={"ratePerReplica": 10, "drainSeconds": 60})
    decision = run(spec, obs(2000, publish=100.0, current=20))
    assert "backlog" not in decision.terms
    assert decision.replicas == 14  # (100 + 2000/60)/10 = 13.3


def test_rate_per_replica_is_learned_from_saturated_workers() -> None:
    spec = make_spec(target={"drainSeconds": 60})
    first = run(spec, obs(500, ack=100.0, publish=100.0, current=4, consumers=4))
    assert first.rate_per_replica == pytest.approx(25.0)  # 100/s over 4 busy workers
    second = run(spec, obs(500, ack=50.0, publish=100.0, current=4, consumers=4), first.state, NOW + 5)
    assert second.rate_per_replica == pytest.approx(0.3 * 12.5 + 0.7 * 25.0)  # EWMA
    # an empty queue says nothing about capacity (workers may be idle): no learning
    idle = run(spec, obs(0, ack=10.0, publish=10.0, current=4, consumers=4), second.state, NOW + 10)
    assert idle.rate_per_replica == second.rate_per_replica
    # only busy replicas count: 8 ready pods but 2 consumers attached -> 100/2
    few = run(spec, obs(500, ack=100.0, current=8, consumers=2))
    assert few.rate_per_replica == pytest.approx(50.0)


def test_learned_rate_is_floored() -> None:
    spec = make_spec(target={"drainSeconds": 60, "ratePerReplicaFloor": 0.5})
    stalled = run(spec, obs(500, ack=0.0, publish=10.0, current=4))
    assert stalled.rate_per_replica == 0.5


def test_without_a_rate_per_replica_the_backlog_term_bootstraps() -> None:
    spec = make_spec(target={"drainSeconds": 60})
    decision = run(spec, obs(200, current=1))
    # rateless (AMQP): the waiting messages also keep the current replica as a floor
    assert decision.terms == {"bootstrap": 10.0, "keepUp": 1.0}  # 200 / 20
    assert decision.replicas == 10
    assert "rate per replica not known yet" in decision.reason


def test_arrival_rate_is_estimated_from_backlog_change_without_management_api() -> None:
    spec = make_spec(target={"ratePerReplica": 10, "drainSeconds": 60})
    state = PolicyState(last_backlog=100, last_at=NOW - 5, last_active_at=NOW - 5)
    # backlog grew 500 in 5 s while 2 busy workers sent 10/s each: λ ≈ 100 + 20
    decision = decide(spec, obs(600, current=2), state, NOW)
    assert decision.arrival_rate == pytest.approx(120.0)
    assert "(est.)" in decision.reason
    # with an ack rate the broker's figure is used for consumption: 100 + 35
    assert decide(spec, obs(600, current=2, ack=35.0), state, NOW).arrival_rate == pytest.approx(135.0)
    # across a long gap (restart, outage) the difference means nothing: no estimate
    stale = replace(state, last_at=NOW - 3600)
    assert decide(spec, obs(600, current=2), stale, NOW).arrival_rate is None


def test_max_send_rate_caps_replicas() -> None:
    # provider allows 95 emails/s, 10/s per replica -> never more than 10 replicas
    spec = make_spec(target={"ratePerReplica": 10, "drainSeconds": 60, "maxSendRate": 95})
    decision = run(spec, obs(20000, publish=300.0, current=5))
    assert decision.replicas == 10
    assert "maxSendRate" in decision.limits
    assert "maxSendRate 95/s" in decision.reason


def test_schedule_prescales_before_a_campaign() -> None:
    start = NOW + 35  # startup 30 s + poll 5 s ahead
    spec = make_spec(
        behavior={},
        target={"ratePerReplica": 10, "drainSeconds": 60},
        replicas={"min": 0, "max": 100},
        schedule=[{"name": "newsletter", "start": _rfc3339(start), "end": _rfc3339(start + 600), "rate": 250}],
    )
    early = run(spec, obs(0, publish=0.0, current=0), now=NOW - 1)
    assert early.replicas == 0  # not yet due
    due = run(spec, obs(0, publish=0.0, current=0), now=NOW)
    assert due.terms["schedule"] == 25.0
    assert due.replicas == 4  # woken from 0 by the campaign; scale-up policy: +4 from 0
    assert due.direction == "up"


def _rfc3339(epoch: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(epoch, tz=UTC).isoformat()


# --------------------------------------------------------------------------- zero handling


@pytest.mark.parametrize(
    ("backlog", "expected", "limits"),
    [
        # empty queue at 0: stay idle
        (0, 0, ()),
        # at the activation threshold: stay at 0, say why
        (10, 0, ("activation",)),
        # above it: wake to at least 1 (11/20 -> 1)
        (11, 1, ()),
        # a big backlog wakes to what the default scale-up policy allows from 0 (Pods 4)
        (1000, 4, ("scaleUpPolicy",)),
    ],
)
def test_activation_from_zero(backlog: int, expected: int, limits: tuple[str, ...]) -> None:
    spec = default_spec(replicas={"min": 0, "max": 50, "activationBacklog": 10})
    decision = run(spec, obs(backlog, current=0))
    assert decision.replicas == expected
    assert decision.limits == limits


@pytest.mark.parametrize(
    ("idle_seconds", "arrivals", "expected", "limit"),
    [
        # idle 299 s of a 300 s cooldown: hold 1
        (299.0, 0.0, 1, "cooldown"),
        # idle a full cooldown: go to 0
        (300.0, 0.0, 0, None),
        # messages still arriving into an empty queue: not idle, never 0
        (10_000.0, 2.0, 1, "cooldown"),
    ],
)
def test_cooldown_to_zero(idle_seconds: float, arrivals: float, expected: int, limit: str | None) -> None:
    spec = default_spec(replicas={"min": 0, "max": 50}, behavior={"scaleDown": {"stabilizationSeconds": 0}})
    state = PolicyState(last_active_at=NOW - idle_seconds)
    decision = decide(spec, obs(0, publish=arrivals, current=1), state, NOW)
    assert decision.replicas == expected
    if limit is not None:
        assert limit in decision.limits


def test_cooldown_clock_starts_at_first_observation() -> None:
    # An operator restart with lost state must not drop a running fleet to 0 at once.
    spec = default_spec(replicas={"min": 0, "max": 50})
    decision = decide(spec, obs(0, publish=0.0, current=3), PolicyState(), NOW)
    assert decision.replicas >= 1
    assert decision.state.last_active_at == NOW


def test_min_above_zero_never_scales_to_zero() -> None:
    spec = default_spec(replicas={"min": 2, "max": 50}, behavior={"scaleDown": {"stabilizationSeconds": 0}})
    # publish/ack rates of 0: the broker says nothing arrives (a rateless source could not)
    decision = decide(spec, obs(0, current=5, publish=0.0, ack=0.0), PolicyState(last_active_at=NOW - 10_000), NOW)
    assert decision.replicas == 2
    assert "min" in decision.limits


# --------------------------------------------------------------------------- HPA shaping


def test_scale_down_waits_for_the_stabilization_window() -> None:
    spec = default_spec(replicas={"min": 1, "max": 50})  # scaleDown window 300 s
    state = PolicyState(recommendations=((NOW - 250, 10),), last_active_at=NOW)
    held = decide(spec, obs(60, current=10), state, NOW)  # wants 3
    assert held.replicas == 10
    assert "stabilization" in held.limits
    later = decide(spec, obs(60, current=10), held.state, NOW + 51)  # the 10 left the window
    assert later.replicas == 3


def test_taking_over_a_running_fleet_waits_out_the_scale_down_window() -> None:
    # The HPA records the current count as its first recommendation: an EmailQueue that takes
    # over a Deployment at 10 with demand for 2 does not cut it at once.
    spec = default_spec(replicas={"min": 1, "max": 50})  # scaleDown window 300 s
    first = decide(spec, obs(40, current=10, publish=0.0), PolicyState(), NOW)  # wants 2
    assert first.replicas == 10
    assert "stabilization" in first.limits
    held = decide(spec, obs(40, current=10, publish=0.0), first.state, NOW + 299)
    assert held.replicas == 10
    after = decide(spec, obs(40, current=10, publish=0.0), held.state, NOW + 300)
    assert after.replicas == 2


def test_taking_over_above_max_goes_to_max_and_holds_there() -> None:
    spec = default_spec(replicas={"min": 1, "max": 6})
    first = decide(spec, obs(40, current=10, publish=0.0), PolicyState(), NOW)
    assert first.replicas == 6 and "max" in first.limits
    # recorded as 6 (what the HPA scales it to), not 10: a raised max does not bring 10 back
    assert first.state.recommendations[0] == (NOW, 6)


def test_first_poll_of_a_fleet_at_zero_records_nothing() -> None:
    spec = default_spec(replicas={"min": 0, "max": 50}, behavior={"scaleUp": {"stabilizationSeconds": 60}})
    woken = decide(spec, obs(100, current=0), PolicyState(), NOW)
    assert woken.replicas == 4  # KEDA 0 -> 1 activation, then the scale-up policy; no 0 held in the window


@pytest.mark.parametrize(
    ("backlog", "tolerance", "expected"),
    [
        # 110 messages, 10 per replica, 10 replicas: ratio 1.1 is on the boundary, kept (HPA: <=)
        (110, 0.1, 10),
        (111, 0.1, 12),
        (90, 0.1, 10),
        (89, 0.1, 9),
        # at 0.3 the boundaries 0.7 and 1.3 are kept too
        (70, 0.3, 10),
        (130, 0.3, 10),
        (69, 0.3, 7),
        (131, 0.3, 14),
    ],
)
def test_tolerance_boundaries_are_kept_as_the_hpa_keeps_them(backlog: int, tolerance: float, expected: int) -> None:
    spec = make_spec(target={"backlogPerReplica": 10}, behavior={**UNSHAPED, "tolerance": tolerance})
    assert run(spec, obs(backlog, current=10, publish=0.0)).replicas == expected


@pytest.mark.parametrize(
    ("behavior", "backlog", "expected"),
    [
        # scale-up tolerance 0.5: 14 wanted of 10 is within (1.4 <= 1.5)
        ({"scaleUp": {"tolerance": 0.5}}, 140, 10),
        # ... while the scale-down side keeps the shared 0.1: 8 wanted is outside
        ({"scaleUp": {"tolerance": 0.5}}, 80, 8),
        # scale-down tolerance 0: any drop scales down, scale-up keeps 0.1
        ({"scaleDown": {"tolerance": 0}}, 95, 10 - 0),
        ({"scaleDown": {"tolerance": 0}}, 89, 9),
        ({"scaleDown": {"tolerance": 0}}, 105, 10),
        # both given: the shared one is not used
        ({"tolerance": 0.9, "scaleUp": {"tolerance": 0}, "scaleDown": {"tolerance": 0}}, 101, 11),
    ],
)
def test_scale_up_and_scale_down_tolerances_are_separate(behavior: dict[str, Any], backlog: int, expected: int) -> None:
    merged = {
        "scaleDown": {"stabilizationSeconds": 0, **behavior.get("scaleDown", {})},
        "scaleUp": {**UNSHAPED["scaleUp"], **behavior.get("scaleUp", {})},
        **{k: v for k, v in behavior.items() if k not in ("scaleUp", "scaleDown")},
    }
    spec = make_spec(target={"backlogPerReplica": 10}, behavior=merged)
    assert run(spec, obs(backlog, current=10, publish=0.0)).replicas == expected


def test_scale_up_stabilization_takes_the_window_minimum() -> None:
    spec = default_spec(replicas={"min": 1, "max": 50}, behavior={"scaleUp": {"stabilizationSeconds": 60}})
    state = PolicyState(recommendations=((NOW - 30, 5),), last_active_at=NOW)
    decision = decide(spec, obs(160, current=4), state, NOW)  # wants 8
    assert decision.replicas == 5
    assert "stabilization" in decision.limits


@pytest.mark.parametrize(
    ("rules", "current", "events", "expected"),
    [
        # default: Percent 100 -> 6, Pods 4 -> 7; Max picks the larger
        ({}, 3, (), 7),
        # Min picks the smaller
        ({"selectPolicy": "Min"}, 3, (), 6),
        # Disabled never scales up
        ({"selectPolicy": "Disabled"}, 3, (), 3),
        # +4 already happened 10 s ago: the period started at 3 -> limit 7, already there
        ({}, 7, ((NOW - 10, 4),), 7),
        # the event is exactly one period old: it no longer counts -> 7 + 7 = 14
        ({}, 7, ((NOW - 15, 4),), 14),
        # a scale-down inside the period raises the period start: 7 - (-3) = 10 -> 20
        ({}, 7, ((NOW - 5, -3),), 20),
    ],
)
def test_scale_up_rate_policies(
    rules: dict[str, Any], current: int, events: tuple[tuple[float, int], ...], expected: int
) -> None:
    spec = default_spec(replicas={"min": 1, "max": 100}, behavior={"scaleUp": rules})
    state = PolicyState(scale_events=events, last_active_at=NOW)
    assert decide(spec, obs(2000, current=current), state, NOW).replicas == expected  # wants 100


@pytest.mark.parametrize(
    ("policies", "select", "current", "expected"),
    [
        # Percent 50 from 10 -> 5
        ([{"type": "Percent", "value": 50, "periodSeconds": 60}], "Max", 10, 5),
        # Percent truncates like the HPA's int32(): 5 * 0.5 = 2.5 -> 2
        ([{"type": "Percent", "value": 50, "periodSeconds": 60}], "Max", 5, 2),
        # Pods 1 per minute
        ([{"type": "Pods", "value": 1, "periodSeconds": 60}], "Max", 10, 9),
        # Max = most permissive for scale-down = lowest count
        (
            [{"type": "Pods", "value": 1, "periodSeconds": 60}, {"type": "Percent", "value": 50, "periodSeconds": 60}],
            "Max",
            10,
            5,
        ),
        (
            [{"type": "Pods", "value": 1, "periodSeconds": 60}, {"type": "Percent", "value": 50, "periodSeconds": 60}],
            "Min",
            10,
            9,
        ),
        ([{"type": "Pods", "value": 1, "periodSeconds": 60}], "Disabled", 10, 10),
    ],
)
def test_scale_down_rate_policies(policies: list[dict[str, Any]], select: str, current: int, expected: int) -> None:
    spec = default_spec(
        replicas={"min": 1, "max": 100},
        behavior={"scaleDown": {"stabilizationSeconds": 0, "selectPolicy": select, "policies": policies}},
    )
    decision = decide(spec, obs(20, current=current), PolicyState(last_active_at=NOW), NOW)  # wants 1
    assert decision.replicas == expected


@pytest.mark.parametrize(
    ("backlog", "current", "expected", "limit"),
    [
        (5000, 10, 20, "max"),  # wants 250 -> max 20
        (1000, 30, 20, "max"),  # scaled above max by hand, wants 50: back to max
        (20, 1, 3, "min"),  # wants 1, below min: up to min
    ],
)
def test_bounds(backlog: int, current: int, expected: int, limit: str) -> None:
    spec = make_spec(replicas={"min": 3, "max": 20})
    decision = run(spec, obs(backlog, current=current))
    assert decision.replicas == expected
    assert limit in decision.limits


# --------------------------------------------------------------------------- failures


FALLBACK = {"afterFailures": 3, "replicas": 8}


@pytest.mark.parametrize(
    ("fallback", "previous_failures", "current", "expected", "active"),
    [
        # no fallback configured: hold, however long it lasts
        (None, 10, 5, 5, False),
        # below afterFailures: hold (never scale down blind)
        (FALLBACK, 1, 5, 5, False),
        # third failure: fallback count
        (FALLBACK, 2, 5, 8, True),
        # fallback below current: hold current, not down
        (FALLBACK, 2, 12, 12, True),
        # currentIfHigher: max(current, fallback)
        ({**FALLBACK, "mode": "currentIfHigher"}, 2, 5, 8, True),
        # fallback above max: clamped to max
        ({"afterFailures": 1, "replicas": 500}, 0, 5, 20, True),
        # fallback 0 never takes a running fleet to 0
        ({"afterFailures": 1, "replicas": 0}, 0, 3, 3, True),
    ],
)
def test_failures(
    fallback: dict[str, Any] | None, previous_failures: int, current: int, expected: int, active: bool
) -> None:
    sections: dict[str, Any] = {"replicas": {"min": 0, "max": 20}}
    if fallback is not None:
        sections["fallback"] = fallback
    spec = default_spec(**sections)
    state = PolicyState(consecutive_failures=previous_failures, last_active_at=NOW - 10_000)
    decision = decide(spec, Observation.failed("connection refused", current), state, NOW)
    assert decision.replicas == expected
    assert decision.fallback_active is active
    assert decision.state.consecutive_failures == previous_failures + 1
    assert "connection refused" in decision.reason


def test_recovery_resets_failures_and_scales_normally() -> None:
    spec = default_spec(replicas={"min": 1, "max": 20}, fallback=FALLBACK)
    blind = PolicyState(consecutive_failures=5, last_active_at=NOW)
    decision = decide(spec, obs(200, current=8), blind, NOW)
    assert decision.state.consecutive_failures == 0
    assert not decision.fallback_active
    assert decision.replicas == 10


# --------------------------------------------------------------------------- paused / dry run


def test_paused_holds_and_keeps_state() -> None:
    spec = default_spec(paused=True)
    state = PolicyState(learned_rate=3.0, last_active_at=NOW)
    decision = decide(spec, obs(10_000, current=2), state, NOW)
    assert (decision.replicas, decision.limits, decision.state) == (2, ("paused",), state)


def test_dry_run_decides_but_records_no_scale_event() -> None:
    spec = default_spec(dryRun=True)
    decision = run(spec, obs(200, current=2))
    assert decision.replicas == 6  # Percent 100 -> 4, Pods 4 -> 6
    assert decision.state.scale_events == ()
    real = run(default_spec(), obs(200, current=2))
    assert real.state.scale_events == ((NOW, 4),)


# --------------------------------------------------------------------------- saturation


def _saturation_run(ack_at_12: float) -> list[Decision]:
    """8 busy workers plateau at 50 acks/s (6.25 each, as configured); scaled to 12, the ack rate is ack_at_12."""
    spec = make_spec(target={"ratePerReplica": 6.25, "drainSeconds": 60}, replicas={"min": 1, "max": 60})
    state = PolicyState(last_active_at=NOW)
    decisions = []
    timeline = [(0, 8, 50.0), (35, 8, 50.0), (40, 12, ack_at_12), (75, 12, ack_at_12)]
    for offset, replicas, ack in timeline:
        d = decide(spec, obs(20_000, publish=300.0, ack=ack, current=replicas), state, NOW + offset)
        decisions.append(d)
        state = d.state
    return decisions


def test_downstream_saturation_holds_scale_up() -> None:
    decisions = _saturation_run(ack_at_12=51.0)
    assert not decisions[2].saturated  # 12 replicas not settled yet
    final = decisions[3]
    assert final.saturated
    assert final.replicas == 12  # drain term wants 60; held
    assert "saturated" in final.limits
    assert "ack rate 50.0/s at 8 replicas, 51.0/s at 12" in final.reason
    assert "holding 12" in final.reason


def test_more_acks_from_more_replicas_is_not_saturation() -> None:
    final = _saturation_run(ack_at_12=75.0)[3]
    assert not final.saturated
    assert final.replicas == 60


@pytest.mark.parametrize(
    ("observation", "cleared"),
    [
        (obs(0, publish=300.0, ack=51.0, current=12), True),  # backlog drained
        (obs(20_000, publish=300.0, ack=70.0, current=12), True),  # ack rate rose > 10 %
        (obs(20_000, publish=300.0, ack=52.0, current=12), False),  # still flat
    ],
)
def test_saturation_clears(observation: Observation, cleared: bool) -> None:
    saturated = _saturation_run(ack_at_12=51.0)[3]
    spec = make_spec(target={"ratePerReplica": 6.25, "drainSeconds": 60}, replicas={"min": 1, "max": 60})
    decision = decide(spec, observation, saturated.state, NOW + 80)
    assert decision.saturated is not cleared


# --------------------------------------------------------------------------- state


@pytest.mark.parametrize(
    "garbage",
    [None, {}, "x", {"recommendations": "x", "learnedRate": -1, "consecutiveFailures": "3", "saturation": [1]}],
)
def test_from_status_tolerates_garbage(garbage: Any) -> None:
    assert PolicyState.from_status(garbage) == PolicyState()


def test_status_round_trip_is_identity() -> None:
    sample = ThroughputSample(NOW, 8, 50.0)
    state = PolicyState(
        recommendations=((NOW - 10, 4), (NOW, 6)),
        scale_events=((NOW, 2),),
        last_active_at=NOW,
        learned_rate=9.5,
        consecutive_failures=2,
        fleet_replicas=8,
        fleet_since=NOW - 40,
        throughput_baseline=sample,
        saturation=Saturation(NOW, sample, ThroughputSample(NOW + 40, 12, 51.0)),
        last_backlog=300,
        last_at=NOW,
    )
    assert PolicyState.from_status(state.to_status()) == state


# --- stale management-API samples (quorum queues refresh their counters every 5 s) ---------


def test_a_stale_zero_publish_rate_does_not_hide_a_growing_backlog() -> None:
    # The broker said 0.0/s, but the backlog grew by 200 in 5 s while 4 workers sent 40/s:
    # the arrival rate is estimated (~80/s), not taken as zero (which would scale down).
    spec = make_spec(target={"ratePerReplica": 10, "drainSeconds": 60})
    state = PolicyState(last_backlog=300, last_at=NOW - 5, last_active_at=NOW - 5, learned_rate=10.0)
    decision = run(spec, obs(500, publish=0.0, ack=40.0, current=4), state)
    assert decision.arrival_rate == pytest.approx(80.0)
    assert decision.replicas > 4


def test_a_true_zero_publish_rate_is_believed_when_the_backlog_shrinks() -> None:
    spec = make_spec(target={"ratePerReplica": 10, "drainSeconds": 60})
    state = PolicyState(last_backlog=500, last_at=NOW - 5, last_active_at=NOW - 5, learned_rate=10.0)
    decision = run(spec, obs(300, publish=0.0, ack=40.0, current=4), state)
    assert decision.arrival_rate == 0.0


def test_a_stale_zero_ack_rate_does_not_drag_the_learned_rate_down() -> None:
    # Workers are busy and messages wait, yet the sample says 0 acks/s: a stats tick, not
    # a fleet that stopped. μ keeps its value instead of being smoothed towards zero.
    spec = make_spec(target={"drainSeconds": 60})
    state = PolicyState(learned_rate=10.0, last_backlog=500, last_at=NOW - 5, last_active_at=NOW - 5)
    decision = run(spec, obs(500, publish=40.0, ack=0.0, current=4), state)
    assert decision.rate_per_replica == 10.0


# --------------------------------------------------------------------------- rateless sources (AMQP)

AMQP_SLO = {"target": {"ratePerReplica": 10, "drainSeconds": 60, "startupSeconds": 30}}


def _poll(spec: EmailQueueSpec, state: PolicyState, ready: int, current: int, now: float) -> Decision:
    """One AMQP-only poll: ready and consumers, no unacked, no rates."""
    return decide(spec, obs(ready, current=current, consumers=current), state, now)


def test_rateless_empty_queue_means_keeping_up_not_no_demand() -> None:
    spec = make_spec(**AMQP_SLO)
    state = PolicyState(last_active_at=NOW)
    for i in range(4):  # within the settle time the fleet is held, not cut to min
        decision = _poll(spec, state, 0, 20, NOW + 3 * i)
        state = decision.state
        assert decision.replicas == 20
    assert "keeping up" in decision.reason or "holding" in decision.reason


def test_rateless_gives_capacity_back_step_by_step_and_remembers_a_short_count() -> None:
    spec = make_spec(**AMQP_SLO)
    state = PolicyState(last_active_at=NOW)
    now, current, seen = NOW, 40, []
    for _ in range(40):  # empty queue: steps of 15 %, then 30 %, 50 % ...
        decision = _poll(spec, state, 0, current, now)
        state, now = decision.state, now + 5
        if decision.replicas != current:
            seen.append(decision.replicas)
            current = decision.replicas
    assert seen[:3] == [34, 23, 11]
    assert seen[-1] == 1  # min
    # The queue backs up at 11 replicas after a probe: 11 is short, probes stay above it.
    state = PolicyState(last_active_at=NOW, keepup_replicas=11, keepup_since=NOW - 60, keepup_top=40,
                        keepup_step=0.5, last_backlog=0, last_at=NOW - 5)
    backed_up = _poll(spec, state, 150, 11, NOW)
    assert backed_up.state.short_replicas >= 11 and backed_up.replicas >= 11
    later = PolicyState(**{**backed_up.state.__dict__, "keepup_replicas": 14, "keepup_since": NOW,
                           "keepup_top": 14})
    held = _poll(spec, later, 0, 14, NOW + 60)
    assert held.replicas >= backed_up.state.short_replicas + 1


def test_rateless_waiting_messages_never_shrink_the_fleet() -> None:
    spec = make_spec(**AMQP_SLO)
    decision = _poll(spec, PolicyState(last_active_at=NOW, last_backlog=50, last_at=NOW - 5), 40, 30, NOW)
    assert decision.replicas >= 30


def test_sources_with_rates_scale_down_on_measured_demand() -> None:
    spec = make_spec(**AMQP_SLO)
    decision = decide(spec, obs(0, current=20, consumers=20, publish=50.0, ack=50.0),
                      PolicyState(last_active_at=NOW), NOW)
    assert decision.replicas == 5  # 50/s at 10/s per replica
    assert "keepUp" not in decision.terms


def test_keda_parity_specs_keep_kedas_rateless_behavior() -> None:
    # backlogPerReplica alone (no SLO): an empty queue asks for min, as KEDA's QueueLength does
    spec = make_spec(target={"backlogPerReplica": 20})
    assert decide(spec, obs(0, current=10), PolicyState(last_active_at=NOW), NOW).replicas == 1


# --------------------------------------------------------------------------- saturation without a configured cap


def _jumped_fleet(acks: list[tuple[float, int, float]]) -> list[Decision]:
    """A fleet that went 3 → 60 in one step (no intermediate sample to compare), then the given
    (offset, busy replicas, ack rate) polls with 20,000 messages waiting."""
    spec = make_spec(target={"ratePerReplica": 10, "drainSeconds": 60}, replicas={"min": 3, "max": 60})
    state = PolicyState(last_active_at=NOW)
    decisions = []
    for offset, replicas, ack in acks:
        d = decide(spec, obs(20_000, publish=400.0, ack=ack, current=replicas, consumers=replicas), state, NOW + offset)
        decisions.append(d)
        state = d.state
    return decisions


def test_a_provider_cap_shows_as_acks_well_under_what_the_fleet_sustains() -> None:
    # 60 workers of 10/s each deliver 250/s: the provider, not the fleet, is the limit.
    decisions = _jumped_fleet([(0, 60, 250.0), (35, 60, 250.0)])
    assert not decisions[0].saturated  # not settled yet
    capped = decisions[1]
    assert capped.saturated and "saturated" in capped.limits
    assert capped.state.saturation.cap == 30  # ceil(250 / 10 * 1.2): within 1.5x the saturation point 25
    assert capped.recommended == 30


def test_a_cap_that_costs_throughput_is_lifted_and_not_suspected_again_soon() -> None:
    # Slow but parallel downstream: each worker only manages 4/s, yet more workers send more.
    decisions = _jumped_fleet([(0, 60, 240.0), (35, 60, 240.0), (40, 29, 116.0), (75, 29, 116.0), (80, 29, 116.0)])
    assert decisions[1].state.saturation.cap == 29
    lifted = decisions[3]
    assert not lifted.saturated
    assert lifted.state.saturation_veto_until == NOW + 75 + 600
    assert not decisions[4].saturated  # vetoed: the fleet may grow again
    assert decisions[4].replicas == 60


def test_a_throttle_that_lifts_clears_the_cap() -> None:
    decisions = _jumped_fleet([(0, 60, 250.0), (35, 60, 250.0), (40, 30, 250.0), (75, 30, 299.0)])
    assert decisions[2].saturated
    assert not decisions[3].saturated  # 299 > 1.1 x 250: more replicas help again
