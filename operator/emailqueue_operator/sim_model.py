"""The surge simulator's model: scenarios, observation modes, the policy protocol and the
engine that replays a scenario against one policy (issue 4).

This module owns:

- `Scenario` / `load_scenario`: the YAML scenario files shipped in `scenarios/` (schema in
  each file's header comment), programmatic variants of them (`SCENARIO_VARIANTS`, e.g.
  `provider-cap-unconfigured`) or any file path;
- `Policy`: the small protocol every policy implements (`baselines.py` has KEDA/HPA
  emulations, a static fleet, the ideal-reactive and clairvoyant reference policies, the
  bounds — the causal wait floor and the cost floor — and `OurPolicy`, which feeds
  `scaling.decide` unchanged);
- observation modes (`OBSERVATION_MODES`, `Observer`): what the operator can see of the
  broker — the management API, the management API with its metrics collector disabled,
  the Prometheus plugin, AMQP only;
- `simulate(scenario, policy) -> SimResult`: a deterministic fixed-step (1 s by default)
  fluid model of one RabbitMQ queue and a Deployment of email workers.

Comparing policies, the acceptance checks, the report and the CLI are `sim.py`'s, which
imports this module and `baselines.py`; both of those import this one, never each other
the other way round (tests/unit/test_import_graph.py keeps it so).

Model (values in, values out; no clock, no I/O but reading scenario files):
- Arrivals are fluid: the messages published in [t, t+dt) are the exact integral of the
  scenario's rate curve and join the FIFO queue as one cohort stamped t. Cohorts make
  time-in-queue percentiles exact to the step (a message served in the step it arrived
  waited 0 s).
- Pods exist from the moment the policy asks for them and become ready `startup_seconds`
  later; ready pods drain `rate_per_replica` each, the total optionally capped by the
  provider's `max_send_rate`. Scale-down removes starting pods first (the ReplicaSet
  controller deletes not-ready pods before ready ones) and is instant: workers finish
  their in-flight message on SIGTERM, so nothing is lost.
- Every step the broker's truth is a `BrokerSnapshot` (ready; unacked = about one second of
  work per consumer taken from a backlog, or without one the messages being sent, one per
  busy worker; consumers; cumulative publish/ack counters; head message). Every
  `policy.poll_seconds` the policy sees a `SimView` built from it by the policy's
  observation mode (`policy.observation`, default `management`; see `OBSERVATION_MODES`):
  a field the mode cannot show is None, never a made-up 0. Before t=0 the system is in
  steady state at the base rate (rates and counter histories start there). The oracle
  fields (`true_*`) exist only for the reference policies and the bounds; realistic
  policies must not read them.
"""
from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import yaml

from .rates import counter_rate, counter_rate_window

EPSILON = 1e-9


class ScenarioError(ValueError):
    """A scenario file or mapping is malformed; the message lists every problem."""


# --------------------------------------------------------------------------- arrivals
@dataclass(frozen=True)
class ArrivalProfile:
    """Arrival rate over time (emails/s) as a piecewise-linear curve.

    `steps` scenarios become vertical jumps (two points at the same time), so one exact
    integrator serves both kinds. Before the first point the first rate holds, after the
    last point the last rate holds.
    """

    times: tuple[float, ...]
    rates: tuple[float, ...]

    @staticmethod
    def from_steps(steps: Sequence[Sequence[float]]) -> ArrivalProfile:
        times: list[float] = []
        rates: list[float] = []
        for t, rate in sorted(((float(t), float(r)) for t, r in steps), key=lambda p: p[0]):
            if rates:
                times.append(t)
                rates.append(rates[-1])  # hold the previous rate up to the jump
            times.append(t)
            rates.append(rate)
        return ArrivalProfile(tuple(times), tuple(rates))

    @staticmethod
    def from_points(points: Sequence[Sequence[float]]) -> ArrivalProfile:
        ordered = sorted(((float(t), float(r)) for t, r in points), key=lambda p: p[0])
        return ArrivalProfile(tuple(t for t, _ in ordered), tuple(r for _, r in ordered))

    def rate_at(self, t: float) -> float:
        """Rate at t; at a jump the new rate (right-continuous)."""
        i = bisect.bisect_right(self.times, t)  # first knot strictly after t
        if i == 0:
            return self.rates[0]
        if i == len(self.times):
            return self.rates[-1]
        t0, t1 = self.times[i - 1], self.times[i]
        r0, r1 = self.rates[i - 1], self.rates[i]
        return r0 + (r1 - r0) * (t - t0) / (t1 - t0)  # t1 > t0: equal knots sit left of i

    def integral(self, a: float, b: float) -> float:
        """Messages published in [a, b): the exact area under the curve."""
        if b <= a:
            return 0.0
        total = 0.0
        # Knots inside (a, b) split the interval into linear pieces.
        cuts = [a] + [t for t in self.times if a < t < b] + [b]
        for lo, hi in itertools.pairwise(cuts):
            if hi > lo:
                mid = (lo + hi) / 2  # a piece is linear, so the midpoint rate is its mean
                total += self.rate_at(mid) * (hi - lo)
        return total

    def max_between(self, a: float, b: float) -> float:
        """Highest rate on [a, b] (the curve is linear between knots, so knots and ends suffice)."""
        candidates = [self.rate_at(a), self.rate_at(b)]
        candidates += [r for t, r in zip(self.times, self.rates, strict=True) if a <= t <= b]
        return max(candidates)

    @property
    def base_rate(self) -> float:
        return self.rates[0]


# --------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    """One surge to replay. Rates in emails/s, times in seconds."""

    name: str
    description: str
    duration_seconds: float
    arrival: ArrivalProfile
    rate_per_replica: float
    startup_seconds: float
    min_replicas: int
    max_replicas: int
    # Our operator's poll interval; None = what `baselines.slo_behavior` recommends.
    poll_seconds: float | None = None
    # The SLO our policy and the bounds aim at: a backlog should drain within this time.
    drain_seconds: float = 60.0
    # Provider cap on the total send rate (emails/s); None = unlimited.
    max_send_rate: float | None = None
    announced: bool = False
    # spec.schedule entries (the CRD's camelCase), for announced surges.
    schedule: tuple[Mapping[str, Any], ...] = ()
    # Extra spec settings for OurPolicy, deep-merged over `scenario_spec`.
    spec_overrides: Mapping[str, Any] = field(default_factory=dict)
    # Wall-clock time (epoch seconds) that simulation t=0 maps to; schedules use it.
    start_epoch: float = 0.0
    # Scale actions before this time are the policy settling in; `scale_actions_per_hour`
    # counts only the ones after it (steady scenarios measure flapping, not the start).
    warmup_seconds: float = 0.0
    # The provider cap still limits sends, but our policy's spec does not know it (no
    # target.maxSendRate): only downstream-saturation detection can stop the scale-up.
    spec_withholds_cap: bool = False

    @property
    def base_rate(self) -> float:
        return self.arrival.base_rate

    @property
    def steady(self) -> bool:
        """True when the arrival rate never changes."""
        return max(self.arrival.rates) - min(self.arrival.rates) <= EPSILON

    @property
    def saturation_replicas(self) -> float | None:
        """Replicas at which the provider cap saturates (max_send_rate / rate_per_replica)."""
        if self.max_send_rate is None:
            return None
        return self.max_send_rate / self.rate_per_replica

    @property
    def initial_replicas(self) -> int:
        """Fleet at t=0: steady state for the base load, within [min, max]."""
        need = math.ceil(self.base_rate / self.rate_per_replica - EPSILON)
        return max(self.min_replicas, min(self.max_replicas, need))


SCENARIO_DIR = "scenarios"

# Variants of shipped scenarios, run by `make bench` beside them: name -> (shipped scenario,
# fields replaced, text appended to its description).
SCENARIO_VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "provider-cap-unconfigured": (
        "provider-cap", {"spec_withholds_cap": True},
        "Variant: the cap is withheld from our spec (no target.maxSendRate), as when nobody told the "
        "operator about the provider's limit; only downstream-saturation detection can stop the scale-up."),
}


def scenario_names() -> list[str]:
    """Names of the scenarios shipped as package data."""
    root = resources.files("emailqueue_operator").joinpath(SCENARIO_DIR)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def benchmark_scenario_names() -> list[str]:
    """The shipped scenarios and their variants, in the order `make bench` reports them."""
    names = scenario_names()
    return names + [v for v, (base, _, _) in SCENARIO_VARIANTS.items() if base in names]


def load_scenario(path_or_name: str | Path) -> Scenario:
    """A shipped scenario or variant by name (e.g. `incident-2023-09-20`) or a YAML file by path."""
    candidate = Path(path_or_name)
    if isinstance(path_or_name, str) and path_or_name in SCENARIO_VARIANTS and not candidate.exists():
        base_name, fields, note = SCENARIO_VARIANTS[path_or_name]
        base = load_scenario(base_name)
        return replace(base, name=path_or_name, description=f"{base.description} {note}".strip(), **fields)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        text = candidate.read_text(encoding="utf-8")
    else:
        resource = resources.files("emailqueue_operator").joinpath(SCENARIO_DIR, f"{path_or_name}.yaml")
        if not resource.is_file():
            raise ScenarioError(f"unknown scenario {str(path_or_name)!r}; shipped: "
                                f"{', '.join(benchmark_scenario_names())}")
        text = resource.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, Mapping):
        raise ScenarioError(f"scenario {str(path_or_name)!r} must be a YAML mapping")
    return scenario_from_mapping(data)


def scenario_from_mapping(data: Mapping[str, Any]) -> Scenario:
    """Validate a scenario mapping, collecting every problem into one ScenarioError."""
    problems: list[str] = []

    def number(key: str, default: float | None = None, minimum: float = 0.0, strict: bool = False) -> float:
        value = data.get(key, default)
        if value is None:
            problems.append(f"{key}: required")
            return 0.0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: must be a number, got {value!r}")
            return 0.0
        if value < minimum or (strict and value <= minimum):
            problems.append(f"{key}: must be {'>' if strict else '>='} {minimum}, got {value}")
        return float(value)

    name = str(data.get("name") or "")
    if not name:
        problems.append("name: required")
    duration = number("duration_seconds", strict=True)
    per_replica = number("rate_per_replica", strict=True)
    startup = number("startup_seconds")
    min_replicas = number("min", 1)
    max_replicas = number("max")
    poll = None if data.get("poll_seconds") is None else number("poll_seconds", strict=True)
    drain = number("drain_seconds", 60.0, strict=True)
    warmup = number("warmup_seconds", 0.0)
    if duration > 0 and warmup >= duration:
        problems.append(f"warmup_seconds: must be < duration_seconds ({duration:g}), got {warmup:g}")
    withholds = data.get("spec_withholds_cap", False)
    if not isinstance(withholds, bool):
        problems.append(f"spec_withholds_cap: must be true or false, got {withholds!r}")
        withholds = False
    cap_raw = data.get("max_send_rate", data.get("downstream_cap"))
    cap = None if cap_raw is None else number("max_send_rate" if "max_send_rate" in data else "downstream_cap",
                                               strict=True)
    if min_replicas > max_replicas:
        problems.append(f"min ({min_replicas:g}) must be <= max ({max_replicas:g})")
    for key, value in (("min", min_replicas), ("max", max_replicas)):
        if value != int(value):
            problems.append(f"{key}: must be a whole number")

    arrival = data.get("arrival")
    profile = ArrivalProfile((0.0,), (0.0,))
    if not isinstance(arrival, Mapping) or len({"steps", "points"} & set(arrival)) != 1:
        problems.append("arrival: must be a mapping with exactly one of `steps` or `points`")
    else:
        kind = "steps" if "steps" in arrival else "points"
        pairs = arrival[kind]
        ok = isinstance(pairs, list) and pairs and all(
            isinstance(p, (list, tuple)) and len(p) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in p) for p in pairs)
        if not ok:
            problems.append(f"arrival.{kind}: must be a non-empty list of [seconds, emails_per_second]")
        elif any(r < 0 or t < 0 for t, r in pairs):
            problems.append(f"arrival.{kind}: times and rates must be >= 0")
        else:
            profile = ArrivalProfile.from_steps(pairs) if kind == "steps" else ArrivalProfile.from_points(pairs)

    schedule = data.get("schedule") or []
    if not isinstance(schedule, list) or not all(isinstance(s, Mapping) for s in schedule):
        problems.append("schedule: must be a list of spec.schedule entries (mappings)")
        schedule = []
    overrides = data.get("spec") or {}
    if not isinstance(overrides, Mapping):
        problems.append("spec: must be a mapping of EmailQueue spec overrides")
        overrides = {}
    if problems:
        raise ScenarioError(f"scenario {name or '?'}: " + "; ".join(problems))
    return Scenario(
        name=name, description=str(data.get("description", "")).strip(), duration_seconds=duration,
        arrival=profile, rate_per_replica=per_replica, startup_seconds=startup,
        min_replicas=int(min_replicas), max_replicas=int(max_replicas), poll_seconds=poll,
        drain_seconds=drain, max_send_rate=cap, announced=bool(data.get("announced", False)),
        schedule=tuple(dict(s) for s in schedule), spec_overrides=dict(overrides),
        start_epoch=float(data.get("start_epoch", 0.0)), warmup_seconds=warmup, spec_withholds_cap=withholds,
    )


# --------------------------------------------------------------------------- observation modes
MANAGEMENT_STATS_TICK_SECONDS = 5.0  # RabbitMQ `collect_statistics_interval` default


@dataclass(frozen=True)
class ObservationMode:
    """What one kind of broker probe shows the operator. A field it cannot show is None."""

    name: str
    source: str                       # how the operator reads the broker, for reports
    unacked: bool                     # shows messages delivered but not acked
    consumers: bool                   # shows the consumer count
    rates: str | None                 # "broker": the broker's own rates (mean over its last
    #                                   stats tick); "counters": the operator's rates from
    #                                   publish/ack counters (`rates.counter_rate`); None
    head_age: bool                    # shows the head message's publish time
    stats_tick_seconds: float | None  # counts are as of the last stats tick (None = fresh)

    @property
    def shows(self) -> frozenset[str]:
        """What a policy can rely on under this mode: the `SimView` fields it fills, plus
        `broker_rates` when the rates are the broker's own (what KEDA's HTTP modes read)."""
        fields = {"ready", "unacked", "consumers", "publish_rate", "ack_rate", "oldest_age_seconds"}
        return frozenset((fields - self.hidden) | ({"broker_rates"} if self.rates == "broker" else set()))

    @property
    def hidden(self) -> frozenset[str]:
        """`SimView` fields this mode always leaves None."""
        missing = set()
        if not self.unacked:
            missing.add("unacked")
        if not self.consumers:
            missing.add("consumers")
        if self.rates is None:
            missing |= {"publish_rate", "ack_rate"}
        if not self.head_age:
            missing.add("oldest_age_seconds")
        return frozenset(missing)


OBSERVATION_MODES: dict[str, ObservationMode] = {mode.name: mode for mode in (
    ObservationMode(
        "management", "management API (GET /api/queues/VHOST/NAME): counts, consumers, rates and "
        "head-message timestamp, all as of the broker's last 5 s stats tick",
        unacked=True, consumers=True, rates="broker", head_age=True,
        stats_tick_seconds=MANAGEMENT_STATS_TICK_SECONDS),
    ObservationMode(
        "management-nocollector", "management API with management_agent.disable_metrics_collector = true: "
        "only the message totals (enable_queue_totals): ready and unacked, fresh; no consumers, rates or age",
        unacked=True, consumers=False, rates=None, head_age=False, stats_tick_seconds=None),
    ObservationMode(
        "prometheus", "Prometheus plugin: ready, unacked and consumer gauges (fresh) and publish/ack "
        "counters; the operator turns counters into rates (rates.counter_rate over max(2 x poll, 10 s))",
        unacked=True, consumers=True, rates="counters", head_age=False, stats_tick_seconds=None),
    ObservationMode(
        "amqp", "AMQP passive queue.declare: message_count (ready only) and consumer_count; nothing else",
        unacked=False, consumers=True, rates=None, head_age=False, stats_tick_seconds=None),
)}
DEFAULT_OBSERVATION = "management"


def observation_mode(name: str) -> ObservationMode:
    try:
        return OBSERVATION_MODES[name]
    except KeyError:
        raise ValueError(f"unknown observation mode {name!r}; known: {', '.join(OBSERVATION_MODES)}") from None


@dataclass(frozen=True)
class BrokerSnapshot:
    """The broker's truth at one instant: what a perfect, instant probe would read."""

    t: float
    ready: float
    unacked: float
    consumers: int
    published_total: float             # messages published since t=0
    acked_total: float                 # messages acked since t=0
    head_published_at: float | None    # publish time of the oldest queued message; None if empty
    backlog: float | None = None       # oracle: messages not yet being sent (None: ready + unacked)


# --------------------------------------------------------------------------- policy protocol
@dataclass(frozen=True)
class SimView:
    """What a policy sees at a poll: its observation mode decides which fields are None
    (never measured) and how stale the rest are. The `true_*` fields are the oracle, for
    the bounds only."""

    t: float
    ready: float                        # messages ready in the queue (not delivered to a consumer)
    unacked: float | None               # delivered to a consumer, not yet acked
    consumers: int | None               # = ready replicas (one consumer per worker pod)
    publish_rate: float | None          # emails/s (broker rate, or from counters)
    ack_rate: float | None              # emails/s (broker rate, or from counters)
    oldest_age_seconds: float | None    # age of the head message (0 when empty)
    current_replicas: int               # pods that exist (what /scale says), starting ones included
    ready_replicas: int
    true_arrival_rate: float            # oracle: the scenario's rate right now
    true_backlog: float                 # oracle: ready + unacked, no sampling delay
    observation: str = DEFAULT_OBSERVATION


class Observer:
    """Turns broker snapshots into what one observation mode shows at a poll.

    `record` every step (the management API's stats tick needs every instant), `observe`
    at each poll. Before t=0 the broker is taken to be in steady state at the prior rates:
    the management API's first tick has a previous tick, and the operator's counter history
    covers a full window, so no mode starts blind.
    """

    def __init__(self, mode: str, poll_seconds: float, prior_publish_rate: float, prior_ack_rate: float) -> None:
        self.mode = observation_mode(mode)
        self.poll_seconds = float(poll_seconds)
        self.prior_publish_rate = float(prior_publish_rate)
        self.prior_ack_rate = float(prior_ack_rate)
        self._tick_index: int | None = None
        self._tick: BrokerSnapshot | None = None
        self._previous_tick: BrokerSnapshot | None = None
        self.window_seconds = counter_rate_window(self.poll_seconds)
        self._publish_samples: deque[tuple[float, float]] = deque()
        self._ack_samples: deque[tuple[float, float]] = deque()
        # The operator's counter history before t=0: polls at -poll, -2 poll, ... reaching
        # one poll beyond the window; counters offset so that they start at 0 there.
        self._history_polls = math.ceil(self.window_seconds / self.poll_seconds - EPSILON) + 1
        span = self._history_polls * self.poll_seconds
        self._publish_offset = self.prior_publish_rate * span
        self._ack_offset = self.prior_ack_rate * span
        for j in range(self._history_polls, 0, -1):
            t = -j * self.poll_seconds
            self._publish_samples.append((t, self._publish_offset + self.prior_publish_rate * t))
            self._ack_samples.append((t, self._ack_offset + self.prior_ack_rate * t))

    def record(self, snapshot: BrokerSnapshot) -> None:
        """Keep the snapshot if it is the first at or after a stats-tick boundary."""
        tick = self.mode.stats_tick_seconds
        if tick is None:
            return
        index = math.floor(snapshot.t / tick + EPSILON)
        if index == self._tick_index:
            return
        previous = self._tick
        if previous is None:  # the tick before t=0, in steady state
            previous = replace(snapshot, t=snapshot.t - tick,
                               published_total=snapshot.published_total - self.prior_publish_rate * tick,
                               acked_total=snapshot.acked_total - self.prior_ack_rate * tick)
        self._tick_index, self._previous_tick, self._tick = index, previous, snapshot

    def counter_sample(self, snapshot: BrokerSnapshot) -> tuple[float, float]:
        """The publish and ack counters the Prometheus plugin shows for this snapshot."""
        return self._publish_offset + snapshot.published_total, self._ack_offset + snapshot.acked_total

    def observe(self, snapshot: BrokerSnapshot, current_replicas: int, ready_replicas: int,
                true_arrival_rate: float) -> SimView:
        mode = self.mode
        now = snapshot.t
        shown = snapshot
        publish_rate = ack_rate = None
        age: float | None = None
        if mode.stats_tick_seconds is not None:
            self.record(snapshot)
            assert self._tick is not None and self._previous_tick is not None
            shown, before = self._tick, self._previous_tick
            elapsed = shown.t - before.t
            if mode.rates == "broker":
                publish_rate = (shown.published_total - before.published_total) / elapsed
                ack_rate = (shown.acked_total - before.acked_total) / elapsed
        if mode.rates == "counters":
            published, acked = self.counter_sample(snapshot)
            self._publish_samples.append((now, published))
            self._ack_samples.append((now, acked))
            while len(self._publish_samples) > self._history_polls + 1:
                self._publish_samples.popleft()
                self._ack_samples.popleft()
            publish_rate = counter_rate(list(self._publish_samples), now, self.window_seconds)
            ack_rate = counter_rate(list(self._ack_samples), now, self.window_seconds)
        if mode.head_age:
            # The operator computes now - head_message_timestamp from the (stale) stats.
            age = 0.0 if shown.head_published_at is None else max(0.0, now - shown.head_published_at)
        return SimView(
            t=now, ready=shown.ready, unacked=shown.unacked if mode.unacked else None,
            consumers=shown.consumers if mode.consumers else None,
            publish_rate=publish_rate, ack_rate=ack_rate, oldest_age_seconds=age,
            current_replicas=current_replicas, ready_replicas=ready_replicas,
            true_arrival_rate=true_arrival_rate,
            true_backlog=snapshot.ready + snapshot.unacked if snapshot.backlog is None else snapshot.backlog,
            observation=mode.name,
        )


class Policy(Protocol):
    """A scaling policy under simulation. `step` returns the desired replica count.

    Optional attributes the simulator and `compare` read:
    - `observation` (str): the observation mode it runs under (default `management`);
    - `needs` (names from `ObservationMode.shows`: `SimView` fields, or `broker_rates`):
      what it cannot work without; under a mode that lacks one the policy is not
      applicable (never fed a made-up value);
    - `mode_independent` (bool): an oracle or a fixed fleet, run once, not per mode.
    """

    name: str
    poll_seconds: float

    def step(self, now: float, view: SimView) -> int: ...


def policy_observation(policy: Policy) -> str:
    return str(getattr(policy, "observation", None) or DEFAULT_OBSERVATION)


def not_applicable(policy: Policy, mode: str) -> str | None:
    """Why the policy cannot run under the mode (something it needs is not shown), else None."""
    missing = sorted(set(getattr(policy, "needs", ())) - observation_mode(mode).shows)
    if not missing:
        return None
    return f"needs {', '.join(missing)}, which {mode} does not show"


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Series:
    """Time series for plots: one entry per step."""

    t: tuple[float, ...]
    arrival_rate: tuple[float, ...]
    backlog: tuple[float, ...]
    replicas: tuple[int, ...]
    ready: tuple[int, ...]


@dataclass(frozen=True)
class Metrics:
    """Outcome of one policy on one scenario (seconds, emails, pod-seconds)."""

    policy: str
    scenario: str
    published: float
    delivered: float
    left_in_queue: float
    p50_seconds: float         # time-in-queue percentiles over every message published;
    p99_seconds: float         # messages still queued at the end count with their age then
    max_seconds: float
    mean_seconds: float
    peak_backlog: float
    peak_backlog_at: float
    # From the end of the last surge (the last time the arrival rate falls back to the
    # base rate, i.e. the rate at t=0) until the backlog is back to ~0 (<= one second of
    # base arrivals, at least 1 message); 0 if it was already drained by then; if it never
    # drains, the rest of the run (duration - surge end) and `drained` is False.
    time_to_drain_seconds: float
    drained: bool
    backlogged_seconds: float  # total time the backlog was above ~0
    replica_seconds: float     # sum over time of pods existing, starting ones included
    peak_replicas: int
    scale_events: int          # every change of the replica count the policy asked for
    # Scale events after the scenario's warm-up, per hour of the rest of the run.
    scale_actions_per_hour: float
    observation: str = DEFAULT_OBSERVATION


@dataclass(frozen=True)
class SimResult:
    metrics: Metrics
    series: Series


def weighted_percentile(histogram: Mapping[float, float], q: float) -> float:
    """Nearest-rank percentile of a {value: weight} histogram (q in [0, 1])."""
    total = sum(histogram.values())
    if total <= 0:
        return 0.0
    threshold = q * total
    running = 0.0
    for value in sorted(histogram):
        running += histogram[value]
        if running >= threshold - EPSILON * max(1.0, total):
            return value
    return max(histogram)


def surge_end(profile: ArrivalProfile, duration: float) -> float:
    """Last time the rate falls from above the base rate back to it (0 if it never rises)."""
    base = profile.base_rate
    end = 0.0
    above = False
    for t, rate in zip(profile.times, profile.rates, strict=True):
        if t > duration:
            break
        if rate > base + EPSILON:
            above = True
        elif above:
            end, above = t, False
    return duration if above else end


# --------------------------------------------------------------------------- engine
def simulate(scenario: Scenario, policy: Policy, dt: float = 1.0, observation: str | None = None) -> SimResult:
    """Run one policy through the scenario; deterministic (same inputs, same result).

    `observation` (default: the policy's `observation` attribute, else `management`) is
    the mode the policy's views are built with; a policy that needs a field the mode hides
    raises ValueError (see `not_applicable`).
    """
    if dt <= 0 or policy.poll_seconds < dt - EPSILON:
        raise ValueError("dt must be > 0 and no longer than the policy's poll interval")
    mode = observation or policy_observation(policy)
    reason = not_applicable(policy, mode)
    if reason is not None:
        raise ValueError(f"policy {policy.name} {reason}")
    steps = round(scenario.duration_seconds / dt)
    poll_steps = max(1, round(policy.poll_seconds / dt))
    mu = scenario.rate_per_replica
    cap = scenario.max_send_rate
    profile = scenario.arrival

    # Pods as ready-at times, ascending: creation order (newest last, ready last) except
    # after a scale-down, which re-sorts.
    pods: list[float] = [-math.inf] * scenario.initial_replicas
    queue: deque[list[float]] = deque()  # cohorts [arrival_t, count], FIFO
    queued = 0.0
    waits: dict[float, float] = {}
    published = delivered = 0.0
    # Before t=0 the system is taken to be in steady state at the base rate.
    base = profile.base_rate
    steady_ack = min(base, len(pods) * mu, cap if cap is not None else math.inf)
    observer = Observer(mode, policy.poll_seconds, prior_publish_rate=base, prior_ack_rate=steady_ack)
    served_before = steady_ack * dt  # sent in the previous step

    series_t: list[float] = []
    series_rate: list[float] = []
    series_backlog: list[float] = []
    series_replicas: list[int] = []
    series_ready: list[int] = []
    replica_seconds = 0.0
    scale_events = 0
    scale_events_after_warmup = 0
    peak_backlog, peak_at = 0.0, 0.0
    empty_level = max(1.0, base * dt)
    backlogged = 0.0

    for k in range(steps):
        t = k * dt
        ready_pods = bisect.bisect_right(pods, t + EPSILON)  # pods stay sorted by ready time
        # Unacked: with a backlog, each consumer's prefetch holds ~one second of work, taken
        # from the queue; without one, the messages being sent right now (Little's law:
        # throughput x 1/mu, one per busy worker). A fleet that keeps up is never at 0 unacked.
        prefetched = min(queued, ready_pods * mu * 1.0)
        in_service = min(float(ready_pods), served_before / dt / mu)
        snapshot = BrokerSnapshot(t=t, ready=queued - prefetched, unacked=max(prefetched, in_service),
                                  consumers=ready_pods, backlog=queued,
                                  published_total=published, acked_total=delivered,
                                  head_published_at=queue[0][0] if queue else None)
        observer.record(snapshot)
        if k % poll_steps == 0:
            view = observer.observe(snapshot, current_replicas=len(pods), ready_replicas=ready_pods,
                                    true_arrival_rate=profile.rate_at(t))
            desired = max(0, int(policy.step(t, view)))
            if desired != len(pods):
                scale_events += 1
                if t >= scenario.warmup_seconds - EPSILON:
                    scale_events_after_warmup += 1
                if desired > len(pods):
                    pods.extend([t + scenario.startup_seconds] * (desired - len(pods)))
                else:
                    # Not-ready pods go first (ReplicaSet deletion order), newest first.
                    pods.sort(key=lambda ready_at: (ready_at <= t + EPSILON, -ready_at))
                    del pods[: len(pods) - desired]
                    pods.sort()
                ready_pods = bisect.bisect_right(pods, t + EPSILON)  # pods stay sorted by ready time

        arrivals = profile.integral(t, t + dt)
        if arrivals > 0:
            queue.append([t, arrivals])
            queued += arrivals
            published += arrivals
        capacity = ready_pods * mu * dt
        if cap is not None:
            capacity = min(capacity, cap * dt)
        served_now = 0.0
        while capacity > EPSILON and queue:
            cohort = queue[0]
            take = min(cohort[1], capacity)
            wait = round((t - cohort[0]) / dt) * dt
            waits[wait] = waits.get(wait, 0.0) + take
            cohort[1] -= take
            capacity -= take
            served_now += take
            if cohort[1] <= EPSILON:
                queue.popleft()
        queued = max(0.0, queued - served_now)
        if not queue:
            queued = 0.0
        delivered += served_now
        served_before = served_now

        replica_seconds += len(pods) * dt
        if queued > peak_backlog:
            peak_backlog, peak_at = queued, t
        if queued > empty_level:
            backlogged += dt
        series_t.append(t)
        series_rate.append(profile.rate_at(t))
        series_backlog.append(queued)
        series_replicas.append(len(pods))
        series_ready.append(ready_pods)

    end = steps * dt
    for arrival_t, count in queue:  # still queued: count with their age at the end
        age = round((end - arrival_t) / dt) * dt
        waits[age] = waits.get(age, 0.0) + count
    total_weight = sum(waits.values())

    # Time to drain after the last surge ends.
    s_end = surge_end(profile, end)
    drained_at = None
    for t, backlog in zip(series_t, series_backlog, strict=True):
        if t >= s_end - EPSILON and backlog <= empty_level:
            drained_at = t
            break
    time_to_drain = (end - s_end) if drained_at is None else max(0.0, drained_at - s_end)

    metrics = Metrics(
        policy=policy.name, scenario=scenario.name, published=published, delivered=delivered,
        left_in_queue=queued,
        p50_seconds=weighted_percentile(waits, 0.50), p99_seconds=weighted_percentile(waits, 0.99),
        max_seconds=max((w for w, c in waits.items() if c > EPSILON), default=0.0),
        mean_seconds=(sum(w * c for w, c in waits.items()) / total_weight) if total_weight else 0.0,
        peak_backlog=peak_backlog, peak_backlog_at=peak_at, time_to_drain_seconds=time_to_drain,
        drained=drained_at is not None, backlogged_seconds=backlogged, replica_seconds=replica_seconds,
        peak_replicas=max(series_replicas, default=len(pods)), scale_events=scale_events,
        scale_actions_per_hour=scale_events_after_warmup / (max(dt, end - min(scenario.warmup_seconds, end)) / 3600.0),
        observation=mode,
    )
    series = Series(tuple(series_t), tuple(series_rate), tuple(series_backlog), tuple(series_replicas),
                    tuple(series_ready))
    return SimResult(metrics, series)
