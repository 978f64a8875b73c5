"""Capacity planner: from a peak rate and an SLO to a ready-to-apply EmailQueue (issue 4).

This module owns `emailqueue-operator plan`: given the peak and base send rates, what
one worker sustains, pod start-up time and an SLO (drain seconds or maximum message
age), it recommends replicas min/max, the target and behavior settings, renders an
EmailQueue manifest, and replays a synthetic surge with those settings in the simulator
beside KEDA's default (QueueLength 20) and the ideal-reactive reference policy.

How each number is chosen (all pure arithmetic; see `recommend`):
- min = ceil(1.2 × base / μ), at least 1: the base load with 20 % headroom, so ordinary
  jitter never waits for a start-up.
- max = ceil((peak + B / drain) / μ), B = (peak − min·μ) × (start-up + poll + lag): the
  backlog an unforeseen surge builds before new pods send (lag: how late the metrics source
  shows it, `observation_lag_seconds`), drained within the SLO while the peak keeps
  arriving; capped by ceil(maxSendRate / μ) when the provider caps sends.
- drainSeconds = the SLO; with a maximum-age SLO, maxMessageAgeSeconds is set instead and
  the simulator uses drain = age − start-up − poll − lag (at least one poll).
- backlogPerReplica = μ × drain: the KEDA-parity backlog term then asks for exactly the
  drain term's backlog share, so it never overrides the SLO but still acts if λ is lost.
- behavior = `baselines.slo_behavior` (poll ≈ start-up / 10, tolerance 0, scale up to max
  in one step, scale-down stabilization = start-up), the settings measured in `compare`.

Every input ends in one of two ways (issue 12): a plan whose spec the CRD and `parse_spec`
accept, or a `PlanError` listing every problem (the CLI prints `error: ...`, exit 2).
A plan that cannot keep its promise says so in one-line warnings, with what it does hold:
- inputs are finite and within the CRD's bounds (drainSeconds and maxMessageAgeSeconds
  >= 1, startupSeconds <= 3600) and within `RATE_RANGE` / `SECONDS_LIMIT`, so every
  derived number is finite; a base load beyond 10,000 replicas is an error;
- min and max are capped at the CRD's 10,000 replicas, with a warning saying what the
  capped fleet sends and what the SLO then becomes;
- an SLO shorter than start-up + poll + lag cannot hold through an unforeseen surge (its first
  messages wait for new pods): a warning says what would (a higher min, a schedule);
- the replay is bounded (`REPLAY_MAX_SURGE_SECONDS`, `REPLAY_POD_STEPS_BUDGET`), skipped
  when the fleet the SLO asks for exceeds the CRD's maximum, and a replayed max wait over
  the SLO is a warning naming the wait the plan does hold.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

import yaml

from .baselines import IdealReactive, OurPolicy, keda_queue_length, scaling_available, slo_behavior
from .sim import MANAGEMENT_STATS_TICK_SECONDS, Metrics, Scenario, scenario_from_mapping, simulate
from .spec import MAX_REPLICAS_LIMIT, SpecError, parse_spec

MIN_HEADROOM = 1.2
SURGE_START_SECONDS = 600.0
# What each metrics source gives the policy, and what missing signals cost (docs/benchmarks.md
# has the figures per scenario: `ours` under every observation mode).
METRICS_SOURCES = {
    "prometheus": ("rabbitmq_prometheus plugin (port 15692): ready, unacked, consumers and publish/ack counters "
                   "turned into rates over max(2 polls, 10 s); works with the management collector disabled",
                   {"prometheusSecretRef": {"name": "rabbitmq", "urlKey": "prometheus-url"}}),
    "management": ("management API: counts and rates on the broker's 5 s stats tick; without its metrics collector "
                   "only queue totals (no rates: it then behaves like amqp)",
                   {"managementSecretRef": {"name": "rabbitmq", "urlKey": "management-uri"}}),
    "amqp": ("AMQP only: ready and consumers, no unacked, no rates: arrivals are estimated from the backlog change "
             "and an empty queue only says 'keeping up', so capacity is given back in probing steps (more scale "
             "actions, up to ~1.3-2x the replica-seconds of a rate source after a surge)", {}),
}
AFTER_SURGE_SECONDS = 1200.0

# The CRD's bounds on what the plan writes (deploy/crds/emailqueue.dev_emailqueues.yaml;
# tests/unit/test_planner.py checks they agree).
SLO_SECONDS_MINIMUM = 1.0        # target.drainSeconds / maxMessageAgeSeconds minimum
STARTUP_SECONDS_LIMIT = 3600.0   # target.startupSeconds maximum
# Beyond any mail system (rates in emails/s): the simulator's fluid queue forgets cohorts
# under 1e-9 messages, and above 1e15/s its totals lose whole messages. Inside these, every
# derived number (replicas, backlogPerReplica, the replay's totals) is finite.
RATE_RANGE = (1e-6, 1e15)
SECONDS_LIMIT = 1e9              # ~31 years: drain, age and surge lengths
# The replay runs ~steps × pods of work per policy (~25 ns each): bound both, so the
# CLI answers within a few seconds and the property tests stay fast.
REPLAY_MAX_SURGE_SECONDS = 4 * 3600.0
REPLAY_POD_STEPS_BUDGET = 40_000_000
# Kubernetes names (DNS-1123 subdomain), as the CRD's scaleTargetRef.name pattern.
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def observation_lag_seconds(source: str, poll_seconds: float) -> float:
    """How long after the broker the operator sees a surge through the source, beyond its poll:
    the management API shows counts as of its last stats tick; AMQP has no rates, so arrivals
    are estimated from the backlog change between two polls; the Prometheus plugin is fresh."""
    if source == "management":
        return MANAGEMENT_STATS_TICK_SECONDS
    if source == "amqp":
        return float(poll_seconds)
    return 0.0


def _finite(value: Any) -> TypeGuard[float]:
    """A real number that is neither NaN nor infinite (an int too large for a float is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _shown(value: Any) -> str:
    """A value for an error message, cut short (an int may have hundreds of digits)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _count(replicas: float) -> str:
    """A replica count for a message: 1,234 (rounded up), or 1.5e+13 when absurdly large."""
    return f"{math.ceil(replicas - 1e-9):,}" if replicas < 1e12 else f"{replicas:.2g}"


def _replicas(replicas: float) -> int:
    """ceil of a fractional replica count (float dust ignored); anything beyond the CRD's
    maximum (inf included) is MAX_REPLICAS_LIMIT + 1, so counts stay small ints."""
    if not replicas <= MAX_REPLICAS_LIMIT:
        return MAX_REPLICAS_LIMIT + 1
    return max(0, math.ceil(replicas - 1e-9))


@dataclass(frozen=True)
class PlanInput:
    """What the user knows. Rates in emails/s, times in seconds."""

    peak_rate: float
    rate_per_replica: float
    startup_seconds: float
    base_rate: float
    drain_seconds: float | None = None
    max_age_seconds: float | None = None
    max_send_rate: float | None = None
    surge_seconds: float = 1800.0
    name: str = "email"
    queue: str = "email"
    deployment: str = "email-worker"
    metrics_source: str = "prometheus"

    def problems(self) -> list[str]:
        """Every problem with the inputs (empty when they can be planned for)."""
        found: list[str] = []
        low_rate, high_rate = RATE_RANGE
        # (label, value, minimum, maximum, unit or why the bounds), both bounds allowed
        bounds: list[tuple[str, float | None, float, float, str]] = [
            ("peak rate", self.peak_rate, low_rate, high_rate, " emails/s"),
            ("rate per replica", self.rate_per_replica, low_rate, high_rate, " emails/s"),
            ("base rate", self.base_rate, 0.0, high_rate, " emails/s"),
            ("start-up seconds", self.startup_seconds, 0.0, STARTUP_SECONDS_LIMIT,
             " (the CRD's target.startupSeconds bounds)"),
            ("drain seconds", self.drain_seconds, SLO_SECONDS_MINIMUM, SECONDS_LIMIT,
             " (the CRD's target.drainSeconds minimum is 1)"),
            ("max age seconds", self.max_age_seconds, SLO_SECONDS_MINIMUM, SECONDS_LIMIT,
             " (the CRD's target.maxMessageAgeSeconds minimum is 1)"),
            ("max send rate", self.max_send_rate, low_rate, high_rate, " emails/s"),
            ("surge seconds", self.surge_seconds, 1.0, SECONDS_LIMIT, " (the replay steps by 1 s)"),
        ]
        for label, value, low, high, why in bounds:
            if value is None:
                continue
            if not _finite(value):
                found.append(f"{label} must be a finite number, got {_shown(value)}")
            elif not low <= value <= high:
                found.append(f"{label} must be between {low:g} and {high:g}{why}, got {value:g}")
        if (self.drain_seconds is None) == (self.max_age_seconds is None):
            found.append("give exactly one SLO: drain seconds or max age seconds")
        comparable = _finite(self.base_rate) and _finite(self.peak_rate)
        if comparable and self.base_rate > self.peak_rate:
            found.append("base rate must not exceed the peak rate")
        if comparable and _finite(self.max_send_rate) and self.max_send_rate < self.base_rate:
            found.append(f"max send rate {self.max_send_rate:g}/s is below the base rate {self.base_rate:g}/s: "
                         "the queue would grow without end on an ordinary day")
        for label, given, limit in (("name", self.name, 253), ("deployment", self.deployment, 253)):
            if not isinstance(given, str) or len(given) > limit or not _DNS_SUBDOMAIN.fullmatch(given):
                found.append(f"{label} must be a Kubernetes name (lower-case letters, digits, '-' and '.', "
                             f"at most {limit} characters), got {given!r}")
        if not isinstance(self.queue, str) or not 1 <= len(self.queue) <= 255:
            found.append(f"queue must be 1 to 255 characters, got {self.queue!r}")
        if self.metrics_source not in METRICS_SOURCES:
            found.append(f"metrics source must be one of {', '.join(METRICS_SOURCES)}, got {self.metrics_source!r}")
        return found


@dataclass(frozen=True)
class Plan:
    """The recommendation, the EmailQueue spec it amounts to, and warnings."""

    inputs: PlanInput
    min_replicas: int
    max_replicas: int
    drain_seconds: float           # the drain target the policy and simulator use
    backlog_per_replica: float
    poll_seconds: int
    spec: dict[str, Any]
    warnings: tuple[str, ...] = field(default_factory=tuple)
    # Replicas the peak and the SLO ask for before any cap (may exceed the CRD's maximum).
    wanted_max_replicas: float = 0.0


class PlanError(ValueError):
    """Inputs that cannot be planned for; the message lists every problem."""


def recommend(inputs: PlanInput) -> Plan:
    """Settings for the inputs (see the module docstring for each rule)."""
    problems = inputs.problems()
    if problems:
        raise PlanError("; ".join(problems))
    mu = inputs.rate_per_replica
    peak, base = inputs.peak_rate, inputs.base_rate
    poll = int(slo_behavior(inputs.startup_seconds, 1)["pollSeconds"])
    # An unforeseen surge waits this long for new pods: seen at the next poll, through the source's lag.
    lag = observation_lag_seconds(inputs.metrics_source, poll)
    detection = inputs.startup_seconds + poll + lag
    fleet_limit_rate = MAX_REPLICAS_LIMIT * mu
    warnings: list[str] = []

    if _replicas(base / mu) > MAX_REPLICAS_LIMIT:
        raise PlanError(f"the base rate {base:g}/s needs {_count(base / mu)} replicas of {mu:g}/s, more than the "
                        f"CRD's {MAX_REPLICAS_LIMIT:,} ({fleet_limit_rate:g}/s): a replica must send at least "
                        f"{base / MAX_REPLICAS_LIMIT:g}/s")
    min_replicas = max(1, _replicas(MIN_HEADROOM * base / mu))
    if min_replicas > MAX_REPLICAS_LIMIT:
        min_replicas = MAX_REPLICAS_LIMIT
        warnings.append(f"min capped at the CRD's {MAX_REPLICAS_LIMIT:,}: the base load keeps "
                        f"{fleet_limit_rate / base - 1:.0%} headroom instead of {MIN_HEADROOM - 1:.0%}")

    if inputs.drain_seconds is not None:
        drain = inputs.drain_seconds
        slo_text = f"{drain:g}s drain SLO"
        too_short = drain < detection
    else:
        assert inputs.max_age_seconds is not None
        drain = max(float(poll), inputs.max_age_seconds - detection)
        slo_text = f"{inputs.max_age_seconds:g}s age SLO"
        too_short = inputs.max_age_seconds <= detection
    # Pods beyond what the provider lets through send nothing: only these rates need new pods.
    sendable_peak = peak if inputs.max_send_rate is None else min(peak, inputs.max_send_rate)
    if too_short and sendable_peak > min_replicas * mu:
        hold = _replicas(sendable_peak / mu)
        raise_min = f" or raise min to ceil(peak / μ) = {hold:,}" if hold <= MAX_REPLICAS_LIMIT else ""
        seen = f"a {poll}s poll" + (f" and {lag:g}s of {inputs.metrics_source} lag" if lag else "")
        warnings.append(
            f"a {slo_text} cannot hold through an unforeseen surge: new pods need {inputs.startup_seconds:g}s "
            f"to start plus {seen}, so its first messages wait about {detection:g}s; announce surges "
            f"in spec.schedule{raise_min}")

    surge_backlog = max(0.0, peak - min_replicas * mu) * detection
    wanted = (peak + surge_backlog / drain) / mu
    max_replicas = max(min_replicas, _replicas(wanted))
    if inputs.max_send_rate is not None:
        cap = inputs.max_send_rate
        useful = max(min_replicas, _replicas(cap / mu))
        if cap < peak:
            # FIFO behind a backlog growing at peak − cap, served at cap.
            consequence = (f"a surge above the cap queues up whatever you run: each second of it adds "
                           f"{peak / cap - 1:.2g}s of wait, so no SLO holds through a long one")
        elif cap > peak:
            consequence = (f"a surge's backlog drains at {cap - peak:g}/s, in about "
                           f"{surge_backlog / (cap - peak):,.0f}s")
        else:
            consequence = "a surge's backlog does not drain until the surge ends"
        if useful < max_replicas:
            lowered_from = _count(wanted) if max_replicas > MAX_REPLICAS_LIMIT else f"{max_replicas:,}"
            warnings.append(f"the provider cap {cap:g}/s makes pods beyond {useful:,} useless: max lowered from "
                            f"{lowered_from}; {consequence}")
            max_replicas = useful
        elif cap < peak:
            warnings.append(f"the provider cap {cap:g}/s is below the peak {peak:g}/s: {consequence}")
    if max_replicas > MAX_REPLICAS_LIMIT:
        max_replicas = MAX_REPLICAS_LIMIT
        if sendable_peak >= fleet_limit_rate:
            warnings.append(
                f"the peak {peak:g}/s needs {_count(wanted)} replicas of {mu:g}/s; max capped at the CRD's "
                f"{MAX_REPLICAS_LIMIT:,}, which send {fleet_limit_rate:g}/s: a surge above that queues up "
                f"without end and no SLO holds through it (replicas sending {peak / MAX_REPLICAS_LIMIT:g}/s "
                f"each would keep up)")
        else:
            clears = surge_backlog / (fleet_limit_rate - sendable_peak)
            warnings.append(
                f"the {slo_text} needs {_count(wanted)} replicas of {mu:g}/s; max capped at the CRD's "
                f"{MAX_REPLICAS_LIMIT:,}: an unforeseen surge's backlog then takes about {clears:,.0f}s to clear "
                f"once new pods send, not {drain:g}s")

    backlog_per_replica = mu * drain
    target: dict[str, Any] = {
        "ratePerReplica": mu,
        "startupSeconds": inputs.startup_seconds,
        "backlogPerReplica": backlog_per_replica,
    }
    if inputs.drain_seconds is not None:
        target["drainSeconds"] = inputs.drain_seconds
    else:
        target["maxMessageAgeSeconds"] = inputs.max_age_seconds
    if inputs.max_send_rate is not None:
        target["maxSendRate"] = inputs.max_send_rate
    spec = {
        "scaleTargetRef": {"kind": "Deployment", "name": inputs.deployment},
        "broker": {"queue": inputs.queue, "amqpSecretRef": {"name": "rabbitmq", "uriKey": "uri"},
                   **METRICS_SOURCES[inputs.metrics_source][1]},
        "replicas": {"min": min_replicas, "max": max_replicas},
        "target": target,
        "behavior": slo_behavior(inputs.startup_seconds, max_replicas),
    }
    try:
        parse_spec(spec)  # never hand out a manifest the operator would reject
    except SpecError as err:
        raise PlanError(f"the planned spec would be rejected ({err}); please report this with the inputs") from err
    return Plan(inputs, min_replicas, max_replicas, drain, backlog_per_replica, poll, spec, tuple(warnings),
                wanted_max_replicas=wanted)


def manifest(plan: Plan) -> str:
    """The EmailQueue as YAML, ready for `kubectl apply -f -`."""
    document = {
        "apiVersion": "emailqueue.dev/v1alpha1",
        "kind": "EmailQueue",
        "metadata": {"name": plan.inputs.name},
        "spec": plan.spec,
    }
    return yaml.safe_dump(document, sort_keys=False)


def replayed_surge_seconds(plan: Plan) -> float:
    """The surge length the replay uses: the one asked for, bounded in steps and pod-steps."""
    around = SURGE_START_SECONDS + AFTER_SURGE_SECONDS
    by_budget = REPLAY_POD_STEPS_BUDGET / max(1, plan.max_replicas) - around
    return max(1.0, min(plan.inputs.surge_seconds, REPLAY_MAX_SURGE_SECONDS, math.floor(by_budget)))


def surge_scenario(plan: Plan) -> Scenario:
    """A synthetic unforeseen surge: base rate, the peak from t=10 min, back to base."""
    i = plan.inputs
    surge = replayed_surge_seconds(plan)
    end_of_surge = SURGE_START_SECONDS + surge
    return scenario_from_mapping({
        "name": "planned-surge",
        "description": f"{i.base_rate:g}/s, {i.peak_rate:g}/s for {surge:g}s, back to {i.base_rate:g}/s",
        "duration_seconds": end_of_surge + AFTER_SURGE_SECONDS,
        "arrival": {"steps": [[0, i.base_rate], [SURGE_START_SECONDS, i.peak_rate], [end_of_surge, i.base_rate]]},
        "rate_per_replica": i.rate_per_replica, "startup_seconds": i.startup_seconds,
        "min": plan.min_replicas, "max": plan.max_replicas, "drain_seconds": plan.drain_seconds,
        "max_send_rate": i.max_send_rate,
    })


@dataclass(frozen=True)
class Replay:
    """The replayed surge: metrics per policy (empty when skipped) and what they say about the plan."""

    scenario: Scenario | None
    results: dict[str, Metrics]
    warnings: tuple[str, ...] = ()


OURS = "ours (planned)"


def replay(plan: Plan) -> Replay:
    """Replay the synthetic surge (see `evaluate`) and check the plan's promise against it:
    the longest wait of our policy must stay within the SLO, or a warning says what it holds."""
    if plan.wanted_max_replicas > MAX_REPLICAS_LIMIT:
        return Replay(None, {}, (
            f"replay skipped: the surge asks for {_count(plan.wanted_max_replicas)} replicas, more than the CRD's "
            f"{MAX_REPLICAS_LIMIT:,} (see the warning on max)",))
    notes: list[str] = []
    surge = replayed_surge_seconds(plan)
    if surge < plan.inputs.surge_seconds:
        notes.append(f"the replay plays {surge:g}s of the {plan.inputs.surge_seconds:g}s surge (replay time "
                     f"bounded): waits that build up after that are not measured")
    scenario = surge_scenario(plan)
    results = {
        "keda-queuelength": simulate(scenario, keda_queue_length(scenario)).metrics,
        "ideal-reactive": simulate(scenario, IdealReactive(scenario)).metrics,
    }
    if scaling_available():
        # Replayed as the operator will see it through the chosen source.
        policy = OurPolicy(plan.spec, name=OURS, observation=plan.inputs.metrics_source)
        results[OURS] = simulate(scenario, policy).metrics
        notes.extend(slo_warnings(plan, results))
    return Replay(scenario, results, tuple(notes))


def slo_warnings(plan: Plan, results: dict[str, Metrics]) -> list[str]:
    """A warning when the replayed max wait of our policy exceeds the SLO the plan promises."""
    ours = results[OURS]
    i = plan.inputs
    slo, kind = (i.drain_seconds, "drain") if i.drain_seconds is not None else (i.max_age_seconds, "age")
    assert slo is not None
    if ours.max_seconds <= slo:
        return []
    ideal = results.get("ideal-reactive")
    bound = (f"; no reactive policy waits less than {ideal.max_seconds:.0f}s here: raise min or announce surges "
             f"in spec.schedule" if ideal is not None and ideal.max_seconds > slo else "")
    return [f"replayed surge: messages waited up to {ours.max_seconds:.0f}s (p99 {ours.p99_seconds:.0f}s), over "
            f"the {slo:g}s {kind} SLO: this plan holds a max wait of about {ours.max_seconds:.0f}s{bound}"]


def evaluate(plan: Plan) -> dict[str, Metrics]:
    """Replay the synthetic surge: ours with the plan, KEDA's default, the ideal bound."""
    return replay(plan).results


def run_cli_plan(argv: Sequence[str] | None = None) -> int:
    """`emailqueue-operator plan --peak-rate 400 --rate-per-replica 10 --startup-seconds 30 ...`.

    Exit 0 with the manifest (caveats as `# WARNING: ...` comment lines), 2 with one
    `error: ...` line when the inputs cannot be planned for.
    """
    parser = argparse.ArgumentParser(prog="emailqueue-operator plan",
                                     description="Recommend EmailQueue settings for a peak rate and an SLO, "
                                                 "and replay a surge with them.")
    parser.add_argument("--peak-rate", type=float, required=True, help="emails/s at the worst surge")
    parser.add_argument("--base-rate", type=float, required=True, help="emails/s on an ordinary day")
    parser.add_argument("--rate-per-replica", type=float, required=True, help="emails/s one worker sustains")
    parser.add_argument("--startup-seconds", type=float, required=True,
                        help="pod creation until consuming (0 to 3600)")
    slo = parser.add_mutually_exclusive_group(required=True)
    slo.add_argument("--drain-seconds", type=float, help="SLO: a backlog drains within this (>= 1)")
    slo.add_argument("--max-age-seconds", type=float, help="SLO: no message waits longer than this (>= 1)")
    parser.add_argument("--max-send-rate", type=float, help="provider cap on the total send rate, emails/s")
    parser.add_argument("--surge-seconds", type=float, default=1800.0,
                        help=f"length of the replayed surge (replayed up to {REPLAY_MAX_SURGE_SECONDS:g}s)")
    parser.add_argument("--name", default="email", help="EmailQueue name")
    parser.add_argument("--queue", default="email", help="RabbitMQ queue")
    parser.add_argument("--deployment", default="email-worker", help="worker Deployment")
    parser.add_argument("--metrics-source", choices=list(METRICS_SOURCES), default="prometheus",
                        help="where the operator reads the queue (default: RabbitMQ's Prometheus plugin)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--no-simulate", action="store_true", help="only the recommendation")
    args = parser.parse_args(argv)
    inputs = PlanInput(peak_rate=args.peak_rate, rate_per_replica=args.rate_per_replica,
                       startup_seconds=args.startup_seconds, base_rate=args.base_rate,
                       drain_seconds=args.drain_seconds, max_age_seconds=args.max_age_seconds,
                       max_send_rate=args.max_send_rate, surge_seconds=args.surge_seconds,
                       name=args.name, queue=args.queue, deployment=args.deployment,
                       metrics_source=args.metrics_source)
    try:
        plan = recommend(inputs)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    replayed = Replay(None, {}) if args.no_simulate else replay(plan)
    warnings = plan.warnings + replayed.warnings
    if args.json:
        json.dump({"recommendation": {"min": plan.min_replicas, "max": plan.max_replicas,
                                      "drainSeconds": plan.drain_seconds,
                                      "backlogPerReplica": plan.backlog_per_replica,
                                      "pollSeconds": plan.poll_seconds},
                   "warnings": list(warnings), "spec": plan.spec,
                   "replayedSurgeSeconds": None if replayed.scenario is None else replayed_surge_seconds(plan),
                   "simulation": {name: asdict(m) for name, m in replayed.results.items()}}, sys.stdout, indent=2)
        print()
        return 0
    print(f"# min {plan.min_replicas}, max {plan.max_replicas}, drain {plan.drain_seconds:g}s, "
          f"backlogPerReplica {plan.backlog_per_replica:g}, poll {plan.poll_seconds}s")
    print(f"# metrics source {plan.inputs.metrics_source}: {METRICS_SOURCES[plan.inputs.metrics_source][0]}")
    for warning in warnings:
        print(f"# WARNING: {warning}")
    print(manifest(plan), end="")
    if replayed.scenario is not None:
        print(f"\n# replayed surge: {replayed.scenario.description}")
        print(f"# {'policy':<18} {'p99 s':>6} {'max s':>6} {'peak backlog':>13} {'replica·s':>10}")
        for name, m in replayed.results.items():
            print(f"# {name:<18} {m.p99_seconds:>6.0f} {m.max_seconds:>6.0f} {m.peak_backlog:>13,.0f} "
                  f"{m.replica_seconds:>10,.0f}")
    return 0
