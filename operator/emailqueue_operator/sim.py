"""Surge simulator: replays an arrival-rate scenario against scaling policies (issue 4).

This module owns the pure simulation engine and its metrics:

- `Scenario` / `load_scenario`: the YAML scenario files shipped in `scenarios/` (schema in
  each file's header comment) or any file path;
- `Policy`: the small protocol every policy implements (`baselines.py` has KEDA/HPA
  emulations, a static fleet, the ideal-reactive and clairvoyant bounds, and `OurPolicy`,
  which feeds `scaling.decide` unchanged);
- `simulate(scenario, policy) -> SimResult`: a deterministic fixed-step (1 s by default)
  fluid model of one RabbitMQ queue and a Deployment of email workers;
- `compare(scenario) -> dict`: every policy side by side plus the acceptance ratios
  (used by `make bench`);
- `run_cli_simulate(argv) -> int`: `emailqueue-operator simulate ...` (table, `--json`,
  `--plot FILE.png`).

Model (values in, values out; no clock, no I/O except the CLI edge at the bottom):
- Arrivals are fluid: the messages published in [t, t+dt) are the exact integral of the
  scenario's rate curve and join the FIFO queue as one cohort stamped t. Cohorts make
  time-in-queue percentiles exact to the step (a message served in the step it arrived
  waited 0 s).
- Pods exist from the moment the policy asks for them and become ready `startup_seconds`
  later; ready pods drain `rate_per_replica` each, the total optionally capped by the
  provider's `max_send_rate`. Scale-down removes starting pods first (the ReplicaSet
  controller deletes not-ready pods before ready ones) and is instant: workers finish
  their in-flight message on SIGTERM, so nothing is lost.
- Every `policy.poll_seconds` the policy sees what the operator would (`SimView`): ready
  and unacked counts, publish/ack rates averaged over the last window (like the RabbitMQ
  management API), consumers, replicas. The oracle fields (`true_*`) exist only for the
  ideal bounds; realistic policies must not read them.
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import yaml

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
    def from_steps(steps: Sequence[Sequence[float]]) -> "ArrivalProfile":
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
    def from_points(points: Sequence[Sequence[float]]) -> "ArrivalProfile":
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
        for lo, hi in zip(cuts, cuts[1:]):
            if hi > lo:
                mid = (lo + hi) / 2  # a piece is linear, so the midpoint rate is its mean
                total += self.rate_at(mid) * (hi - lo)
        return total

    def max_between(self, a: float, b: float) -> float:
        """Highest rate on [a, b] (the curve is linear between knots, so knots and ends suffice)."""
        candidates = [self.rate_at(a), self.rate_at(b)]
        candidates += [r for t, r in zip(self.times, self.rates) if a <= t <= b]
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

    @property
    def base_rate(self) -> float:
        return self.arrival.base_rate

    @property
    def initial_replicas(self) -> int:
        """Fleet at t=0: steady state for the base load, within [min, max]."""
        need = math.ceil(self.base_rate / self.rate_per_replica - EPSILON)
        return max(self.min_replicas, min(self.max_replicas, need))


SCENARIO_DIR = "scenarios"


def scenario_names() -> list[str]:
    """Names of the scenarios shipped as package data."""
    root = resources.files("emailqueue_operator").joinpath(SCENARIO_DIR)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_scenario(path_or_name: str | Path) -> Scenario:
    """A shipped scenario by name (e.g. `incident-2023-09-20`) or a YAML file by path."""
    candidate = Path(path_or_name)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        text = candidate.read_text(encoding="utf-8")
    else:
        resource = resources.files("emailqueue_operator").joinpath(SCENARIO_DIR, f"{path_or_name}.yaml")
        if not resource.is_file():
            raise ScenarioError(f"unknown scenario {str(path_or_name)!r}; shipped: {', '.join(scenario_names())}")
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
        start_epoch=float(data.get("start_epoch", 0.0)),
    )


# --------------------------------------------------------------------------- policy protocol
@dataclass(frozen=True)
class SimView:
    """What a policy sees at a poll. The `true_*` fields are the oracle, for the bounds only."""

    t: float
    ready: float                 # messages ready in the queue (not delivered to a consumer)
    unacked: float               # delivered to a consumer, not yet acked
    consumers: int               # = ready replicas (one consumer per worker pod)
    publish_rate: float          # emails/s, mean over the policy's rate window
    ack_rate: float              # emails/s, mean over the policy's rate window
    oldest_age_seconds: float    # age of the head message (0 when empty)
    current_replicas: int        # pods that exist (what /scale says), starting ones included
    ready_replicas: int
    true_arrival_rate: float     # oracle: the scenario's rate right now
    true_backlog: float          # oracle: ready + unacked, no sampling delay


class Policy(Protocol):
    """A scaling policy under simulation. `step` returns the desired replica count."""

    name: str
    poll_seconds: float

    def step(self, now: float, view: SimView) -> int: ...


def rate_window(policy: Policy) -> float:
    """Seconds the rates in `SimView` are averaged over: the policy's own, else its poll."""
    return float(getattr(policy, "rate_window_seconds", 0) or policy.poll_seconds)


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
    scale_events: int


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
    for t, rate in zip(profile.times, profile.rates):
        if t > duration:
            break
        if rate > base + EPSILON:
            above = True
        elif above:
            end, above = t, False
    return duration if above else end


# --------------------------------------------------------------------------- engine
def simulate(scenario: Scenario, policy: Policy, dt: float = 1.0) -> SimResult:
    """Run one policy through the scenario; deterministic (same inputs, same result)."""
    if dt <= 0 or policy.poll_seconds < dt - EPSILON:
        raise ValueError("dt must be > 0 and no longer than the policy's poll interval")
    steps = int(round(scenario.duration_seconds / dt))
    poll_steps = max(1, int(round(policy.poll_seconds / dt)))
    window_steps = max(1, int(round(rate_window(policy) / dt)))
    mu = scenario.rate_per_replica
    cap = scenario.max_send_rate
    profile = scenario.arrival

    # Pods as ready-at times; index order = creation order (newest last).
    pods: list[float] = [-math.inf] * scenario.initial_replicas
    queue: deque[list[float]] = deque()  # cohorts [arrival_t, count], FIFO
    queued = 0.0
    waits: dict[float, float] = {}
    published = delivered = 0.0
    # Prefix sums of arrivals/deliveries per step, for window-averaged rates. Before t=0
    # the system is taken to be in steady state at the base rate.
    base = profile.base_rate
    steady_ack = min(base, len(pods) * mu, cap if cap is not None else math.inf)
    arrived_prefix = [0.0]
    delivered_prefix = [0.0]

    series_t: list[float] = []
    series_rate: list[float] = []
    series_backlog: list[float] = []
    series_replicas: list[int] = []
    series_ready: list[int] = []
    replica_seconds = 0.0
    scale_events = 0
    peak_backlog, peak_at = 0.0, 0.0
    empty_level = max(1.0, base * dt)
    backlogged = 0.0

    def window_rate(prefix: list[float], k: int, prior: float) -> float:
        have = min(k, window_steps)
        missing = window_steps - have
        return (prefix[k] - prefix[k - have] + prior * missing * dt) / (window_steps * dt)

    for k in range(steps):
        t = k * dt
        ready_pods = sum(1 for ready_at in pods if ready_at <= t + EPSILON)
        if k % poll_steps == 0:
            in_flight = min(queued, ready_pods * mu * 1.0)  # ~one second of work per consumer (prefetch)
            view = SimView(
                t=t, ready=queued - in_flight, unacked=in_flight, consumers=ready_pods,
                publish_rate=window_rate(arrived_prefix, k, base),
                ack_rate=window_rate(delivered_prefix, k, steady_ack),
                oldest_age_seconds=(t - queue[0][0]) if queue else 0.0,
                current_replicas=len(pods), ready_replicas=ready_pods,
                true_arrival_rate=profile.rate_at(t), true_backlog=queued,
            )
            desired = max(0, int(policy.step(t, view)))
            if desired != len(pods):
                scale_events += 1
                if desired > len(pods):
                    pods.extend([t + scenario.startup_seconds] * (desired - len(pods)))
                else:
                    # Not-ready pods go first (ReplicaSet deletion order), newest first.
                    pods.sort(key=lambda ready_at: (ready_at <= t + EPSILON, -ready_at))
                    del pods[: len(pods) - desired]
                    pods.sort()
                ready_pods = sum(1 for ready_at in pods if ready_at <= t + EPSILON)

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
        arrived_prefix.append(arrived_prefix[-1] + arrivals)
        delivered_prefix.append(delivered_prefix[-1] + served_now)

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
    for t, backlog in zip(series_t, series_backlog):
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
    )
    series = Series(tuple(series_t), tuple(series_rate), tuple(series_backlog), tuple(series_replicas),
                    tuple(series_ready))
    return SimResult(metrics, series)


# --------------------------------------------------------------------------- comparison
# The project's acceptance figures (DESIGN "Measuring"; issue 4).
TARGET_P99_VS_IDEAL = 1.3
TARGET_COST_VS_IDEAL = 1.15
TARGET_P99_VS_KEDA = 0.6
TARGET_COST_VS_KEDA = 0.8
TARGET_P99_VS_CLAIRVOYANT = 1.3
KEDA_TARGET_SCENARIO = "incident-2023-09-20"


def _ratio(numerator: float, denominator: float) -> float | None:
    if denominator <= EPSILON:
        return None if numerator > EPSILON else 1.0
    return numerator / denominator


def acceptance(scenario: Scenario, metrics: Mapping[str, Metrics], ours_poll_seconds: float = 5.0) -> list[dict[str, Any]]:
    """The acceptance checks that apply to this scenario, with their measured ratios.

    A check is a dict {check, value, limit, passed}; `value` is the measured quantity in
    the units of `limit` (a ratio, or seconds for the announced check).
    """
    ours = metrics.get("ours")
    if ours is None:
        return []
    checks: list[dict[str, Any]] = []

    def check(label: str, value: float | None, limit: float) -> None:
        checks.append({"check": label, "value": value, "limit": limit,
                       "passed": value is not None and value <= limit + EPSILON})

    ideal = metrics.get("ideal-reactive")
    if ideal is not None:
        # 1 s of grace on the bound: p99s are quantised to the 1 s step.
        check("p99 / ideal-reactive p99", _ratio(ours.p99_seconds, max(ideal.p99_seconds, 1.0)), TARGET_P99_VS_IDEAL)
        check("replica-seconds / ideal-reactive", _ratio(ours.replica_seconds, ideal.replica_seconds),
              TARGET_COST_VS_IDEAL)
    keda = metrics.get("keda-queuelength")
    if keda is not None and scenario.name == KEDA_TARGET_SCENARIO:
        check("p99 / keda-queuelength p99", _ratio(ours.p99_seconds, keda.p99_seconds), TARGET_P99_VS_KEDA)
        check("replica-seconds / keda-queuelength", _ratio(ours.replica_seconds, keda.replica_seconds),
              TARGET_COST_VS_KEDA)
    seer = metrics.get("clairvoyant")
    if seer is not None and scenario.announced:
        # Limit in seconds: 1.3 x clairvoyant's p99 plus one poll of ours.
        checks.append({"check": "p99 seconds vs 1.3 x clairvoyant p99 + one poll", "value": ours.p99_seconds,
                       "limit": TARGET_P99_VS_CLAIRVOYANT * seer.p99_seconds + ours_poll_seconds,
                       "passed": ours.p99_seconds <= TARGET_P99_VS_CLAIRVOYANT * seer.p99_seconds
                       + ours_poll_seconds + EPSILON})
    return checks


def run_policies(scenario: Scenario, policies: Iterable[Policy], dt: float = 1.0) -> dict[str, SimResult]:
    """Simulate each policy on the scenario, by name (names must be unique)."""
    results: dict[str, SimResult] = {}
    for policy in policies:
        if policy.name in results:
            raise ValueError(f"two policies named {policy.name!r}")
        results[policy.name] = simulate(scenario, policy, dt)
    return results


def compare(scenario: Scenario | str, include_ours: bool = True, with_series: bool = False) -> dict[str, Any]:
    """Every policy side by side on one scenario, plus the acceptance checks (for `make bench`).

    Returns {"scenario": {...}, "keda_tuned_value": v, "keda_tuning": {...},
    "policies": {name: metrics-dict}, "acceptance": [checks], "series": {...}?}.
    """
    from .baselines import default_policies, tune_keda_queue_length  # late: baselines imports sim

    if isinstance(scenario, str):
        scenario = load_scenario(scenario)
    tuned_value, tuning = tune_keda_queue_length(scenario)
    policies = default_policies(scenario, include_ours, tuned_value)
    results = run_policies(scenario, policies)
    metrics = {name: r.metrics for name, r in results.items()}
    ours_poll = next((p.poll_seconds for p in policies if p.name == "ours"), 5.0)
    out: dict[str, Any] = {
        "scenario": {"name": scenario.name, "description": scenario.description,
                     "duration_seconds": scenario.duration_seconds, "base_rate": scenario.base_rate,
                     "rate_per_replica": scenario.rate_per_replica, "startup_seconds": scenario.startup_seconds,
                     "min": scenario.min_replicas, "max": scenario.max_replicas,
                     "drain_seconds": scenario.drain_seconds, "max_send_rate": scenario.max_send_rate,
                     "announced": scenario.announced},
        "keda_tuned_value": tuned_value,
        "keda_tuning": {str(v): {"p99_seconds": p99, "replica_seconds": cost} for v, (p99, cost) in tuning.items()},
        "policies": {name: asdict(m) for name, m in metrics.items()},
        "acceptance": acceptance(scenario, metrics, ours_poll),
    }
    if with_series:
        out["series"] = {name: asdict(r.series) for name, r in results.items()}
    return out


# --------------------------------------------------------------------------- presentation (CLI edge)
TABLE_COLUMNS = (
    ("policy", "policy", "{}"), ("p50 s", "p50_seconds", "{:.0f}"), ("p99 s", "p99_seconds", "{:.0f}"),
    ("max s", "max_seconds", "{:.0f}"), ("peak backlog", "peak_backlog", "{:,.0f}"),
    ("drain s", "time_to_drain_seconds", "{:.0f}"), ("replica·s", "replica_seconds", "{:,.0f}"),
    ("peak pods", "peak_replicas", "{}"), ("scale events", "scale_events", "{}"),
)


def format_table(report: Mapping[str, Any]) -> str:
    """A plain-text table of one `compare` report (rich renders it when available)."""
    rows = [[fmt.format(m[key]) for _, key, fmt in TABLE_COLUMNS] for m in report["policies"].values()]
    headers = [h for h, _, _ in TABLE_COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [f"scenario {report['scenario']['name']} (keda-queuelength-tuned value = {report['keda_tuned_value']:g})",
             "  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    for c in report["acceptance"]:
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        lines.append(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['check']}: {value} (limit {c['limit']:.3g})")
    return "\n".join(lines)


def print_report(report: Mapping[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is an optional extra
        print(format_table(report))
        return
    table = Table(title=f"{report['scenario']['name']} — keda-queuelength-tuned value {report['keda_tuned_value']:g}")
    for header, _, _ in TABLE_COLUMNS:
        table.add_column(header, justify="left" if header == "policy" else "right")
    for m in report["policies"].values():
        table.add_row(*(fmt.format(m[key]) for _, key, fmt in TABLE_COLUMNS))
    console = Console(width=max(Console().width, 130))  # never truncate figures
    console.print(table)
    for c in report["acceptance"]:
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        mark = "[green]PASS[/green]" if c["passed"] else "[red]FAIL[/red]"
        console.print(f"  {mark}  {c['check']}: {value} (limit {c['limit']:.3g})")


def plot(reports: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Three stacked panels per scenario (arrival rate, backlog, replicas), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(reports), figsize=(7 * len(reports), 9), sharex="col", squeeze=False)
    for col, report in enumerate(reports):
        series = report["series"]
        top, mid, bottom = axes[0][col], axes[1][col], axes[2][col]
        first = next(iter(series.values()))
        minutes = [t / 60 for t in first["t"]]
        top.plot(minutes, first["arrival_rate"], color="black")
        top.set_title(report["scenario"]["name"])
        top.set_ylabel("arrival rate (emails/s)")
        for name, s in series.items():
            if name == "static":  # its backlog dwarfs every other line
                continue
            mid.plot(minutes, s["backlog"], label=name, linewidth=1)
            bottom.plot(minutes, s["replicas"], label=name, linewidth=1)
        mid.set_ylabel("backlog (messages)")
        bottom.set_ylabel("replicas")
        bottom.set_xlabel("minutes")
        bottom.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cli_simulate(argv: Sequence[str] | None = None) -> int:
    """`emailqueue-operator simulate [SCENARIO|FILE ...] [--all] [--json] [--plot FILE.png]`."""
    parser = argparse.ArgumentParser(prog="emailqueue-operator simulate",
                                     description="Replay surge scenarios against scaling policies.")
    parser.add_argument("scenarios", nargs="*", help=f"shipped names ({', '.join(scenario_names())}) or YAML paths")
    parser.add_argument("--all", action="store_true", help="every shipped scenario")
    parser.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    parser.add_argument("--series", action="store_true", help="include time series in --json output")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG: arrival rate, backlog, replicas")
    parser.add_argument("--no-ours", action="store_true", help="only the baselines")
    parser.add_argument("--list", action="store_true", help="list the shipped scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name in scenario_names():
            print(f"{name}: {load_scenario(name).description}")
        return 0
    names = scenario_names() if args.all else args.scenarios
    if not names:
        parser.error("name a scenario (or --all / --list)")
    try:
        reports = [compare(load_scenario(n), include_ours=not args.no_ours,
                           with_series=bool(args.plot or args.series)) for n in names]
    except ScenarioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.plot:
        plot(reports, args.plot)
    if args.json:
        if args.plot and not args.series:
            for r in reports:
                r.pop("series", None)
        json.dump(reports if len(reports) > 1 else reports[0], sys.stdout, indent=2)
        print()
    else:
        for report in reports:
            print_report(report)
        if args.plot:
            print(f"plot written to {args.plot}")
    failed = any(not c["passed"] for r in reports for c in r["acceptance"])
    return 1 if failed else 0
