"""The bounds hold by construction: no policy beats the causal wait floor (under its stated
assumptions) or the cost floor, on every shipped scenario and observation mode."""
from __future__ import annotations

import itertools
import math
import random
from functools import cache
from typing import Any

import pytest

from emailqueue_operator import baselines, sim
from emailqueue_operator.baselines import (
    CausalWaitFloor,
    Clairvoyant,
    IdealReactive,
    OurPolicy,
    StaticFleet,
    cost_floor,
    keda_queue_length,
    reaction_time,
    surge_onset,
    wait_floor_applies,
)
from emailqueue_operator.sim import SimResult, load_scenario, scenario_from_mapping, simulate


def scenario(**overrides: Any) -> sim.Scenario:
    data: dict[str, Any] = {"name": "t", "duration_seconds": 20, "arrival": {"steps": [[0, 0], [5, 10], [6, 0]]},
                            "rate_per_replica": 1, "startup_seconds": 2, "min": 1, "max": 5}
    data.update(overrides)
    return scenario_from_mapping(data)


@cache
def floor_run(name: str) -> SimResult:
    s = load_scenario(name)
    return simulate(s, CausalWaitFloor(s))


# --------------------------------------------------------------------------- the wait floor
def test_onset_is_the_first_rise_above_the_base_rate() -> None:
    assert surge_onset(load_scenario("incident-2023-09-20")) == 600
    assert surge_onset(load_scenario("ramp")) == 600  # the climb starts at the knot at 600 s
    assert surge_onset(load_scenario("steady")) is None
    dip = scenario(arrival={"points": [[0, 10], [100, 0], [300, 30]]})  # 0 -> 30/s over 200 s: 10/s at 166.7 s
    assert surge_onset(dip) == pytest.approx(100 + 200 / 3)
    assert reaction_time(load_scenario("announced-campaign")) == 0  # the schedule is foresight
    assert reaction_time(load_scenario("steady")) == math.inf


def test_wait_floor_on_the_incident_matches_the_hand_calculation() -> None:
    # 3 pods (30/s) until the pods asked for at 600 s are ready at 630 s, then 60 (600/s).
    # A message published at a >= 600 is sent at 630 + (400 (a - 600) - 900) / 600, so it
    # waits 228.5 - a / 3 s: 28.5 s for the surge's first, down to 0 at 685.5 s. The 1% that
    # wait longest (11,340 of 1,134,000) are the first 28.35 s of the surge: p99 ~ 19 s.
    run = floor_run("incident-2023-09-20")
    assert run.series.replicas[599] == 3 and run.series.replicas[600] == 60 and run.series.ready[630] == 60
    assert run.metrics.max_seconds == 28 and run.metrics.p99_seconds == 19


@pytest.mark.parametrize("name", sim.benchmark_scenario_names())
@pytest.mark.parametrize("mode", sorted(sim.OBSERVATION_MODES))
def test_ours_never_beats_the_bounds(name: str, mode: str) -> None:
    """Issue 12: on every shipped scenario and mode, the floors are below ours. Fails if ours
    holds spare pods before a surge (or the floors are computed wrong)."""
    s = load_scenario(name)
    floor = floor_run(name)
    for spec, label in ((baselines.scenario_spec(s), "ours"), (baselines.scenario_spec(s, crd_defaults=True),
                                                               "ours-crd-defaults")):
        run = simulate(s, OurPolicy(spec, start_epoch=s.start_epoch, observation=mode, name=label))
        assert wait_floor_applies(s, floor.series, run.series) is None, label
        for key in ("p50_seconds", "p99_seconds", "max_seconds", "mean_seconds"):
            assert getattr(floor.metrics, key) <= getattr(run.metrics, key) + 1e-9, (label, key)
        bound = cost_floor(s, run.metrics.max_seconds)
        assert bound.replica_seconds <= run.metrics.replica_seconds + 1e-6, (label, bound)


@pytest.mark.parametrize("name", sim.benchmark_scenario_names())
def test_no_other_policy_beats_the_bounds_where_they_apply(name: str) -> None:
    s = load_scenario(name)
    floor = floor_run(name)
    policies = [StaticFleet(s.initial_replicas), StaticFleet(s.max_replicas, name="static-max"),
                keda_queue_length(s, observation="management"),
                keda_queue_length(s, observation="management", use_cached_metrics=True),
                IdealReactive(s), Clairvoyant(s)]
    for policy in policies:
        run = simulate(s, policy)
        if wait_floor_applies(s, floor.series, run.series) is None:
            assert floor.metrics.p99_seconds <= run.metrics.p99_seconds, policy.name
            assert floor.metrics.max_seconds <= run.metrics.max_seconds, policy.name
        assert cost_floor(s, run.metrics.max_seconds).replica_seconds <= run.metrics.replica_seconds + 1e-6, \
            policy.name


def test_a_policy_with_foresight_beats_the_wait_floor_and_is_told_so() -> None:
    # The floor's assumption (no pods before the surge's first message) is what makes it a
    # bound: the clairvoyant breaks it, beats it, and the check says why.
    s = load_scenario("incident-2023-09-20")
    run = simulate(s, Clairvoyant(s))
    assert run.metrics.p99_seconds < floor_run("incident-2023-09-20").metrics.p99_seconds
    reason = wait_floor_applies(s, floor_run("incident-2023-09-20").series, run.series)
    assert reason is not None and "foresight" in reason


def test_reference_policies_are_beaten_on_a_short_burst_but_the_floors_are_not() -> None:
    s = load_scenario("burst")
    ours = simulate(s, OurPolicy(baselines.scenario_spec(s), start_epoch=s.start_epoch)).metrics
    ideal, seer = simulate(s, IdealReactive(s)).metrics, simulate(s, Clairvoyant(s)).metrics
    assert ours.p99_seconds < ideal.p99_seconds and ours.p99_seconds < seer.p99_seconds
    assert floor_run("burst").metrics.p99_seconds <= ours.p99_seconds
    assert cost_floor(s, ours.max_seconds).replica_seconds <= ours.replica_seconds


# --------------------------------------------------------------------------- the cost floor
def test_cost_floor_by_hand() -> None:
    # 10 messages in step 5, 1 message/s per pod, min 1 (free: 1 message a step), start-up 2 s.
    s = scenario(duration_seconds=20)
    # W = 4: by step 9; the min pod sends 5, a second pod sends the other 5 -> 20 + 5 + 2.
    four = cost_floor(s, 4)
    assert (four.replica_seconds, four.peak_pods, four.paid_pod_seconds, four.startup_pod_seconds) == (27, 2, 5, 2)
    # W = 1: by step 6: 5 a step, 5 pods: 20 + (10 - 2) + 2 x 4.
    assert cost_floor(s, 1).replica_seconds == 36
    # W = 0: 10 in one step needs 10 pods; max is 5.
    assert math.isinf(cost_floor(s, 0).replica_seconds)
    # W beyond the end: nothing has to be sent; the min fleet is the floor.
    assert cost_floor(s, 20).replica_seconds == 20


def _paid_work_exhaustive(arrived: list[int], required: list[int], capacity: list[int], free: int) -> float | None:
    """Least paid work over every integer schedule (dynamic programming on messages sent)."""
    best: dict[int, float] = {0: 0.0}
    for j in range(len(arrived)):
        nxt: dict[int, float] = {}
        for sent, cost in best.items():
            for r in range(0, capacity[j] + 1):
                after = sent + r
                if after > arrived[j]:
                    break
                if after < required[j]:
                    continue
                value = cost + max(0, r - free)
                if value < nxt.get(after, math.inf):
                    nxt[after] = value
        best = nxt
        if not best:
            return None
    return min(best.values())


def test_the_cost_floor_schedule_is_optimal_on_small_instances() -> None:
    # The constraints are a network (interval) matrix, so with integer data the relaxation's
    # optimum is integral: the exhaustive integer search finds it. Any gap would make the
    # "floor" beatable.
    rng = random.Random(12)
    for _ in range(400):
        steps = rng.randint(1, 7)
        per_step = [rng.choice([0, 0, 1, 2, 3, 5, 8]) for _ in range(steps)]
        arrived = list(itertools.accumulate(per_step))
        wait = rng.randint(0, 4)
        required = [arrived[j - wait] if j >= wait else 0 for j in range(steps)]
        capacity = [rng.randint(0, 6) for _ in range(steps)]
        free = rng.randint(0, 3)
        exact = _paid_work_exhaustive(arrived, required, capacity, free)
        greedy = baselines._paid_work([float(a) for a in arrived], [float(r) for r in required],
                                      [float(c) for c in capacity], float(free))
        assert (greedy is None) == (exact is None), (per_step, wait, capacity, free)
        if exact is not None:
            assert greedy == pytest.approx(exact), (per_step, wait, capacity, free)


@pytest.mark.parametrize("wait", [0, 5, 30, 120, 400])
@pytest.mark.parametrize("name", ["double-spike", "burst", "provider-cap"])
def test_the_search_over_the_peak_finds_the_least_total(name: str, wait: int) -> None:
    s = load_scenario(name)
    problem = baselines._CostFloorProblem(s, wait)
    brute = min(problem.total(pods)[0] for pods in range(problem.initial, problem.top + 1))
    assert cost_floor(s, wait).replica_seconds == pytest.approx(brute)
