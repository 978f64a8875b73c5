"""Scaling policies the simulator compares ours against, and the bounds it judges ours by.

This module owns, all implementing `sim_model.Policy`:

- `KedaQueueLength` — KEDA's RabbitMQ scaler in `QueueLength` mode behind an HPA
  (legacy behavior, i.e. no `behavior:` block in the ScaledObject), as KEDA runs by
  default: `useCachedMetrics: false`, so every HPA sync (15 s) gets a fresh metric and
  KEDA's 30 s `pollingInterval` only decides activation (0↔1). `use_cached_metrics=True`
  is the other setting: the HPA reads the value KEDA cached at its last poll;
- `KedaMessageRate` — the same scaler in `MessageRate` mode;
- `KedaExpectedConsumptionTime` — the same scaler in `ExpectedQueueConsumptionTime` mode;
- `StaticFleet` — a fixed fleet (what ran on 2023-09-20);
- reference policies (NOT bounds: `ours` beats both on a short, violent burst, because
  they size the fleet to drain a backlog within `drain_seconds`, not as fast as possible):
  `IdealReactive` (true rate and backlog every second, no foresight) and `Clairvoyant`
  (knows future arrivals);
- `OurPolicy` — our `scaling.decide`, fed UNCHANGED with the `Observation` the operator
  would build, its `PolicyState` carried between polls as the status would carry it;
- the bounds (below) and `default_policies(scenario, observation=...)`,
  `tune_keda_queue_length(scenario)`.

Bounds — lower bounds that hold by construction in the simulator's model. The model's
assumptions (sim_model.py): fluid FIFO arrivals fixed by the scenario; a pod exists from the
moment it is asked for and serves `rate_per_replica` once `startup_seconds` have passed;
the provider cap limits the total; at t=0 every policy has the steady fleet for the base
rate (`Scenario.initial_replicas`), all ready; every policy keeps min ≤ pods ≤ max.
- `CausalWaitFloor` ("wait-floor", time in queue): a policy without foresight cannot tell
  a surge from the base load before the surge's first message. The floor holds the base
  fleet until the step in which the arrival rate first rises above the base rate (t=0
  when the surge is announced in `spec.schedule`), asks for every pod that can send
  (max, or what the provider cap can use) at that very step, and never lets one go. In
  FIFO more sending capacity at every step never delays any message, so no policy whose
  capacity never exceeds the floor's while the floor still has a backlog can have a
  message wait less at any percentile; `wait_floor_applies` checks that condition on a
  run (it fails only for a policy that held spare pods or knew the future). It is
  achievable (it is a policy) and as expensive as it gets: a bound on wait, not on cost.
- `cost_floor` (replica-seconds): given the longest time in queue a run let any message
  have (W), the fewest replica-seconds ANY policy — clairvoyant, with fractional pods —
  needs so that no message waits longer than W: min pods all the time, each further
  ready pod sends at most `rate_per_replica`, and each pod above the initial fleet spent
  `startup_seconds` starting first. Computed exactly for that relaxation (work-conserving
  greedy: the min fleet sends as early as possible, paid capacity as late as deadlines
  allow), so the run judged, being one such schedule, cannot cost less.
Acceptance ratios (`sim.acceptance`) are against these two, never against a reference
policy.

Observation modes (`sim_model.OBSERVATION_MODES`): every realistic policy runs under the mode
it is given (`observation` attribute). KEDA's RabbitMQ scaler reads the broker the way the
mode allows: `QueueLength` over the HTTP API counts `messages` (ready + unacked: the
`management` and `management-nocollector` modes; under `prometheus`, KEDA's Prometheus
scaler on `rabbitmq_queue_messages`, the same count), over AMQP `message_count` (ready
only: the `amqp` mode). `MessageRate` and `ExpectedQueueConsumptionTime` need the HTTP
API's rates (`needs`), so they run only where the broker reports rates (`management`) and
are listed as not applicable elsewhere, never fed a made-up rate. The static fleet, the
reference policies and the wait floor read nothing observable (`mode_independent`) and
run once.

Where the KEDA/HPA facts come from (cited again next to each use):
- KEDA ScaledObject reference and "Scaling Deployments" concepts (keda.sh docs,
  kedacore/keda-docs): `pollingInterval` default 30 s ("the interval to check each
  trigger on"); `cooldownPeriod` default 300 s, only for N→0; triggers[].`useCachedMetrics`
  default false — "Kubernetes (HPA controller) asks for a metric every few seconds (...
  usually 15s), then this request is routed to KEDA Metrics Server, that by default
  queries the scaler and reads the metric values"; with it enabled the metrics server
  reads the value cached at the last polling interval; `metricType` default
  `AverageValue`; "If the minimum replicas is >= 1, the scaler is always active and the
  activation value will be ignored"; activation is "greater than", not "greater or equal".
- kedacore/keda pkg/scaling/scale_handler.go (GetScaledObjectMetrics reads the cache only
  when `TriggerUseCachedMetrics`, else calls the scaler) and pkg/scaling/executor
  (`scaleFromZero` to max(1, minReplicaCount) when a trigger is active at 0 replicas;
  `scaleToZero` when none is active and `LastActiveTime + cooldownPeriod` is before now).
- kedacore/keda pkg/scalers/rabbitmq_scaler.go, GetMetricsAndActivity: QueueLength metric
  = messages, active = messages > activationValue; MessageRate metric = publish rate,
  active = publish rate > activationValue or messages > activationValue;
  ExpectedQueueConsumptionTime eta = 0 if messages == 0, activationValue if the
  deliver_get rate is 0, else (publish - deliverGet)/deliverGet + messages/deliverGet;
  active = eta > activationValue or (deliverGet == 0 and messages > 0) (kedacore/keda
  #8033; before it, deliverGet == 0 alone). `defaultRabbitMQQueueLength = 20`; protocol
  `auto` picks AMQP for an amqp:// host (`message_count`: ready only), HTTP counts
  ready + unacked unless `excludeUnacknowledged`. KEDA's RabbitMQ scaler docs advise
  `metricType: Value` for ExpectedQueueConsumptionTime; our emulation uses it.
- kubernetes pkg/controller/podautoscaler (kube-controller-manager flags
  `--horizontal-pod-autoscaler-sync-period` 15 s, `--horizontal-pod-autoscaler-tolerance`
  0.1, `--horizontal-pod-autoscaler-downscale-stabilization` 300 s): horizontal.go
  `recordInitialRecommendation` (the current count is the first recommendation),
  "ScalingDisabled" at 0 replicas, current > max → max, current < min → min; without a
  behavior, `normalizeDesiredReplicas`: `stabilizeRecommendation` (the highest
  recommendation not older than the window: stamped before now - window, which a
  recommendation made 20 syncs earlier always is, syncs being re-queued 15 s after each
  reconcile ends), then `convertDesiredReplicasWithRules` (clamp to [min, min(max, max(2 × current, 4))]);
  replica_calculator.go: `Tolerances.isWithin` is (1 - t) <= ratio <= (1 + t);
  `GetExternalPerPodMetricReplicas` (AverageValue): ratio = usage / (target × current),
  else ceil(usage / target); `GetExternalMetricReplicas` (Value): ratio = usage / target,
  else ceil(ratio × ready pods).
- Pure: no clock, no I/O. Every time comes from the simulator's `now`.
"""
from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, ClassVar

from .sim_model import (
    DEFAULT_OBSERVATION,
    EPSILON,
    Policy,
    Scenario,
    Series,
    SimView,
    not_applicable,
    observation_mode,
    simulate,
)

# KEDA / HPA defaults (see module docstring for sources).
KEDA_POLLING_INTERVAL_S = 30.0
KEDA_COOLDOWN_PERIOD_S = 300.0
KEDA_QUEUE_LENGTH_DEFAULT = 20.0
HPA_SYNC_PERIOD_S = 15.0
HPA_TOLERANCE = 0.1
HPA_DOWNSCALE_STABILIZATION_S = 300.0
HPA_SCALE_UP_LIMIT_FACTOR = 2
HPA_SCALE_UP_LIMIT_MINIMUM = 4
# Tuning grid for keda-queuelength-tuned: QueueLength values a user might try.
KEDA_TUNING_VALUES = (1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0)


def ceil_int(x: float) -> int:
    """ceil that ignores float dust (400/10 must be 40, not 41)."""
    return math.ceil(x - 1e-9)


def within_tolerance(ratio: float, tolerance: float = HPA_TOLERANCE) -> bool:
    """The HPA's `Tolerances.isWithin`: (1 - t) <= ratio <= (1 + t), compared as written
    (110 messages at 20 per pod on 5 pods is a ratio of exactly 1.1: within)."""
    return (1.0 - tolerance) <= ratio <= (1.0 + tolerance)


# --------------------------------------------------------------------------- HPA (legacy)
@dataclass
class HpaLegacy:
    """One HPA without a `behavior:` block, sync by sync (horizontal.go, reconcileAutoscaler).

    The first sync records the current count as a recommendation; at 0 replicas the HPA
    is disabled; a count above max (below min) goes to max (min) at once; otherwise the
    metric's recommendation is stabilised (the highest of the last 300 s) and clamped to
    [min, min(max, max(2 × current, 4))].
    """

    min_replicas: int
    max_replicas: int
    stabilization_seconds: float = HPA_DOWNSCALE_STABILIZATION_S
    recommendations: list[tuple[float, int]] = field(default_factory=list)

    def reconcile(self, now: float, current: int, recommended: int) -> int:
        """The replica count this sync leaves on /scale (`current` when it does not rescale)."""
        if not self.recommendations:
            self.recommendations.append((now, current))  # recordInitialRecommendation
        if current == 0 and self.min_replicas != 0:
            return 0  # ScalingDisabled: only KEDA's activation brings it back to 1
        if current > self.max_replicas:
            return self.max_replicas
        if current < self.min_replicas:
            return self.min_replicas
        stabilized = self._stabilize(now, recommended)
        scale_up_limit = max(HPA_SCALE_UP_LIMIT_FACTOR * current, HPA_SCALE_UP_LIMIT_MINIMUM)
        return max(self.min_replicas, min(stabilized, self.max_replicas, scale_up_limit))

    def _stabilize(self, now: float, recommended: int) -> int:
        # Upstream ignores a recommendation stamped before now - window (time.Before). Its
        # syncs are re-queued 15 s after each reconcile ends (a fixed-interval rate
        # limiter), so they drift later and the one made 20 syncs ago is always past the
        # cutoff; on the simulator's exact 15 s grid that means dropping it at exactly 300 s.
        cutoff = now - self.stabilization_seconds
        self.recommendations = [(t, r) for t, r in self.recommendations if t > cutoff + EPSILON]
        stabilized = max([recommended] + [r for _, r in self.recommendations])
        self.recommendations.append((now, recommended))
        return stabilized


@dataclass
class _KedaBase:
    """KEDA's two loops around one HPA.

    - KEDA's operator, every `pollingInterval` (30 s): asks the scaler for its metric and
      activity; with `min_replicas == 0` it scales 0→1 when a trigger is active and N→0
      when none has been active for `cooldownPeriod`; with `use_cached_metrics` it keeps
      the metric for the HPA.
    - The HPA, every sync (15 s, the policy's `poll_seconds`): reads the metric through
      KEDA's metrics server — fresh from the scaler (KEDA's default), or the value cached
      at the last poll (`use_cached_metrics`) — and applies `HpaLegacy`. KEDA gives the
      HPA minReplicas = max(1, minReplicaCount).
    """

    min_replicas: int
    max_replicas: int
    polling_interval: float = KEDA_POLLING_INTERVAL_S
    activation_value: float = 0.0
    cooldown_period: float = KEDA_COOLDOWN_PERIOD_S
    use_cached_metrics: bool = False
    name: str = "keda"
    poll_seconds: float = HPA_SYNC_PERIOD_S
    observation: str = DEFAULT_OBSERVATION
    _hpa: HpaLegacy | None = None
    _cached: float | None = None
    _next_poll: float = -math.inf
    _last_active: float = -math.inf

    def __post_init__(self) -> None:
        self._hpa = HpaLegacy(max(1, self.min_replicas), self.max_replicas)

    def measure(self, view: SimView) -> tuple[float, bool]:
        """The scaler's GetMetricsAndActivity: (metric, active)."""
        raise NotImplementedError

    def recommend(self, view: SimView, metric: float) -> int:
        """The HPA's replica calculator for this metric type (current > 0)."""
        raise NotImplementedError

    def step(self, now: float, view: SimView) -> int:
        current = view.current_replicas
        if now >= self._next_poll - EPSILON:  # KEDA's operator loop
            self._next_poll = now + self.polling_interval
            metric, active = self.measure(view)
            if self.use_cached_metrics:
                self._cached = metric
            if active:
                self._last_active = now
            if self.min_replicas == 0:  # with min >= 1 the scaler counts as always active
                if current == 0 and active:
                    return 1  # scaleFromZero: max(1, minReplicaCount)
                if current > 0 and not active and self._last_active + self.cooldown_period <= now + EPSILON:
                    # scaleToZero: LastActiveTime + cooldownPeriod before now (KEDA's polls,
                    # like the HPA's syncs, drift later than the exact grid simulated here).
                    return 0
        if current == 0:
            return 0  # the HPA is disabled at 0 replicas
        if self.use_cached_metrics and self._cached is not None:
            metric = self._cached
        else:
            metric, _ = self.measure(view)  # the metrics server asks the scaler afresh
        assert self._hpa is not None
        return self._hpa.reconcile(now, current, self.recommend(view, metric))


def _messages(view: SimView, count_unacked: bool = True) -> float:
    """The scaler's `messages`: ready + unacked over HTTP, ready only over AMQP."""
    unacked = view.unacked if count_unacked and view.unacked is not None else 0.0
    return view.ready + unacked


def _per_pod_replicas(view: SimView, metric: float, target_per_pod: float) -> int:
    """HPA, external metric with an AverageValue target (GetExternalPerPodMetricReplicas)."""
    current = view.current_replicas
    if within_tolerance(metric / (target_per_pod * current)):
        return current
    return ceil_int(metric / target_per_pod)


@dataclass
class KedaQueueLength(_KedaBase):
    """RabbitMQ scaler, mode QueueLength, metricType AverageValue (the default).

    Metric = messages (ready only over AMQP, ready + unacked over HTTP: `count_unacked`);
    active = messages > activationValue. HPA: current within the 0.1 tolerance of
    messages / (value × current), else ceil(messages / value).
    """

    value: float = KEDA_QUEUE_LENGTH_DEFAULT
    count_unacked: bool = False  # amqp protocol (default for an amqp:// host): ready only

    def sample(self, view: SimView) -> float:
        return _messages(view, self.count_unacked)

    def measure(self, view: SimView) -> tuple[float, bool]:
        messages = self.sample(view)
        return messages, messages > self.activation_value

    def recommend(self, view: SimView, metric: float) -> int:
        return _per_pod_replicas(view, metric, self.value)


@dataclass
class KedaMessageRate(_KedaBase):
    """RabbitMQ scaler, mode MessageRate (HTTP only), metricType AverageValue (the default).

    Metric = the queue's publish rate (`message_stats.publish_details.rate`); active =
    publish rate > activationValue or messages > activationValue. HPA as for QueueLength:
    ceil(rate / value) outside the tolerance. `value` is emails/s per pod: we give it the
    scenario's rate per replica, the one sensible setting.
    """

    value: float = 10.0
    needs: ClassVar[tuple[str, ...]] = ("broker_rates",)

    def sample(self, view: SimView) -> float:
        assert view.publish_rate is not None  # `needs`: never run where rates are hidden
        return view.publish_rate

    def measure(self, view: SimView) -> tuple[float, bool]:
        rate = self.sample(view)
        return rate, rate > self.activation_value or _messages(view) > self.activation_value

    def recommend(self, view: SimView, metric: float) -> int:
        return _per_pod_replicas(view, metric, self.value)


@dataclass
class KedaExpectedConsumptionTime(_KedaBase):
    """RabbitMQ scaler, mode ExpectedQueueConsumptionTime (HTTP only), metricType Value.

    KEDA computes (pkg/scalers/rabbitmq_scaler.go):
        eta = 0                                   if messages == 0
        eta = activationValue                     if deliverGetRate == 0
        eta = (publish - deliverGet)/deliverGet + messages/deliverGet   otherwise
        active = eta > activationValue or (deliverGetRate == 0 and messages > 0)
    with messages = ready + unacked (HTTP API `messages`) and the management API's rates
    (the simulator's deliveries are its acks). So a queue with messages and no consumer
    is active: with min 0, KEDA wakes the Deployment. With metricType Value the HPA
    scales the *ready* pod count by eta / value: ceil(ready_pods × eta / value), unless
    within the 0.1 tolerance. `value` is the target time in seconds; we give it the
    scenario's drain SLO.
    """

    value: float = 60.0
    needs: ClassVar[tuple[str, ...]] = ("broker_rates", "unacked")

    def sample(self, view: SimView) -> float:
        return self.measure(view)[0]

    def measure(self, view: SimView) -> tuple[float, bool]:
        # `needs`: never run where these are hidden.
        assert view.unacked is not None and view.publish_rate is not None and view.ack_rate is not None
        messages = view.ready + view.unacked
        deliver = view.ack_rate
        if messages <= EPSILON:
            eta = 0.0
        elif deliver <= EPSILON:
            eta = self.activation_value
        else:
            eta = (view.publish_rate - deliver) / deliver + messages / deliver
        active = eta > self.activation_value or (deliver <= EPSILON and messages > EPSILON)
        return eta, active

    def recommend(self, view: SimView, metric: float) -> int:
        ratio = metric / self.value
        if within_tolerance(ratio):
            return view.current_replicas
        return ceil_int(ratio * view.ready_replicas)


# --------------------------------------------------------------------------- static fleet and reference policies
@dataclass
class StaticFleet:
    """A fixed number of workers, whatever happens."""

    replicas: int
    name: str = "static"
    poll_seconds: float = 60.0
    mode_independent: ClassVar[bool] = True

    def step(self, now: float, view: SimView) -> int:
        return self.replicas


def useful_max_replicas(scenario: Scenario) -> int:
    """The most pods that can send: max, or fewer when the provider cap saturates first."""
    upper = scenario.max_replicas
    if scenario.max_send_rate is not None:
        upper = min(upper, max(scenario.min_replicas, ceil_int(scenario.max_send_rate / scenario.rate_per_replica)))
    return upper


def _clamp(scenario: Scenario, desired: int) -> int:
    # Pods beyond the provider cap cannot send more; the reference policies know that.
    return max(scenario.min_replicas, min(useful_max_replicas(scenario), desired))


@dataclass
class IdealReactive:
    """Reference policy (not a bound): true rate and backlog every second, no delay, no
    foresight: desired = ceil((λ_now + B / drain_seconds) / μ). It drains a backlog within
    the SLO, not as fast as it could, so a policy that reacts harder beats it on a burst."""

    scenario: Scenario
    name: str = "ideal-reactive"
    poll_seconds: float = 1.0
    mode_independent: ClassVar[bool] = True

    def step(self, now: float, view: SimView) -> int:
        s = self.scenario
        need = (view.true_arrival_rate + view.true_backlog / s.drain_seconds) / s.rate_per_replica
        return _clamp(s, ceil_int(need))


@dataclass
class Clairvoyant:
    """Reference policy (not a bound): knows future arrivals and provisions at t for the
    highest rate over [t, t + start-up] (so pods are ready when the surge lands and are
    not dropped before it ends), plus the backlog term of `IdealReactive`."""

    scenario: Scenario
    name: str = "clairvoyant"
    poll_seconds: float = 1.0
    mode_independent: ClassVar[bool] = True

    def step(self, now: float, view: SimView) -> int:
        s = self.scenario
        rate = s.arrival.max_between(now, now + s.startup_seconds)
        need = (rate + view.true_backlog / s.drain_seconds) / s.rate_per_replica
        return _clamp(s, ceil_int(need))


# --------------------------------------------------------------------------- bounds
def surge_onset(scenario: Scenario) -> float | None:
    """The first time the arrival rate rises above the base rate (its rate at t=0), or
    None when it never does. A policy without foresight cannot know of a surge earlier."""
    profile, base = scenario.arrival, scenario.base_rate
    points = list(zip(profile.times, profile.rates, strict=True))
    for (t0, r0), (t1, r1) in itertools.pairwise(points):
        if r1 <= base + EPSILON:
            continue
        if t1 <= t0 or r0 > base + EPSILON:
            return t0  # a jump, or already above at t0
        return t0 + (base - r0) / (r1 - r0) * (t1 - t0)  # a linear climb crossing the base
    return None


def reaction_time(scenario: Scenario, dt: float = 1.0) -> float:
    """When the wait floor asks for every pod: t=0 for an announced surge (the schedule is
    foresight), else the start of the step holding the onset (no causal policy can know of
    it before its first message, and it sees that message a step later at the earliest)."""
    if scenario.announced:
        return 0.0
    onset = surge_onset(scenario)
    if onset is None or onset >= scenario.duration_seconds:
        return math.inf
    return math.floor(onset / dt + EPSILON) * dt


@dataclass
class CausalWaitFloor:
    """The bound on time in queue (module docstring, "Bounds"): the base fleet until the
    surge's first step (t=0 when announced), then every pod that can send, kept."""

    scenario: Scenario
    dt: float = 1.0
    name: str = "wait-floor"
    poll_seconds: float = 1.0
    mode_independent: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.react_at = reaction_time(self.scenario, self.dt)
        self.poll_seconds = self.dt

    def step(self, now: float, view: SimView) -> int:
        if now < self.react_at - EPSILON:
            return self.scenario.initial_replicas
        return max(self.scenario.initial_replicas, useful_max_replicas(self.scenario))


def wait_floor_applies(scenario: Scenario, floor: Series, run: Series) -> str | None:
    """None when the wait floor provably bounds `run`'s time in queue; else why not.

    Each step the queue sends min(capacity, what is queued); by induction the floor has
    sent at least as much as the run after every step if, at every step, the floor had at
    least the run's sending capacity or emptied its queue. FIFO then serves every message
    no later under the floor: every percentile, the maximum and the ages left at the end
    are at most the run's.
    """
    cap = scenario.max_send_rate if scenario.max_send_rate is not None else math.inf
    mu = scenario.rate_per_replica
    for t, floor_ready, run_ready, floor_backlog in zip(floor.t, floor.ready, run.ready, floor.backlog, strict=True):
        if min(cap, run_ready * mu) > min(cap, floor_ready * mu) + EPSILON and floor_backlog > 1e-6:
            return (f"at t={t:g}s it had {run_ready} ready pods to the floor's {floor_ready} while the floor "
                    f"had a backlog (pods held before the surge, or foresight)")
    return None


@dataclass(frozen=True)
class CostFloor:
    """`cost_floor`'s answer: the bound and the schedule that attains it (relaxed)."""

    max_wait_seconds: float    # W: no message may wait longer
    replica_seconds: float     # the bound (math.inf when no fleet within max can do it)
    peak_pods: int             # ready pods at the peak of the cheapest schedule
    paid_pod_seconds: float    # ready pod-seconds above the min fleet
    startup_pod_seconds: float # pods above the initial fleet, each starting startup_seconds


def arrivals_per_step(scenario: Scenario, dt: float = 1.0) -> list[float]:
    """Messages published in each step, as the simulator counts them (`cost_floor` takes
    them precomputed when it is called for many runs of one scenario)."""
    steps = round(scenario.duration_seconds / dt)
    return [scenario.arrival.integral(k * dt, (k + 1) * dt) for k in range(steps)]


def _paid_work(arrived: Sequence[float], required: Sequence[float], capacity: Sequence[float],
               free: float) -> float | None:
    """Least work beyond the free capacity that meets every deadline, or None if none can.

    Variables: D[j], messages sent by the end of step j, with required[j] <= D[j] <=
    arrived[j] and 0 <= D[j] - D[j-1] <= capacity[j]; minimise the sum of
    max(0, D[j] - D[j-1] - free). `least[j]` is the least D[j] from which every later
    deadline can still be met; the optimum sends with the free capacity as early as
    possible (it costs nothing and lightens every later step) and pays only for what
    `least` forces, as late as it can (so the free capacity in between takes its share).
    """
    steps = len(arrived)
    least = [0.0] * steps
    running = -math.inf
    for j in range(steps - 1, -1, -1):
        running = max(required[j], running - (capacity[j + 1] if j + 1 < steps else 0.0))
        least[j] = running
        if running > arrived[j] + 1e-6 * max(1.0, arrived[j]):
            return None
    if steps and least[0] > capacity[0] + 1e-6 * max(1.0, capacity[0]):
        return None  # nothing is sent before the first step
    sent = paid = 0.0
    for j in range(steps):
        free_now = min(free, capacity[j])
        after = max(least[j], min(sent + free_now, arrived[j]))
        paid += max(0.0, after - sent - free_now)
        sent = after
    return paid


class _CostFloorProblem:
    """`cost_floor`'s relaxation for one scenario and longest wait; `total(p)` is the least
    replica-seconds with a peak of at most p ready pods."""

    def __init__(self, scenario: Scenario, max_wait_seconds: float, dt: float = 1.0,
                 arrivals: Sequence[float] | None = None) -> None:
        self.mu, self.startup = scenario.rate_per_replica, scenario.startup_seconds
        self.cap = scenario.max_send_rate if scenario.max_send_rate is not None else math.inf
        self.dt = dt
        self.steps = round(scenario.duration_seconds / dt)
        wait_steps = max(0, round(max_wait_seconds / dt))
        per_step = arrivals_per_step(scenario, dt) if arrivals is None else arrivals
        self.arrived = list(itertools.accumulate(per_step))
        self.required = [self.arrived[j - wait_steps] if j >= wait_steps else 0.0 for j in range(self.steps)]
        self.initial, self.min_pods = scenario.initial_replicas, scenario.min_replicas
        self.top = max(self.initial, useful_max_replicas(scenario))

    def total(self, pods: int) -> tuple[float, float]:
        """(replica-seconds, paid work in messages); math.inf when the deadlines cannot be met."""
        dt, mu = self.dt, self.mu
        # Before the first new pod can be ready only the initial fleet sends.
        capacity = [min(self.cap, mu * (min(self.initial, pods) if k * dt < self.startup - EPSILON else pods)) * dt
                    for k in range(self.steps)]
        paid = _paid_work(self.arrived, self.required, capacity, self.min_pods * mu * dt)
        if paid is None:
            return math.inf, math.inf
        return self.min_pods * self.steps * dt + paid / mu + self.startup * max(0, pods - self.initial), paid


def cost_floor(scenario: Scenario, max_wait_seconds: float, dt: float = 1.0,
               arrivals: Sequence[float] | None = None) -> CostFloor:
    """The fewest replica-seconds any policy needs so that no message waits longer than
    `max_wait_seconds` (module docstring, "Bounds").

    A message of step k must be sent by step k + W; one whose deadline falls after the
    end may stay queued (the simulator counts it with its age at the end, at most W).
    Replica-seconds >= min × duration + (ready pod-seconds above min) + startup × (peak
    ready pods − initial pods); ready pods >= sending rate / rate per replica. For a peak
    of p pods the middle term is `_paid_work` with the capacity capped at p pods (and at
    the initial fleet before the first new pod can be ready); the total is convex in p
    (the least of a linear program as one bound of it moves, plus a linear term), so the
    least over p is found by bisection on its slope.
    """
    problem = _CostFloorProblem(scenario, max_wait_seconds, dt, arrivals)
    cache: dict[int, tuple[float, float]] = {}

    def value(pods: int) -> float:
        if pods not in cache:
            cache[pods] = problem.total(pods)
        return cache[pods][0]

    lo, hi = problem.initial, problem.top  # the least p with value(p + 1) >= value(p)
    while lo < hi:
        mid = (lo + hi) // 2
        if value(mid + 1) < value(mid) or (math.isinf(value(mid)) and math.isinf(value(mid + 1))):
            lo = mid + 1
        else:
            hi = mid
    best = min(range(max(problem.initial, lo - 2), min(problem.top, lo + 2) + 1), key=value)
    replica_seconds, paid = cache[best]
    if math.isinf(replica_seconds):
        return CostFloor(max_wait_seconds, math.inf, best, math.inf, math.inf)
    return CostFloor(max_wait_seconds, replica_seconds, best, paid / problem.mu,
                     problem.startup * max(0, best - problem.initial))


# --------------------------------------------------------------------------- ours
def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _iso(epoch: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def scenario_schedule(scenario: Scenario) -> list[dict[str, Any]]:
    """spec.schedule entries; `startAfterSeconds`/`endAfterSeconds` (relative to t=0) become
    RFC 3339 `start`/`end` at `scenario.start_epoch`; other entries pass through."""
    entries = []
    for raw in scenario.schedule:
        entry = dict(raw)
        if "startAfterSeconds" in entry:
            entry["start"] = _iso(scenario.start_epoch + float(entry.pop("startAfterSeconds")))
        if "endAfterSeconds" in entry:
            entry["end"] = _iso(scenario.start_epoch + float(entry.pop("endAfterSeconds")))
        entries.append(entry)
    return entries


def slo_behavior(startup_seconds: float, max_replicas: int) -> dict[str, Any]:
    """`spec.behavior` we recommend with an SLO target (the planner emits the same).

    Measured on the shipped scenarios (see `compare`); the CRD defaults are the HPA's and
    are kept for KEDA parity, but they cost an SLO-driven fleet dearly:
    - pollSeconds ≈ start-up / 10 (1..5): detection delay adds to every surge's wait;
    - tolerance 0: the drain term already asks for exactly what is needed, and 10 % of
      under-provisioning on a ramp turns into a growing backlog;
    - scale-up: all the way to max in one step (the SLO term is a forecast, not a guess
      to be doubled every 15 s as the HPA's Percent 100 / Pods 4 defaults do);
    - scale-down stabilization = start-up: releasing a pod that would be needed again
      within one start-up time saves nothing, and longer windows only burn pod-seconds.
    """
    return {
        "pollSeconds": int(min(5, max(1, round(startup_seconds / 10)))),
        "tolerance": 0.0,
        "scaleUp": {"stabilizationSeconds": 0,
                    "policies": [{"type": "Pods", "value": int(max_replicas), "periodSeconds": 15}]},
        "scaleDown": {"stabilizationSeconds": math.ceil(startup_seconds),
                      "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]},
    }


def scenario_spec(scenario: Scenario, crd_defaults: bool = False) -> dict[str, Any]:
    """The EmailQueue spec (camelCase, as in the CRD) our policy runs with on a scenario.

    `behavior` is `slo_behavior` (what the planner recommends) unless `crd_defaults`, which
    leaves it to the CRD defaults (poll 5 s, tolerance 0.1, HPA default policies). The
    provider cap becomes `target.maxSendRate` unless the scenario withholds it.
    """
    target: dict[str, Any] = {
        "drainSeconds": scenario.drain_seconds,
        "ratePerReplica": scenario.rate_per_replica,
        "startupSeconds": scenario.startup_seconds,
    }
    if scenario.max_send_rate is not None and not scenario.spec_withholds_cap:
        target["maxSendRate"] = scenario.max_send_rate
    spec: dict[str, Any] = {
        "scaleTargetRef": {"name": "email-worker"},
        "broker": {"queue": "email", "amqpSecretRef": {"name": "rabbitmq", "uriKey": "uri"}},
        "replicas": {"min": scenario.min_replicas, "max": scenario.max_replicas},
        "target": target,
        "behavior": {} if crd_defaults else slo_behavior(scenario.startup_seconds, scenario.max_replicas),
    }
    if scenario.poll_seconds is not None:
        spec["behavior"]["pollSeconds"] = int(scenario.poll_seconds)
    schedule = scenario_schedule(scenario)
    if schedule:
        spec["schedule"] = schedule
    return _deep_merge(spec, scenario.spec_overrides)


class OurPolicy:
    """`scaling.decide` fed unchanged: the simulator plays the operator's probe and status.

    What the observation mode does not show reaches `scaling.Observation` as None.
    """

    def __init__(self, spec_mapping: Mapping[str, Any], start_epoch: float = 0.0, name: str = "ours",
                 observation: str = DEFAULT_OBSERVATION) -> None:
        # imported here: baselines must work without them
        from . import scaling, spec as spec_module

        self._scaling = scaling
        self.spec = spec_module.parse_spec(spec_mapping)
        self.name = name
        self.poll_seconds = float(self.spec.behavior.poll_seconds)
        self.observation = observation_mode(observation).name
        self.start_epoch = start_epoch
        self.state = _empty_state(scaling)
        self.decisions: list[Any] = []  # every Decision, for debugging and tests
        self.decision_times: list[float] = []  # simulation time of each decision

    def step(self, now: float, view: SimView) -> int:
        s = self._scaling
        observation = s.Observation(
            ok=True, error=None, ready=round(view.ready),
            unacked=None if view.unacked is None else round(view.unacked),
            consumers=view.consumers, publish_rate=view.publish_rate, ack_rate=view.ack_rate,
            oldest_age_seconds=view.oldest_age_seconds, current_replicas=view.current_replicas,
            ready_replicas=view.ready_replicas,
        )
        decision = s.decide(self.spec, observation, self.state, self.start_epoch + now)
        self.state = decision.state
        self.decisions.append(decision)
        self.decision_times.append(now)
        return int(decision.replicas)

    def saturation_summary(self) -> dict[str, Any]:
        """Whether the policy raised downstream saturation, first when (simulation seconds),
        in how many polls, and the most replicas it held while saturated once its scale-down
        window had passed."""
        times = [t for t, d in zip(self.decision_times, self.decisions, strict=True) if getattr(d, "saturated", False)]
        # What it holds once its own scale-down window (the HPA behavior) let the cut through.
        settle = float(self.spec.behavior.scale_down.stabilization_seconds) + self.poll_seconds
        held = [d.replicas for t, d in zip(self.decision_times, self.decisions, strict=True)
                if getattr(d, "saturated", False) and t >= times[0] + settle]
        return {"raised": bool(times), "first_at": times[0] if times else None, "polls": len(times),
                "held_max": max(held) if held else None}


def _empty_state(scaling: Any) -> Any:
    state_type = scaling.PolicyState
    if hasattr(state_type, "from_status"):
        return state_type.from_status(None)
    return state_type()


def scaling_available() -> bool:
    """True once `scaling.py` (the real policy) can be imported."""
    try:
        from . import scaling  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- sets of policies
def static_replicas(scenario: Scenario) -> int:
    """A fleet sized for the base load (at least min), as before autoscaling."""
    return scenario.initial_replicas


def keda_queue_length(scenario: Scenario, value: float = KEDA_QUEUE_LENGTH_DEFAULT,
                      name: str = "keda-queuelength", observation: str | None = None,
                      use_cached_metrics: bool = False) -> KedaQueueLength:
    """KEDA QueueLength for the scenario, as KEDA runs by default (a fresh metric at every
    HPA sync; `use_cached_metrics` for the other setting). Under an observation mode, it
    counts what KEDA can read there (ready + unacked over HTTP, ready only over AMQP);
    without one, KEDA's default for an amqp:// host (ready only), observed through the
    management API."""
    mode = observation_mode(observation or DEFAULT_OBSERVATION)
    count_unacked = observation is not None and "unacked" not in mode.hidden
    return KedaQueueLength(min_replicas=scenario.min_replicas, max_replicas=scenario.max_replicas,
                           value=value, name=name, count_unacked=count_unacked, observation=mode.name,
                           use_cached_metrics=use_cached_metrics)


# The tuning rule's allowance for KEDA's detection: one HPA sync.
KEDA_TUNING_SLACK_S = HPA_SYNC_PERIOD_S


def tune_keda_queue_length(scenario: Scenario, values: tuple[float, ...] = KEDA_TUNING_VALUES,
                           observation: str | None = None,
                           floor_p99: float | None = None) -> tuple[float, dict[float, tuple[float, float]]]:
    """Pick a QueueLength value for the scenario by a grid search, with hindsight.

    Rule: among the grid values whose p99 time-in-queue is at most 1.3 x the wait floor's
    p99 plus one HPA sync (15 s), the one with the fewest replica-seconds; if none
    qualifies, the lowest p99 (ties: fewer replica-seconds). Tuning on the very scenario
    being judged flatters KEDA — a user cannot do that for an unforeseen surge — which is
    the point of the baseline. `observation` as for `keda_queue_length`; `floor_p99` saves
    re-running the floor. Returns the value and {value: (p99, replica_seconds)}.
    """
    if floor_p99 is None:
        floor_p99 = simulate(scenario, CausalWaitFloor(scenario)).metrics.p99_seconds
    results: dict[float, tuple[float, float]] = {}
    for value in values:
        m = simulate(scenario, keda_queue_length(scenario, value, observation=observation)).metrics
        results[value] = (m.p99_seconds, m.replica_seconds)
    good = [v for v, (p99, _) in results.items() if p99 <= 1.3 * floor_p99 + KEDA_TUNING_SLACK_S + EPSILON]
    if good:
        best = min(good, key=lambda v: (results[v][1], results[v][0]))
    else:
        best = min(results, key=lambda v: (results[v][0], results[v][1]))
    return best, results


def default_policies(scenario: Scenario, include_ours: bool = True, tuned_value: float | None = None,
                     observation: str = DEFAULT_OBSERVATION, applicable_only: bool = True) -> list[Policy]:
    """Every policy side by side under one observation mode, fresh (policies keep state;
    never reuse one across runs), the wait floor included. `applicable_only` drops the ones
    needing a field the mode hides (`sim_model.not_applicable`); `compare` keeps them to list
    them as not applicable."""
    mode = observation_mode(observation).name
    if tuned_value is None:
        tuned_value, _ = tune_keda_queue_length(scenario, observation=mode)
    policies: list[Policy] = [
        StaticFleet(static_replicas(scenario)),
        keda_queue_length(scenario, observation=mode),
        keda_queue_length(scenario, name="keda-queuelength-cached", observation=mode, use_cached_metrics=True),
        keda_queue_length(scenario, tuned_value, name="keda-queuelength-tuned", observation=mode),
        KedaMessageRate(value=scenario.rate_per_replica, name="keda-messagerate", min_replicas=scenario.min_replicas,
                        max_replicas=scenario.max_replicas, observation=mode),
        KedaExpectedConsumptionTime(value=scenario.drain_seconds, name="keda-expected-consumption-time",
                                    min_replicas=scenario.min_replicas, max_replicas=scenario.max_replicas,
                                    observation=mode),
        IdealReactive(scenario),
        Clairvoyant(scenario),
        CausalWaitFloor(scenario),
    ]
    if include_ours and scaling_available():
        policies.append(OurPolicy(scenario_spec(scenario), start_epoch=scenario.start_epoch, observation=mode))
        policies.append(OurPolicy(scenario_spec(scenario, crd_defaults=True), start_epoch=scenario.start_epoch,
                                  name="ours-crd-defaults", observation=mode))
    if applicable_only:
        policies = [p for p in policies if not_applicable(p, mode) is None]
    return policies
