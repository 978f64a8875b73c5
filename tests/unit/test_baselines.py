"""Reference policies behave as their documentation says (KEDA + HPA legacy, static, ideal-reactive,
clairvoyant, ours); the bounds have their own tests (test_bounds.py)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from emailqueue_operator import baselines, sim
from emailqueue_operator.baselines import (
    Clairvoyant,
    IdealReactive,
    KedaExpectedConsumptionTime,
    KedaMessageRate,
    KedaQueueLength,
    OurPolicy,
    StaticFleet,
)
from emailqueue_operator.sim import SimView, load_scenario, simulate


def view(**fields: Any) -> SimView:
    base: dict[str, Any] = dict(t=0.0, ready=0.0, unacked=0.0, consumers=3, publish_rate=0.0, ack_rate=0.0,
                                oldest_age_seconds=0.0, current_replicas=3, ready_replicas=3,
                                true_arrival_rate=0.0, true_backlog=0.0)
    base.update(fields)
    return SimView(**base)


def keda(**kw: Any) -> KedaQueueLength:
    args: dict[str, Any] = dict(min_replicas=3, max_replicas=60)
    args.update(kw)
    return KedaQueueLength(**args)


# --------------------------------------------------------------------------- KEDA QueueLength + HPA
def test_keda_default_value_is_20_per_pod() -> None:
    assert keda().value == 20
    assert keda().step(0, view(ready=200, current_replicas=3)) == 6  # ceil(200/20)=10, capped by max(2*3, 4)


def test_keda_scale_up_is_limited_to_max_of_double_and_four_per_sync() -> None:
    incident = load_scenario("incident-2023-09-20")
    series = simulate(incident, baselines.keda_queue_length(incident)).series
    changes = [(t, before, after) for t, before, after in
               zip(series.t[1:], series.replicas[:-1], series.replicas[1:], strict=True) if after != before]
    ups = [c for c in changes if c[2] > c[1]]
    assert ups, "the surge must trigger scale-up"
    for t, before, after in ups:
        assert t % 15 == 0  # only at HPA syncs
        assert after <= max(2 * before, 4)
    assert [after for _, _, after in ups[:5]] == [6, 12, 24, 48, 60]


def test_keda_default_answers_every_hpa_sync_with_a_fresh_metric() -> None:
    # KEDA's default (useCachedMetrics: false): the metrics server asks the scaler at every
    # 15 s HPA sync; the 30 s pollingInterval does not delay the HPA.
    policy = keda()
    assert policy.use_cached_metrics is False
    assert policy.step(0, view(ready=0)) == 3
    assert policy.step(15, view(t=15, ready=1000)) == 6  # between KEDA polls, seen at once


def test_keda_cached_metrics_hold_the_value_of_the_last_poll() -> None:
    # useCachedMetrics: true — the HPA reads what KEDA's operator cached at its 30 s poll.
    policy = keda(use_cached_metrics=True)
    assert policy.step(0, view(ready=0)) == 3
    assert policy.step(15, view(t=15, ready=1000)) == 3  # still the t=0 sample
    assert policy.step(30, view(t=30, ready=1000)) == 6  # the next KEDA poll


@pytest.mark.parametrize(("cached", "last_high", "down_at"), [
    (False, 0, 300),   # fresh: the HPA at t=15 already reads 0; the t=0 recommendation ages out at 300 s
    (True, 15, 315),   # cached: the HPA at t=15 still reads KEDA's t=0 sample (400)
])
def test_keda_waits_300s_of_lower_recommendations_before_scaling_down(cached: bool, last_high: int,
                                                                     down_at: int) -> None:
    policy = keda(use_cached_metrics=cached)
    assert policy.step(0, view(ready=400, current_replicas=10)) == 20
    for t in range(15, down_at, 15):
        assert policy.step(t, view(t=t, ready=0, current_replicas=20)) == 20, t
    assert policy.step(down_at, view(t=down_at, ready=0, current_replicas=20)) == 3
    assert down_at - last_high == 300


def test_hpa_first_sync_keeps_the_current_count_for_the_stabilization_window() -> None:
    # horizontal.go recordInitialRecommendation: taking over a Deployment at 10 replicas
    # whose demand is 2 pods, the HPA does not cut it at once.
    policy = keda(min_replicas=1)
    for t in range(0, 300, 15):
        assert policy.step(t, view(t=t, ready=40, current_replicas=10)) == 10, t
    assert policy.step(300, view(t=300, ready=40, current_replicas=10)) == 2


def test_hpa_clamps_a_count_outside_min_max_before_any_metric() -> None:
    assert keda(max_replicas=8).step(0, view(ready=0, current_replicas=12)) == 8
    assert keda(min_replicas=5).step(0, view(ready=10_000, current_replicas=2)) == 5


def test_keda_tolerance_keeps_the_fleet_within_10_percent() -> None:
    assert keda().step(0, view(ready=210, current_replicas=10)) == 10  # 10.5 wanted: within tolerance
    assert keda().step(0, view(ready=240, current_replicas=10)) == 12


@pytest.mark.parametrize(("messages", "expected"), [
    (110, 5),   # ratio exactly 1.1: upstream's (1 - t) <= ratio <= (1 + t) keeps 5
    (90, 5),    # exactly 0.9: kept
    (111, 6),   # just above: ceil(111 / 20)
    (89, 5),    # just below: ceil(89 / 20) = 5 as well
])
def test_keda_tolerance_boundary_is_inclusive_as_upstream(messages: int, expected: int) -> None:
    assert baselines.within_tolerance(110 / (20 * 5)) and baselines.within_tolerance(90 / (20 * 5))
    assert keda().step(0, view(ready=messages, current_replicas=5)) == expected


def test_keda_queue_length_over_amqp_ignores_unacked_messages() -> None:
    assert keda().step(0, view(ready=0, unacked=5000, current_replicas=3)) == 3
    assert keda(count_unacked=True).step(0, view(ready=0, unacked=100, current_replicas=3)) == 5


@pytest.mark.parametrize(("mode", "counts_unacked"), [
    ("management", True),              # HTTP protocol: `messages` = ready + unacked
    ("management-nocollector", True),  # HTTP protocol: the queue totals still carry `messages`
    ("prometheus", True),              # KEDA's Prometheus scaler on rabbitmq_queue_messages
    ("amqp", False),                   # AMQP protocol: `message_count` = ready only
])
def test_keda_queue_length_counts_what_the_mode_lets_it_read(mode: str, counts_unacked: bool) -> None:
    s = load_scenario("incident-2023-09-20")
    policy = baselines.keda_queue_length(s, observation=mode)
    assert policy.observation == mode and policy.count_unacked is counts_unacked
    unacked = None if mode == "amqp" else 100.0
    assert policy.sample(view(ready=40, unacked=unacked)) == (140 if counts_unacked else 40)
    # Without a mode: KEDA's default for an amqp:// host (ready only), as before modes existed.
    assert baselines.keda_queue_length(s).count_unacked is False


def test_keda_scale_to_zero_needs_activation_and_a_cooldown() -> None:
    policy = keda(min_replicas=0, activation_value=5)
    assert policy.step(0, view(ready=5, current_replicas=0)) == 0  # not above activationValue
    assert policy.step(15, view(t=15, ready=6, current_replicas=0)) == 0  # the HPA is off at 0; KEDA polls at 30
    assert policy.step(30, view(t=30, ready=6, current_replicas=0)) == 1  # activation: 0 -> 1
    # Active at t=30; empty afterwards: down to 0 at the first KEDA poll 300 s after the last activity.
    for t in range(45, 330, 15):
        assert policy.step(t, view(t=t, ready=0, current_replicas=1)) == 1, t
    assert policy.step(330, view(t=330, ready=0, current_replicas=1)) == 0


def test_keda_activation_is_ignored_when_min_is_at_least_one() -> None:
    # "If the minimum replicas is >= 1, the scaler is always active and the activation value will be ignored."
    policy = keda(min_replicas=1, activation_value=1000)
    for t in range(0, 600, 15):
        assert policy.step(t, view(t=t, ready=0, current_replicas=1)) == 1, t


# --------------------------------------------------------------------------- KEDA ExpectedQueueConsumptionTime
def ect(**kw: Any) -> KedaExpectedConsumptionTime:
    args: dict[str, Any] = dict(min_replicas=1, max_replicas=60, value=60.0)
    args.update(kw)
    return KedaExpectedConsumptionTime(**args)


def test_expected_consumption_time_metric_is_keda_formula() -> None:
    policy = ect()
    assert policy.sample(view(ready=0, unacked=0)) == 0
    assert policy.sample(view(ready=10, ack_rate=0, publish_rate=5)) == policy.activation_value
    # (publish - deliver)/deliver + messages/deliver = (30-10)/10 + 1200/10
    assert policy.sample(view(ready=1100, unacked=100, publish_rate=30, ack_rate=10)) == pytest.approx(122)


def test_expected_consumption_time_is_active_when_messages_wait_and_nothing_is_delivered() -> None:
    # rabbitmq_scaler.go: active = eta > activationValue or (deliverGetRate == 0 and messages > 0).
    policy = ect()
    assert policy.measure(view(ready=10, unacked=0, publish_rate=5, ack_rate=0)) == (0.0, True)
    assert policy.measure(view(ready=0, unacked=0, publish_rate=0, ack_rate=0)) == (0.0, False)  # an idle queue
    woken = ect(min_replicas=0)
    assert woken.step(0, view(ready=10, publish_rate=5, ack_rate=0, current_replicas=0, ready_replicas=0)) == 1


def test_expected_consumption_time_with_min_0_wakes_and_delivers_the_incident() -> None:
    # Issue 12: with min 0 the emulation used never to wake (0 of the surge delivered).
    s = replace(load_scenario("incident-2023-09-20"), min_replicas=0)
    m = simulate(s, ect(min_replicas=0, max_replicas=60)).metrics
    assert m.delivered > 0.99 * m.published


def test_message_rate_is_active_on_waiting_messages_even_without_publishes() -> None:
    policy = KedaMessageRate(min_replicas=0, max_replicas=60, value=10)
    assert policy.measure(view(publish_rate=0, ready=3)) == (0, True)
    assert policy.measure(view(publish_rate=0, ready=0, unacked=0)) == (0, False)
    assert policy.step(0, view(publish_rate=0, ready=3, current_replicas=0, ready_replicas=0)) == 1


def test_expected_consumption_time_scales_ready_pods_by_eta_over_target() -> None:
    # eta 120 s against a 60 s target with 4 ready pods: ceil(4 * 2) = 8 (≤ max(2*5, 4)).
    v = view(ready=1200, publish_rate=10, ack_rate=10, current_replicas=5, ready_replicas=4)
    assert ect().step(0, v) == 8


def test_message_rate_scales_on_the_publish_rate_per_pod() -> None:
    policy = KedaMessageRate(min_replicas=1, max_replicas=60, value=10)
    assert policy.sample(view(publish_rate=123)) == 123
    assert policy.step(0, view(publish_rate=123, current_replicas=5)) == 10  # ceil(12.3) > max(2*5, 4)
    assert KedaMessageRate(min_replicas=1, max_replicas=60, value=10).step(
        0, view(publish_rate=52, current_replicas=5)) == 5  # 5.2 wanted: within tolerance


@pytest.mark.parametrize("mode", sorted(sim.OBSERVATION_MODES))
def test_default_policies_under_a_mode(mode: str) -> None:
    s = load_scenario("double-spike")
    every = baselines.default_policies(s, tuned_value=20, observation=mode, applicable_only=False)
    runnable = baselines.default_policies(s, tuned_value=20, observation=mode)
    names = {p.name for p in runnable}
    # KEDA's rate modes read the management API's rates; nowhere else.
    assert ({"keda-messagerate", "keda-expected-consumption-time"} <= names) is (mode == "management")
    assert {"static", "keda-queuelength", "keda-queuelength-cached", "ideal-reactive", "clairvoyant", "wait-floor",
            "ours", "ours-crd-defaults"} <= names
    cached = {p.name: getattr(p, "use_cached_metrics", None) for p in runnable}
    assert cached["keda-queuelength"] is False and cached["keda-queuelength-cached"] is True
    for policy in every:
        if getattr(policy, "mode_independent", False):
            assert policy.name in ("static", "ideal-reactive", "clairvoyant", "wait-floor")
        else:
            assert policy.observation == mode


# --------------------------------------------------------------------------- static and reference policies
def test_static_fleet_never_moves() -> None:
    s = load_scenario("incident-2023-09-20")
    series = simulate(s, StaticFleet(baselines.static_replicas(s))).series
    assert set(series.replicas) == {3}


def test_ideal_reactive_uses_true_rate_and_backlog() -> None:
    s = load_scenario("incident-2023-09-20")  # μ 10, drain 60 s
    policy = IdealReactive(s)
    assert policy.step(0, view(true_arrival_rate=400, true_backlog=0)) == 40
    assert policy.step(0, view(true_arrival_rate=400, true_backlog=6000)) == 50
    assert policy.step(0, view(true_arrival_rate=0, true_backlog=0)) == 3  # min
    assert policy.step(0, view(true_arrival_rate=5000, true_backlog=0)) == 60  # max


def test_bounds_do_not_buy_pods_the_provider_cap_cannot_use() -> None:
    s = load_scenario("provider-cap")  # 250/s cap, 10/s per pod
    assert IdealReactive(s).step(0, view(true_arrival_rate=400, true_backlog=10_000)) == 25


def test_clairvoyant_has_pods_ready_when_an_announced_surge_lands() -> None:
    s = load_scenario("announced-campaign")  # 300/s from t=1200
    result = simulate(s, Clairvoyant(s))
    assert result.series.ready[1200] >= 30
    assert result.series.replicas[1200 - int(s.startup_seconds) - 1] < 30  # not earlier than needed
    assert result.metrics.p99_seconds == 0


def test_tuned_keda_value_comes_from_the_grid() -> None:
    s = load_scenario("double-spike")
    value, results = baselines.tune_keda_queue_length(s, values=(5.0, 20.0))
    assert value in (5.0, 20.0) and set(results) == {5.0, 20.0}


# --------------------------------------------------------------------------- ours
@pytest.mark.parametrize("name", sim.scenario_names())
def test_scenario_spec_is_a_valid_emailqueue_spec(name: str) -> None:
    from emailqueue_operator.spec import parse_spec

    s = load_scenario(name)
    for crd_defaults in (False, True):
        parsed = parse_spec(baselines.scenario_spec(s, crd_defaults=crd_defaults))
        assert (parsed.replicas.min, parsed.replicas.max) == (s.min_replicas, s.max_replicas)
        assert parsed.target.drain_seconds == s.drain_seconds


def test_announced_schedule_becomes_rfc3339_window_in_the_spec() -> None:
    s = load_scenario("announced-campaign")
    (entry,) = baselines.scenario_spec(s)["schedule"]
    assert entry["start"].endswith("Z") and "startAfterSeconds" not in entry
    from emailqueue_operator.spec import parse_spec

    (parsed,) = parse_spec(baselines.scenario_spec(s)).schedule
    assert parsed.start == s.start_epoch + 1200 and parsed.end == s.start_epoch + 3000


def test_ours_is_ready_for_an_announced_campaign() -> None:
    s = load_scenario("announced-campaign")
    policy = OurPolicy(baselines.scenario_spec(s), start_epoch=s.start_epoch)
    result = simulate(s, policy)
    assert result.metrics.p99_seconds <= policy.poll_seconds
    assert len(policy.decisions) == int(s.duration_seconds / policy.poll_seconds)
    assert any("schedule" in d.terms for d in policy.decisions)


@pytest.mark.parametrize("mode", sorted(sim.OBSERVATION_MODES))
def test_ours_gets_none_for_what_the_mode_hides(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from emailqueue_operator import scaling

    seen: list[Any] = []
    real_decide = scaling.decide

    def spy(spec: Any, observation: Any, state: Any, now: float) -> Any:
        seen.append(observation)
        return real_decide(spec, observation, state, now)

    monkeypatch.setattr(scaling, "decide", spy)
    s = load_scenario("incident-2023-09-20")
    policy = OurPolicy(baselines.scenario_spec(s), observation=mode)
    result = simulate(s, policy)
    assert result.metrics.observation == mode and len(seen) == len(policy.decisions) > 0
    hidden = sim.OBSERVATION_MODES[mode].hidden
    for observation in seen:
        for name in ("unacked", "consumers", "publish_rate", "ack_rate", "oldest_age_seconds"):
            assert (getattr(observation, name) is None) is (name in hidden), (name, observation)
    summary = policy.saturation_summary()
    assert summary == {"raised": False, "first_at": None, "polls": 0, "held_max": None}  # nothing throttles this surge


def test_ours_stops_buying_pods_the_provider_cap_cannot_use() -> None:
    s = load_scenario("provider-cap")
    m = simulate(s, OurPolicy(baselines.scenario_spec(s), start_epoch=s.start_epoch)).metrics
    assert m.peak_replicas <= 25


@pytest.mark.parametrize("mode", ["management", "prometheus"])
def test_ours_finds_a_provider_cap_nobody_configured(mode: str) -> None:
    """Issue 11: with maxSendRate withheld, the fleet is held within 1.5x the saturation point
    (250/s ÷ 10/s = 25 replicas) once the plateau shows, and the policy says so."""
    s = load_scenario("provider-cap-unconfigured")
    policy = OurPolicy(baselines.scenario_spec(s), start_epoch=s.start_epoch, observation=mode)
    simulate(s, policy)
    summary = policy.saturation_summary()
    assert summary["raised"] and summary["first_at"] < 600 + 120  # within two minutes of the surge
    assert summary["held_max"] <= 1.5 * 25
