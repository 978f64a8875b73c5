"""Invariants of the scaling policy, pinned with hypothesis.

- bounds: min <= replicas <= max whenever the queue was measured and the object is not paused;
- more backlog never means fewer replicas (same state, same per-replica rate: a changed
  *learned* rate or new saturation evidence legitimately changes the answer);
- no scale-down below a recommendation made inside the scale-down window (except the KEDA
  N→0 step after a full cooldown, with min 0);
- failures never scale down and never reach 0 from a running fleet;
- restart safety: status round-trips (through JSON, as the apiserver stores it) decide identically;
- pruning the recommendation history keeps HPA's full-history stabilization exactly.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st

from emailqueue_operator.scaling import Observation, PolicyState, decide
from emailqueue_operator.spec import EmailQueueSpec, default_spec

# Per-test settings (not a loaded profile): other modules keep their own.
policy_settings = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NOW = 1_800_000_000.0

rates = st.none() | st.floats(min_value=0, max_value=2000, allow_nan=False)


@st.composite
def specs(draw: st.DrawFn, *, fixed_rate: bool = False) -> EmailQueueSpec:
    lo = draw(st.integers(0, 5))
    hi = draw(st.integers(max(lo, 1), 80))
    target: dict[str, Any] = {}
    if draw(st.booleans()):
        target["backlogPerReplica"] = draw(st.floats(0.5, 100))
    if fixed_rate or draw(st.booleans()):
        target["ratePerReplica"] = draw(st.floats(0.5, 50))
    if draw(st.booleans()):
        target["drainSeconds"] = draw(st.floats(1, 600))
    if draw(st.booleans()):
        target["maxMessageAgeSeconds"] = draw(st.floats(1, 900))
    if draw(st.booleans()):
        target["maxSendRate"] = draw(st.floats(1, 1000))
    target["startupSeconds"] = draw(st.floats(0, 120))
    policy = st.fixed_dictionaries(
        {"type": st.sampled_from(["Pods", "Percent"]), "value": st.integers(1, 200),
         "periodSeconds": st.integers(1, 120)}
    )
    behavior = {
        "tolerance": draw(st.sampled_from([0.0, 0.1, 0.25])),
        "cooldownSeconds": draw(st.integers(0, 600)),
        "scaleUp": {
            "stabilizationSeconds": draw(st.integers(0, 120)),
            "selectPolicy": draw(st.sampled_from(["Max", "Min", "Disabled"])),
            "policies": draw(st.lists(policy, min_size=1, max_size=3)),
        },
        "scaleDown": {
            "stabilizationSeconds": draw(st.integers(0, 600)),
            "selectPolicy": draw(st.sampled_from(["Max", "Min", "Disabled"])),
            "policies": draw(st.lists(policy, min_size=1, max_size=3)),
        },
    }
    sections: dict[str, Any] = {
        "replicas": {"min": lo, "max": hi, "activationBacklog": draw(st.integers(0, 50))},
        "target": target,
        "behavior": behavior,
    }
    if draw(st.booleans()):
        sections["fallback"] = {
            "afterFailures": draw(st.integers(1, 4)),
            "replicas": draw(st.integers(0, 100)),
            "mode": draw(st.sampled_from(["static", "currentIfHigher"])),
        }
    return default_spec(**sections)


@st.composite
def observations(draw: st.DrawFn, *, ok: bool = True, ack: bool = True) -> Observation:
    current = draw(st.integers(0, 100))
    return Observation(
        ok=ok,
        error=None if ok else "down",
        ready=draw(st.integers(0, 100_000)),
        unacked=draw(st.none() | st.integers(0, 5000)),
        consumers=draw(st.none() | st.integers(0, 100)),
        publish_rate=draw(rates),
        ack_rate=draw(rates) if ack else None,
        oldest_age_seconds=draw(st.none() | st.floats(0, 2000)),
        current_replicas=current,
        ready_replicas=draw(st.integers(0, current)),
    )


@st.composite
def states(draw: st.DrawFn, *, saturation_free: bool = False) -> PolicyState:
    ages = draw(st.lists(st.floats(0.001, 700), max_size=8))
    recommendations = tuple((NOW - age, draw(st.integers(0, 120))) for age in sorted(ages, reverse=True))
    event_ages = draw(st.lists(st.floats(0.001, 150), max_size=4))
    events = tuple((NOW - age, draw(st.integers(-20, 20))) for age in sorted(event_ages, reverse=True))
    last_backlog = draw(st.none() | st.integers(0, 100_000))
    return PolicyState(
        recommendations=recommendations,
        scale_events=events,
        last_active_at=draw(st.none() | st.floats(NOW - 2000, NOW)),
        learned_rate=draw(st.none() | st.floats(0.1, 50)),
        consecutive_failures=draw(st.integers(0, 5)),
        fleet_replicas=None if saturation_free else draw(st.none() | st.integers(0, 100)),
        fleet_since=None if saturation_free else draw(st.none() | st.floats(NOW - 200, NOW)),
        last_backlog=last_backlog,
        last_at=None if last_backlog is None else NOW - draw(st.floats(0.5, 100)),
    )


@policy_settings
@given(specs(), observations(), states())
def test_measured_decisions_stay_within_bounds(spec: EmailQueueSpec, obs: Observation, state: PolicyState) -> None:
    decision = decide(spec, obs, state, NOW)
    assert spec.replicas.min <= decision.replicas <= spec.replicas.max


@policy_settings
@given(specs(fixed_rate=True), observations(), states(saturation_free=True), st.integers(1, 50_000))
def test_more_backlog_never_fewer_replicas(
    spec: EmailQueueSpec, obs: Observation, state: PolicyState, extra: int
) -> None:
    fewer = decide(spec, obs, state, NOW)
    more = decide(spec, Observation(**{**obs.__dict__, "ready": obs.ready + extra}), state, NOW)
    assert more.replicas >= fewer.replicas


@policy_settings
@given(specs(), observations(), states(), st.integers(0, 120), st.floats(0.001, 1.0))
def test_no_scale_down_inside_the_window_after_a_higher_recommendation(
    spec: EmailQueueSpec, obs: Observation, state: PolicyState, high: int, window_fraction: float
) -> None:
    window = spec.behavior.scale_down.stabilization_seconds
    at = NOW - window * window_fraction * 0.999
    if window == 0:
        return
    state = PolicyState(**{**state.__dict__, "recommendations": (*state.recommendations, (at, high))})
    state = PolicyState(**{**state.__dict__, "recommendations": tuple(sorted(state.recommendations))})
    decision = decide(spec, obs, state, NOW)
    floor = min(obs.current_replicas, high, spec.replicas.max)
    cooled_to_zero = decision.replicas == 0 and spec.replicas.min == 0
    assert decision.replicas >= floor or cooled_to_zero


@policy_settings
@given(specs(), observations(ok=False), states())
def test_failures_never_scale_down(spec: EmailQueueSpec, obs: Observation, state: PolicyState) -> None:
    decision = decide(spec, obs, state, NOW)
    assert decision.replicas >= obs.current_replicas
    assert decision.replicas <= max(obs.current_replicas, spec.replicas.max)
    assert decision.state.consecutive_failures == state.consecutive_failures + 1


def _through_apiserver(status: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip; Go re-encodes whole floats (5.0) as integers (5)."""

    def squash(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {key: squash(item) for key, item in value.items() if item is not None}
        if isinstance(value, list):
            return [squash(item) for item in value]
        return value

    loaded: dict[str, Any] = json.loads(json.dumps(squash(status)))
    return loaded


@policy_settings
@given(specs(), st.lists(observations(), min_size=2, max_size=4), states())
def test_restart_safety_status_round_trip_decides_identically(
    spec: EmailQueueSpec, polls: list[Observation], state: PolicyState
) -> None:
    remembered = state
    restarted = PolicyState.from_status(_through_apiserver(state.to_status()))
    for step, obs in enumerate(polls):
        now = NOW + 5 * step
        a = decide(spec, obs, remembered, now)
        b = decide(spec, obs, restarted, now)
        assert a == b
        remembered = a.state
        restarted = PolicyState.from_status(_through_apiserver(b.state.to_status()))


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 300),
    st.integers(0, 300),
    st.lists(st.tuples(st.integers(0, 400), st.integers(1, 20)), min_size=1, max_size=40),
)
def test_pruned_history_matches_hpa_full_history_stabilization(
    up_window: int, down_window: int, steps: list[tuple[int, int]]
) -> None:
    # One replica per message, tolerance 0, unlimited rate policies: what is left is stabilization.
    spec = default_spec(
        replicas={"min": 1, "max": 10_000},
        target={"backlogPerReplica": 1},
        behavior={
            "tolerance": 0,
            "scaleUp": {"stabilizationSeconds": up_window,
                        "policies": [{"type": "Pods", "value": 100_000, "periodSeconds": 1}]},
            "scaleDown": {"stabilizationSeconds": down_window,
                          "policies": [{"type": "Percent", "value": 100, "periodSeconds": 1}]},
        },
    )
    state = PolicyState(last_active_at=NOW)
    history: list[tuple[float, int]] = []
    current, now = 1, NOW
    for backlog, gap in steps:
        now += gap
        if not history:
            history.append((now, current))  # the HPA's recordInitialRecommendation
        desired = backlog
        up = min([desired] + [r for t, r in history if t > now - up_window])
        down = max([desired] + [r for t, r in history if t > now - down_window])
        expected = max(1, min(max(current, up), down))
        observation = Observation(True, None, backlog, None, None, None, None, None, current, current)
        decision = decide(spec, observation, state, now)
        assert decision.replicas == expected
        history.append((now, desired))
        state, current = decision.state, decision.replicas
    assert len(state.recommendations) <= len(history)
