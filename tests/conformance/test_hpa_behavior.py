"""The HPA's behavior logic, case by case from upstream's own tables.

Source: kubernetes/kubernetes pkg/controller/podautoscaler/horizontal_test.go (k8s.io/kubernetes,
a 1.33+ version): TestScalingWithRules (convertDesiredReplicasWithBehaviorRate: rate policies, min,
max), TestNormalizeDesiredReplicasWithBehavior (stabilizeRecommendationWithBehaviors),
TestNormalizeDesiredReplicas (the behavior-less stabilizeRecommendation KEDA gets by default),
TestCalculateScaleUpLimitWithScalingRules, TestCalculateScaleDownLimitWithBehaviors and
TestConvertDesiredReplicasWithRules.

Each upstream case feeds its "prenormalized desired replicas" to our `decide` as a backlog at
one message per replica with tolerance 0 (upstream calls the normalization step directly, after
the tolerance), and its recorded scale events and recommendations as our PolicyState.
"""
from __future__ import annotations

from typing import Any

import pytest

from emailqueue_operator.scaling import scale_down_limit, scale_up_limit
from emailqueue_operator.spec import ScalingPolicy, ScalingRules

from .harness import (
    CONDITION_LIMIT,
    LEGACY_DOWN,
    LEGACY_TEST_UP,
    NOW,
    RATE_LIMITS,
    UNLIMITED_DOWN,
    UNLIMITED_UP,
    hpa_spec,
    rules,
    run,
    seen_before,
    uniform_events,
)

UP, DOWN = +1, -1


def _case(name: str, current: int, desired: int, min_r: int, max_r: int, expected: int, condition: str,
          up: dict[str, Any] | None = None, down: dict[str, Any] | None = None,
          up_events: tuple[list[int], int] | None = None, down_events: tuple[list[int], int] | None = None) -> Any:
    return pytest.param(current, desired, min_r, max_r, expected, condition, up, down, up_events, down_events, id=name)


# horizontal_test.go TestScalingWithRules, every row in upstream's order (key/testThis dropped).
SCALING_WITH_RULES = [
    # TestScalingWithRules: prenormalized desired replicas within range
    _case("within range", 5, 7, 3, 8, 7, "DesiredWithinRange"),
    # TestScalingWithRules: prenormalized desired replicas < minReplicas
    _case("below min", 3, 1, 2, 8, 2, "TooFewReplicas"),
    # TestScalingWithRules: prenormalized desired replicas within range when minReplicas is 0
    # (min 0 goes through KEDA's N->0 step here; with cooldownSeconds 0 it is immediate, as the HPA's)
    _case("to zero when min is 0", 1, 0, 0, 10, 0, "DesiredWithinRange"),
    # TestScalingWithRules: maxReplicas is the limit because maxReplicas < scaleUpLimit
    _case("max below the scale-up limit", 20, 1000, 1, 10, 10, "TooManyReplicas"),
    # TestScalingWithRules: desired replica count is more than the maximum replica count
    _case("desired above max", 100, 1000, 100, 150, 150, "TooManyReplicas"),
    # TestScalingWithRules: scaleUpLimit is the limit because scaleUpLimit < maxReplicas with user policies
    _case("user percent policy limits", 3, 1000, 1, 2000, 4, "ScaleUpLimit", up=rules(percent=1, percent_period=60)),
    # TestScalingWithRules: scaleDownLimit is the limit because scaleDownLimit > minReplicas with user defined
    # policies (upstream skips this row, testThis: true; it holds here)
    _case("user pods policy limits scale-down", 1000, 3, 3, 2000, 980, "ScaleDownLimit",
          down=rules(pods=20, pods_period=60)),
    # TestScalingWithRules: scaleUp with default behavior
    _case("default scale-up behavior", 10, 50, 1, 1000, 20, "ScaleUpLimit"),
    # TestScalingWithRules: scaleUp with pods policy larger than percent policy
    _case("pods policy larger", 10, 500, 1, 1000, 110, "ScaleUpLimit",
          up=rules(pods=100, pods_period=60, percent=100, percent_period=60)),
    # TestScalingWithRules: scaleUp with percent policy larger than pods policy
    _case("percent policy larger", 10, 500, 1, 1000, 20, "ScaleUpLimit",
          up=rules(pods=2, pods_period=60, percent=100, percent_period=60)),
    # TestScalingWithRules: scaleUp with spec MaxReplicas limitation with large pod policy
    _case("large pod policy", 10, 50, 1, 1000, 50, "DesiredWithinRange", up=rules(pods=100, pods_period=60)),
    # TestScalingWithRules: scaleUp with spec MaxReplicas limitation with large percent policy
    _case("large percent policy", 10, 50, 1, 1000, 50, "DesiredWithinRange", up=rules(pods=10000, pods_period=60)),
    # TestScalingWithRules: scaleUp with pod policy limitation
    _case("pod policy limitation", 10, 50, 1, 1000, 40, "ScaleUpLimit", up=rules(pods=30, pods_period=60)),
    # TestScalingWithRules: scaleUp with percent policy limitation
    _case("percent policy limitation", 10, 50, 1, 1000, 30, "ScaleUpLimit",
          up=rules(percent=200, percent_period=60)),
    # TestScalingWithRules: scaleDown with percent policy larger than pod policy
    _case("down: percent larger than pods", 100, 2, 1, 1000, 80, "ScaleDownLimit",
          down=rules(pods=20, pods_period=60, percent=1, percent_period=60, stabilization=300)),
    # TestScalingWithRules: scaleDown with pod policy larger than percent policy
    _case("down: pods larger than percent", 100, 2, 1, 1000, 98, "ScaleDownLimit",
          down=rules(pods=2, pods_period=60, percent=1, percent_period=60, stabilization=300)),
    # TestScalingWithRules: scaleDown with spec MinReplicas=nil limitation with large pod policy
    _case("down: min nil, large pod policy", 10, 0, 1, 1000, 1, "TooFewReplicas",
          down=rules(pods=100, pods_period=60, stabilization=300)),
    # TestScalingWithRules: scaleDown with spec MinReplicas limitation with large pod policy
    _case("down: min, large pod policy", 10, 0, 1, 1000, 1, "TooFewReplicas",
          down=rules(pods=100, pods_period=60, stabilization=300)),
    # TestScalingWithRules: scaleDown with spec MinReplicas limitation with large percent policy
    _case("down: min, large percent policy", 10, 2, 5, 1000, 5, "TooFewReplicas",
          down=rules(percent=100, percent_period=60, stabilization=300)),
    # TestScalingWithRules: scaleDown with pod policy limitation
    _case("down: pod policy limitation", 10, 2, 1, 1000, 5, "ScaleDownLimit",
          down=rules(pods=5, pods_period=60, stabilization=300)),
    # TestScalingWithRules: scaleDown with percent policy limitation
    _case("down: percent policy limitation", 10, 5, 1, 1000, 5, "DesiredWithinRange",
          down=rules(percent=50, percent_period=60, stabilization=300)),
    # TestScalingWithRules: scaleUp with spec MaxReplicas limitation with large pod policy and events
    _case("up: max, large pod policy, events", 100, 500, 1, 200, 200, "TooManyReplicas",
          up=rules(pods=300, pods_period=60), up_events=([1, 5, 9], 120)),
    # TestScalingWithRules: scaleUp with spec MaxReplicas limitation with large percent policy and events
    _case("up: max, large percent policy, events", 100, 500, 1, 200, 200, "TooManyReplicas",
          up=rules(percent=10000, percent_period=60), up_events=([1, 5, 9], 120)),
    # TestScalingWithRules: scaleUp with currentReplicas limitation with rate.PeriodSeconds with a lot of recent
    # scale up events (100 - 15 + 5 < 100: hold, never below current)
    _case("up: recent events exhaust the policy", 100, 500, 1, 1000, 100, "ScaleUpLimit",
          up=rules(pods=5, pods_period=120), up_events=([1, 5, 9], 120)),
    # TestScalingWithRules: scaleUp with pod policy and previous scale up events (100 - 15 + 150)
    _case("up: pod policy, previous events", 100, 500, 1, 1000, 235, "ScaleUpLimit",
          up=rules(pods=150, pods_period=120), up_events=([1, 5, 9], 120)),
    # TestScalingWithRules: scaleUp with percent policy and previous scale up events ((100 - 15) + 200 %)
    _case("up: percent policy, previous events", 100, 500, 1, 1000, 255, "ScaleUpLimit",
          up=rules(percent=200, percent_period=120), up_events=([1, 5, 9], 120)),
    # TestScalingWithRules: scaleUp with percent policy and previous scale up and down events
    _case("up: percent policy, up and down events", 6, 24, 1, 1000, 16, "ScaleUpLimit",
          up=rules(percent=300, percent_period=300), up_events=([4], 120), down_events=([2], 120)),
    # TestScalingWithRules: scaleDown with default policy and previous events
    _case("down: default policy, previous events", 10, 5, 1, 1000, 5, "DesiredWithinRange",
          down_events=([1, 5, 9], 120)),
    # TestScalingWithRules: scaleDown with spec MinReplicas=nil limitation with large pod policy and previous events
    _case("down: min nil, large pod policy, events", 100, 0, 1, 1000, 1, "TooFewReplicas",
          down=rules(pods=115, pods_period=120, stabilization=300), down_events=([1, 5, 9], 120)),
    # TestScalingWithRules: scaleDown with spec MinReplicas limitation with large pod policy and previous events
    _case("down: min, large pod policy, events", 100, 0, 5, 1000, 5, "TooFewReplicas",
          down=rules(pods=130, pods_period=120, stabilization=300), down_events=([1, 5, 9], 120)),
    # TestScalingWithRules: scaleDown with spec MinReplicas limitation with large percent policy and previous events
    _case("down: min, 100 % policy, events", 100, 2, 5, 1000, 5, "TooFewReplicas",
          down=rules(percent=100, percent_period=120, stabilization=300), down_events=([1, 5, 9], 120)),
    # TestScalingWithRules: scaleDown with pod policy limitation and previous events (100 + 15 - 5)
    _case("down: pod policy, previous events", 100, 2, 1, 1000, 100, "ScaleDownLimit",
          down=rules(pods=5, pods_period=120, stabilization=300), down_events=([1, 5, 9], 120)),
    # TestScalingWithRules: scaleDown with percent policy limitation and previous events ((100 + 12) - 50 %)
    _case("down: percent policy, previous events", 100, 0, 1, 1000, 56, "ScaleDownLimit",
          down=rules(percent=50, percent_period=120, stabilization=300), down_events=([2, 4, 6], 120)),
    # TestScalingWithRules: scaleDown with percent policy and previous scale up and down events
    _case("down: percent policy, up and down events", 10, 1, 1, 1000, 6, "ScaleDownLimit",
          down=rules(percent=50, percent_period=180), up_events=([2], 120), down_events=([4], 120)),
    # TestScalingWithRules: scaleDown with previous events preventing further scale down ((100 + 30) - 10 % > 100)
    _case("down: previous events prevent more", 100, 0, 1, 1000, 100, "ScaleDownLimit",
          down=rules(percent=10, percent_period=120, stabilization=300), down_events=([10, 10, 10], 120)),
    # TestScalingWithRules: scaleDown with with previous events still allowing more scale down
    _case("down: previous events still allow more", 10, 5, 1, 1000, 5, "DesiredWithinRange",
          down=rules(percent=1000, percent_period=120, stabilization=300), down_events=([10, 10, 10], 120)),
    # TestScalingWithRules: check 'outdated' flag for events for one behavior for up
    _case("up: outdated events, one policy", 100, 200, 1, 1000, 200, "DesiredWithinRange",
          up=rules(pods=1000, pods_period=60), up_events=([8, 12, 9, 11], 120)),
    # TestScalingWithRules: check that events were not marked 'outdated' for two different policies in the behavior
    # for up
    _case("up: events kept for two policies", 100, 200, 1, 1000, 200, "DesiredWithinRange",
          up=rules(pods=1000, pods_period=120, percent=100, percent_period=60), up_events=([8, 12, 9, 11], 120)),
    # TestScalingWithRules: check that events were marked 'outdated' for two different policies in the behavior for up
    _case("up: events outdated for two policies", 100, 200, 1, 1000, 200, "DesiredWithinRange",
          up=rules(pods=1000, pods_period=30, percent=100, percent_period=60), up_events=([8, 12, 9, 11], 120)),
    # TestScalingWithRules: check 'outdated' flag for events for one behavior for down
    _case("down: outdated events, one policy", 100, 5, 1, 1000, 5, "DesiredWithinRange",
          down=rules(pods=1000, pods_period=60, stabilization=300), down_events=([8, 12, 9, 11], 120)),
    # TestScalingWithRules: check that events were not marked 'outdated' for two different policies in the behavior
    # for down
    _case("down: events kept for two policies", 100, 5, 1, 1000, 5, "DesiredWithinRange",
          down=rules(pods=1000, pods_period=120, percent=100, percent_period=60, stabilization=300),
          down_events=([8, 12, 9, 11], 120)),
    # TestScalingWithRules: check that events were marked 'outdated' for two different policies in the behavior
    # for down
    _case("down: events outdated for two policies", 100, 5, 1, 1000, 5, "DesiredWithinRange",
          down=rules(pods=1000, pods_period=30, percent=100, percent_period=60, stabilization=300),
          down_events=([8, 12, 9, 11], 120)),
]


@pytest.mark.parametrize(("current", "desired", "min_r", "max_r", "expected", "condition", "up", "down",
                          "up_events", "down_events"), SCALING_WITH_RULES)
def test_scaling_with_rules(current: int, desired: int, min_r: int, max_r: int, expected: int, condition: str,
                            up: dict[str, Any] | None, down: dict[str, Any] | None,
                            up_events: tuple[list[int], int] | None, down_events: tuple[list[int], int] | None) -> None:
    events: tuple[tuple[float, int], ...] = ()
    if up_events:
        events += uniform_events(*up_events, sign=UP)
    if down_events:
        events += uniform_events(*down_events, sign=DOWN)
    # upstream calls convertDesiredReplicasWithBehaviorRate on its own: no stabilization, no tolerance
    up_rules = {**(up or {}), "stabilizationSeconds": 0}
    down_rules = {**(down or {}), "stabilizationSeconds": 0}
    spec = hpa_spec(min_replicas=min_r, max_replicas=max_r, up=up_rules, down=down_rules, tolerance=0, cooldown=0)
    decision = run(spec, desired, current, seen_before(scale_events=tuple(sorted(events))))
    assert decision.replicas == expected
    limit = CONDITION_LIMIT[condition]
    assert (set(decision.limits) & RATE_LIMITS) == ({limit} if limit else set()), decision.reason


def _rec(replicas: int, minutes_ago: float) -> tuple[float, int]:
    return (NOW - 60 * minutes_ago, replicas)


# horizontal_test.go TestNormalizeDesiredReplicasWithBehavior (stabilizeRecommendationWithBehaviors):
# (recommendations, current, prenormalized desired, up window, down window, expected)
STABILIZE_WITH_BEHAVIORS = [
    # TestNormalizeDesiredReplicasWithBehavior: empty recommendations for scaling down
    pytest.param((), 100, 5, 0, 0, 5, id="empty recommendations for scaling down"),
    # TestNormalizeDesiredReplicasWithBehavior: simple scale down stabilization
    pytest.param((_rec(4, 2), _rec(5, 1)), 100, 3, 0, 180, 5, id="simple scale down stabilization"),
    # TestNormalizeDesiredReplicasWithBehavior: simple scale up stabilization
    pytest.param((_rec(4, 2), _rec(5, 1)), 1, 7, 300, 0, 4, id="simple scale up stabilization"),
    # TestNormalizeDesiredReplicasWithBehavior: no scale down stabilization
    pytest.param((_rec(1, 2), _rec(2, 1)), 100, 3, 300, 0, 3, id="no scale down stabilization"),
    # TestNormalizeDesiredReplicasWithBehavior: no scale up stabilization
    pytest.param((_rec(4, 2), _rec(5, 1)), 1, 3, 0, 300, 3, id="no scale up stabilization"),
    # TestNormalizeDesiredReplicasWithBehavior: no scale down stabilization, reuse recommendation element
    pytest.param((_rec(10, 10), _rec(9, 9)), 100, 3, 0, 0, 3, id="no scale down stabilization, old entries"),
    # TestNormalizeDesiredReplicasWithBehavior: no scale up stabilization, reuse recommendation element
    pytest.param((_rec(10, 10), _rec(9, 9)), 1, 100, 0, 0, 100, id="no scale up stabilization, old entries"),
    # TestNormalizeDesiredReplicasWithBehavior: scale down stabilization, reuse one of obsolete recommendation element
    pytest.param((_rec(10, 10), _rec(4, 1), _rec(5, 2), _rec(9, 9)), 100, 3, 0, 180, 5,
                 id="scale down stabilization, obsolete entries"),
    # TestNormalizeDesiredReplicasWithBehavior: scale up stabilization, reuse one of obsolete recommendation element
    # (upstream's comment: scale-down window 300 by default; the struct leaves it 0, so 0 here too)
    pytest.param((_rec(10, 100), _rec(6, 1), _rec(5, 2), _rec(9, 3)), 1, 100, 300, 0, 5,
                 id="scale up stabilization, obsolete entries"),
    # TestNormalizeDesiredReplicasWithBehavior: scale up and down stabilization, do not scale up when prenormalized
    # rec goes down
    pytest.param((_rec(2, 100), _rec(3, 3)), 2, 1, 300, 300, 2, id="up and down windows, desired goes down"),
    # TestNormalizeDesiredReplicasWithBehavior: scale up and down stabilization, do not scale down when prenormalized
    # rec goes up
    pytest.param((_rec(2, 100), _rec(1, 3)), 2, 3, 300, 300, 2, id="up and down windows, desired goes up"),
]


@pytest.mark.parametrize(("recommendations", "current", "desired", "up_window", "down_window", "expected"),
                         STABILIZE_WITH_BEHAVIORS)
def test_stabilize_recommendation_with_behaviors(recommendations: tuple[tuple[float, int], ...], current: int,
                                                 desired: int, up_window: int, down_window: int,
                                                 expected: int) -> None:
    spec = hpa_spec(min_replicas=1, max_replicas=1000, tolerance=0,
                    up={**UNLIMITED_UP, "stabilizationSeconds": up_window},
                    down={**UNLIMITED_DOWN, "stabilizationSeconds": down_window})
    decision = run(spec, desired, current, seen_before(recommendations=tuple(sorted(recommendations))))
    assert decision.replicas == expected
    # the unstabilized recommendation is what is remembered, as upstream records it
    assert (NOW, desired) in decision.state.recommendations or up_window == down_window == 0


# horizontal_test.go TestNormalizeDesiredReplicas (stabilizeRecommendation, the HPA without spec.behavior:
# the max over a 5-minute window; what KEDA gets unless advanced.horizontalPodAutoscalerConfig sets behavior).
# Upstream's function does not look at the current count; a current of 100 lets the window maximum show.
NORMALIZE_LEGACY = [
    # TestNormalizeDesiredReplicas: empty log
    pytest.param((), 5, 5, id="empty log"),
    # TestNormalizeDesiredReplicas: stabilize
    pytest.param((_rec(4, 2), _rec(5, 1)), 3, 5, id="stabilize"),
    # TestNormalizeDesiredReplicas: no stabilize
    pytest.param((_rec(1, 2), _rec(2, 1)), 3, 3, id="no stabilize"),
    # TestNormalizeDesiredReplicas: no stabilize - old recommendations
    pytest.param((_rec(10, 10), _rec(9, 9)), 3, 3, id="no stabilize - old recommendations"),
    # TestNormalizeDesiredReplicas: stabilize - old recommendations
    pytest.param((_rec(10, 10), _rec(4, 1), _rec(5, 2), _rec(9, 9)), 3, 5, id="stabilize - old recommendations"),
]


@pytest.mark.parametrize(("recommendations", "desired", "expected"), NORMALIZE_LEGACY)
def test_normalize_desired_replicas_without_behavior(recommendations: tuple[tuple[float, int], ...], desired: int,
                                                     expected: int) -> None:
    spec = hpa_spec(min_replicas=1, max_replicas=1000, tolerance=0, up=UNLIMITED_UP,
                    down={**UNLIMITED_DOWN, "stabilizationSeconds": 300})
    decision = run(spec, desired, 100, seen_before(recommendations=tuple(sorted(recommendations))))
    assert decision.replicas == expected


def test_calculate_scale_up_limit_with_scaling_rules() -> None:
    # horizontal_test.go TestCalculateScaleUpLimitWithScalingRules: Min of Pods 2/60 s and Percent 50/60 s from 1
    rules_min = ScalingRules(300, "Min", (ScalingPolicy("Pods", 2, 60), ScalingPolicy("Percent", 50, 60)))
    assert scale_up_limit(1, (), rules_min, NOW) == 2


def test_calculate_scale_down_limit_with_behaviors() -> None:
    # horizontal_test.go TestCalculateScaleDownLimitWithBehaviors: Min of Pods 2/60 s and Percent 50/60 s from 5
    rules_min = ScalingRules(300, "Min", (ScalingPolicy("Pods", 2, 60), ScalingPolicy("Percent", 50, 60)))
    assert scale_down_limit(5, (), rules_min, NOW) == 3


# horizontal_test.go TestConvertDesiredReplicasWithRules (the HPA without spec.behavior: min, max and
# calculateScaleUpLimit, which that file's init() raises to max(8 x current, 4)).
CONVERT_WITH_RULES = [
    # TestConvertDesiredReplicasWithRules: prenormalized desired replicas within range
    pytest.param(5, 7, 3, 8, 7, "DesiredWithinRange", id="within range"),
    # TestConvertDesiredReplicasWithRules: prenormalized desired replicas < minReplicas
    pytest.param(3, 1, 2, 8, 2, "TooFewReplicas", id="below min"),
    # TestConvertDesiredReplicasWithRules: prenormalized desired zeroed replicas within range
    pytest.param(1, 0, 0, 10, 0, "DesiredWithinRange", id="zero within range"),
    # TestConvertDesiredReplicasWithRules: maxReplicas is the limit because maxReplicas < scaleUpLimit
    pytest.param(20, 1000, 1, 10, 10, "TooManyReplicas", id="max below scale-up limit"),
    # TestConvertDesiredReplicasWithRules: scaleUpLimit is the limit because scaleUpLimit < maxReplicas
    pytest.param(3, 1000, 1, 2000, 24, "ScaleUpLimit", id="scale-up limit below max"),
]


@pytest.mark.parametrize(("current", "desired", "min_r", "max_r", "expected", "condition"), CONVERT_WITH_RULES)
def test_convert_desired_replicas_with_rules(current: int, desired: int, min_r: int, max_r: int, expected: int,
                                             condition: str) -> None:
    spec = hpa_spec(min_replicas=min_r, max_replicas=max_r, tolerance=0, cooldown=0,
                    up=LEGACY_TEST_UP, down={**LEGACY_DOWN, "stabilizationSeconds": 0})
    decision = run(spec, desired, current)
    assert decision.replicas == expected
    limit = CONDITION_LIMIT[condition]
    assert (set(decision.limits) & RATE_LIMITS) == ({limit} if limit else set())


def test_deviation_default_scale_up_limit_is_the_behavior_default_not_the_legacy_one() -> None:
    # DEVIATION (horizontal.go calculateScaleUpLimit, as in TestConvertDesiredReplicasWithRules without the test's
    # factor 8): an HPA without spec.behavior - KEDA's default - allows max(2 x current, 4) per sync, 6 from 3.
    # Our default is the HPA's behavior default (Percent 100 and Pods 4 per 15 s, Max): max(2 x current,
    # current + 4), 7 from 3. Reason: the CRD has one behavior model; the legacy rule exists only for HPAs
    # written before spec.behavior, and the behavior default is what `kubectl explain` documents.
    spec = hpa_spec(min_replicas=1, max_replicas=2000, tolerance=0)
    assert run(spec, 1000, 3).replicas == 7
