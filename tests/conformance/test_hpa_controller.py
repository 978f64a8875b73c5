"""Whole-controller HPA cases: one reconcile of an HPA, from upstream's own tests.

Source: kubernetes/kubernetes pkg/controller/podautoscaler/horizontal_test.go (a 1.33+ version). Each
upstream testCase is one reconcile: metrics (translated as in test_hpa_replica_calc.py), min,
max, the target's current count, optional behavior rules and the remembered recommendations.
Upstream's `recommendations: nil` is a controller that never saw the HPA (its first reconcile
records the current count as a recommendation); `[]timestampedRecommendation{}` one that has,
with nothing in the window - our `PolicyState()` and a state with `last_at` set, respectively.
Without `behavior` the HPA keeps a 5-minute scale-down window and calculateScaleUpLimit (raised
to max(8 x current, 4) by that file's init()), which LEGACY_* express.
"""
from __future__ import annotations

from typing import Any

import pytest

from emailqueue_operator.scaling import PolicyState

from .harness import LEGACY_DOWN, LEGACY_TEST_UP, NOW, cpu_utilization, hpa_spec, rules, run, seen_before

FIRST = "nil"  # upstream recommendations: nil - the controller's first reconcile of this HPA
SEEN: tuple[tuple[float, int], ...] = ()  # upstream recommendations: []timestampedRecommendation{}


def cpu(levels: list[int], requests: list[int]) -> int:
    """Usage of a CPU case in our terms: whole-percent utilization x the pods reporting."""
    return cpu_utilization(levels, requests) * len(levels)


def _case(name: str, min_r: int, max_r: int, current: int, usage: int, target: float, expected: int,
          recommendations: Any = FIRST, up: dict[str, Any] | None = None, down: dict[str, Any] | None = None) -> Any:
    return pytest.param(min_r, max_r, current, usage, target, expected, recommendations, up, down, id=name)


ONE = [1000] * 3
CASES = [
    # horizontal_test.go TestScaleUp (CPU 50 % of 30 % target on 3 pods)
    _case("TestScaleUp", 2, 6, 3, cpu([300, 500, 700], ONE), 30, 5),
    # horizontal_test.go TestScaleUpContainer (the same numbers for one container)
    _case("TestScaleUpContainer", 2, 6, 3, cpu([300, 500, 700], ONE), 30, 5),
    # horizontal_test.go TestScaleUpDeployment (a Deployment target, the same numbers)
    _case("TestScaleUpDeployment", 2, 6, 3, cpu([300, 500, 700], ONE), 30, 5),
    # horizontal_test.go TestScaleUpCM (pods metric 20/10/30 of 15 per pod)
    _case("TestScaleUpCM", 2, 6, 3, 60_000, 15_000, 4),
    # horizontal_test.go TestScaleUpPerPodCMObject (40 on the object, 10 per pod)
    _case("TestScaleUpPerPodCMObject", 2, 6, 3, 40_000, 10_000, 4),
    # horizontal_test.go TestScaleUpPerPodCMExternal (8.6 external, 2.222 per pod: KEDA's shape)
    _case("TestScaleUpPerPodCMExternal", 2, 6, 3, 8_600, 2_222, 4),
    # horizontal_test.go TestScaleDown (CPU 28 % of 50 % on 5 pods)
    _case("TestScaleDown", 2, 6, 5, cpu([100, 300, 500, 250, 250], [1000] * 5), 50, 3, SEEN),
    # horizontal_test.go TestScaleDownContainerResource
    _case("TestScaleDownContainerResource", 2, 6, 5, cpu([100, 300, 500, 250, 250], [1000] * 5), 50, 3, SEEN),
    # horizontal_test.go TestScaleDownWithScalingRules (scaleUp rules set, scaleDown defaulted)
    _case("TestScaleDownWithScalingRules", 2, 6, 5, cpu([100, 300, 500, 250, 250], [1000] * 5), 50, 3, SEEN,
          up=rules(percent=100, percent_period=15, stabilization=30), down={}),
    # horizontal_test.go TestScaleDownStabilizeInitialSize: the first reconcile records the current 5, so the
    # scale-down to 3 waits out the window (issue 12: we dropped to 3 at once)
    _case("TestScaleDownStabilizeInitialSize", 2, 6, 5, cpu([100, 300, 500, 250, 250], [1000] * 5), 50, 5),
    # horizontal_test.go TestScaleDownCM (pods metric 5 x 12 of 20 per pod)
    _case("TestScaleDownCM", 2, 6, 5, 60_000, 20_000, 3, SEEN),
    # horizontal_test.go TestScaleDownPerPodCMObject (60 on the object, 20 per pod)
    _case("TestScaleDownPerPodCMObject", 2, 6, 5, 60_000, 20_000, 3, SEEN),
    # horizontal_test.go TestScaleDownPerPodCMExternal (8.6 external, 3 per pod)
    _case("TestScaleDownPerPodCMExternal", 2, 6, 5, 8_600, 3_000, 3, SEEN),
    # horizontal_test.go TestTolerance (CPU 102 % of 100 %)
    _case("TestTolerance", 1, 5, 3, cpu([1010, 1030, 1020], [900, 1000, 1100]), 100, 3),
    # horizontal_test.go TestToleranceCM (pods metric averaging 20.333 of 20)
    _case("TestToleranceCM", 1, 5, 3, 61_001, 20_000, 3),
    # horizontal_test.go TestTolerancePerPodCMObject (8.6 on the object, 2.2 per pod, 4 pods)
    _case("TestTolerancePerPodCMObject", 2, 6, 4, 8_600, 2_200, 4),
    # horizontal_test.go TestTolerancePerPodCMExternal
    _case("TestTolerancePerPodCMExternal", 2, 6, 4, 8_600, 2_200, 4),
    # horizontal_test.go TestMinReplicas (CPU 3 % of 90 %: 1 wanted, min 2)
    _case("TestMinReplicas", 2, 5, 3, cpu([10, 95, 10], [900, 1000, 1100]), 90, 2, SEEN),
    # horizontal_test.go TestMinReplicasDesiredZero
    _case("TestMinReplicasDesiredZero", 2, 5, 3, cpu([0, 0, 0], [900, 1000, 1100]), 90, 2, SEEN),
    # horizontal_test.go TestTooFewReplicas (below min: min, before any metric matters)
    _case("TestTooFewReplicas", 3, 5, 2, 0, 90, 3),
    # horizontal_test.go TestTooManyReplicas (above max: max, before any metric matters)
    _case("TestTooManyReplicas", 3, 5, 10, 0, 90, 5),
    # horizontal_test.go TestMaxReplicas (CPU 616 % of 90 %: 21 wanted, max 5)
    _case("TestMaxReplicas", 2, 5, 3, cpu([8000, 9500, 1000], [900, 1000, 1100]), 90, 5),
    # horizontal_test.go TestUpscaleCap (Percent 700 per 60 s: 3 -> 24 of 60 wanted)
    _case("TestUpscaleCap", 1, 100, 3, cpu([100, 200, 300], [100] * 3), 10, 24,
          up=rules(percent=700, percent_period=60), down={}),
    # horizontal_test.go TestUpscaleCapGreaterThanMaxReplicas
    _case("TestUpscaleCapGreaterThanMaxReplicas", 1, 20, 3, cpu([100, 200, 300], [100] * 3), 10, 20,
          up=rules(percent=700, percent_period=60), down={}),
    # horizontal_test.go TestStabilizeDownscale (2 wanted; 4 recommended a minute ago holds 4)
    _case("TestStabilizeDownscale", 1, 5, 4, cpu([50, 50, 50], [100] * 3), 100, 4,
          ((NOW - 600, 10), (NOW - 60, 4))),
    # horizontal_test.go TestNoBackoffUpscaleCM (a scale a moment ago does not hold the next one back)
    _case("TestNoBackoffUpscaleCM", 1, 5, 3, 60_000, 15_000, 4),
    # horizontal_test.go TestScaleUpRCImmediately (below min: up at once)
    _case("TestScaleUpRCImmediately", 2, 6, 1, 0, 1, 2),
    # horizontal_test.go TestScaleDownRCImmediately (above max: down at once)
    _case("TestScaleDownRCImmediately", 2, 5, 6, cpu([8000, 9500, 1000], [900, 1000, 1100]), 50, 5),
    # horizontal_test.go TestEventCreated (CPU 100 % of 50 % on 1 pod)
    _case("TestEventCreated", 1, 5, 1, cpu([200], [200]), 50, 2),
    # horizontal_test.go TestEventNotCreated (on target)
    _case("TestEventNotCreated", 1, 5, 2, cpu([200, 200], [400, 400]), 50, 2),
    # horizontal_test.go TestComputedToleranceAlgImplementation, tc1 (just outside 10 %: 10 -> 9)
    _case("TestComputedToleranceAlgImplementation tc1", 0, 1000, 10,
          cpu([150] * 10, [400, 200, 310, 290, 302, 298, 301, 299, 300, 300]), 56, 9, SEEN),
    # horizontal_test.go TestComputedToleranceAlgImplementation, tc2 (just inside: keep 10)
    _case("TestComputedToleranceAlgImplementation tc2", 0, 1000, 10,
          cpu([150] * 10, [400, 200, 310, 290, 302, 298, 301, 299, 300, 300]), 55, 10, SEEN),
]


@pytest.mark.parametrize(("min_r", "max_r", "current", "usage", "target", "expected", "recommendations", "up",
                          "down"), CASES)
def test_reconcile(min_r: int, max_r: int, current: int, usage: int, target: float, expected: int,
                   recommendations: Any, up: dict[str, Any] | None, down: dict[str, Any] | None) -> None:
    spec = hpa_spec(min_replicas=min_r, max_replicas=max_r, per_replica=target,
                    up=LEGACY_TEST_UP if up is None else up, down=LEGACY_DOWN if down is None else down)
    state = PolicyState() if recommendations == FIRST else seen_before(recommendations=recommendations)
    assert run(spec, usage, current, state).replicas == expected


def test_zero_min_replicas_desired_zero() -> None:
    # horizontal_test.go TestZeroMinReplicasDesiredZero: min 0, no load -> 0. With min 0 the N -> 0 step is KEDA's
    # (cooldownSeconds after the last activity); with cooldownSeconds 0 it is as immediate as the HPA's.
    spec = hpa_spec(min_replicas=0, max_replicas=5, per_replica=90, up=LEGACY_TEST_UP, down=LEGACY_DOWN, cooldown=0)
    assert run(spec, 0, 3).replicas == 0


def test_deviation_zero_min_replicas_waits_for_the_cooldown() -> None:
    # DEVIATION (horizontal_test.go TestZeroMinReplicasDesiredZero with our default cooldownSeconds 300): the HPA
    # (HPAScaleToZero) drops to 0 at once; we keep 1 until a full cooldown without backlog or arrivals, as KEDA's
    # cooldownPeriod does, because a cold start costs every message that arrives meanwhile its start-up time.
    spec = hpa_spec(min_replicas=0, max_replicas=5, per_replica=90, up=LEGACY_TEST_UP, down=LEGACY_DOWN)
    decision = run(spec, 0, 3)
    assert decision.replicas == 1 and "cooldown" in decision.limits
    assert run(spec, 0, 1, decision.state, now=NOW + 300).replicas == 0


def test_deviation_a_target_at_zero_is_raised_to_min() -> None:
    # DEVIATION (horizontal_test.go TestZeroReplicas): the HPA treats a target at 0 with minReplicas 3 as
    # "autoscaling disabled" and leaves it at 0. We also own 0 <-> 1 (KEDA's part), so a target found at 0 with
    # replicas.min >= 1 is raised to min, as KEDA raises a ScaledObject's target to minReplicaCount.
    spec = hpa_spec(min_replicas=3, max_replicas=5, per_replica=90, up=LEGACY_TEST_UP, down=LEGACY_DOWN)
    decision = run(spec, 0, 0, PolicyState())
    assert decision.replicas == 3 and "min" in decision.limits
