"""Capacity planner: from a peak rate and an SLO to a ready-to-apply EmailQueue (issue 4).

This module owns `emailqueue-operator plan`: given the peak and base send rates, what
one worker sustains, pod start-up time and an SLO (drain seconds or maximum message
age), it recommends replicas min/max, the target and behavior settings, renders an
EmailQueue manifest, and replays a synthetic surge with those settings in the simulator
beside KEDA's default (QueueLength 20) and the ideal-reactive bound.

How each number is chosen (all pure arithmetic; see `recommend`):
- min = ceil(1.2 × base / μ), at least 1: the base load with 20 % headroom, so ordinary
  jitter never waits for a start-up.
- max = ceil((peak + B / drain) / μ), B = (peak − min·μ) × (start-up + poll): the backlog
  an unforeseen surge builds before new pods send, drained within the SLO while the peak
  keeps arriving; capped by ceil(maxSendRate / μ) when the provider caps sends.
- drainSeconds = the SLO; with a maximum-age SLO, maxMessageAgeSeconds is set instead and
  the simulator uses drain = age − start-up − poll (at least one poll).
- backlogPerReplica = μ × drain: the KEDA-parity backlog term then asks for exactly the
  drain term's backlog share, so it never overrides the SLO but still acts if λ is lost.
- behavior = `baselines.slo_behavior` (poll ≈ start-up / 10, tolerance 0, scale up to max
  in one step, scale-down stabilization = start-up), the settings measured in `compare`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import yaml

from .baselines import IdealReactive, OurPolicy, keda_queue_length, scaling_available, slo_behavior
from .sim import Metrics, Scenario, scenario_from_mapping, simulate

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
        found = []
        for label, value in (("peak rate", self.peak_rate), ("rate per replica", self.rate_per_replica),
                             ("surge seconds", self.surge_seconds)):
            if not value > 0:
                found.append(f"{label} must be > 0")
        if self.startup_seconds < 0 or self.base_rate < 0:
            found.append("start-up seconds and base rate must be >= 0")
        if self.base_rate > self.peak_rate:
            found.append("base rate must not exceed the peak rate")
        if (self.drain_seconds is None) == (self.max_age_seconds is None):
            found.append("give exactly one SLO: drain seconds or max age seconds")
        for label, value in (("drain seconds", self.drain_seconds), ("max age seconds", self.max_age_seconds),
                             ("max send rate", self.max_send_rate)):
            if value is not None and not value > 0:
                found.append(f"{label} must be > 0")
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


class PlanError(ValueError):
    """Inputs that cannot be planned for; the message lists every problem."""


def recommend(inputs: PlanInput) -> Plan:
    """Settings for the inputs (see the module docstring for each rule)."""
    problems = inputs.problems()
    if problems:
        raise PlanError("; ".join(problems))
    mu = inputs.rate_per_replica
    behavior = slo_behavior(inputs.startup_seconds, 1)  # max fixed below
    poll = int(behavior["pollSeconds"])
    warnings: list[str] = []
    if inputs.drain_seconds is not None:
        drain = inputs.drain_seconds
    else:
        assert inputs.max_age_seconds is not None
        drain = max(float(poll), inputs.max_age_seconds - inputs.startup_seconds - poll)
        if inputs.max_age_seconds <= inputs.startup_seconds + poll:
            warnings.append(
                f"a {inputs.max_age_seconds:g}s age SLO cannot hold through an unforeseen surge: new pods need "
                f"{inputs.startup_seconds:g}s to start plus a {poll}s poll; announce surges in spec.schedule "
                f"or raise min to ceil(peak / μ) = {math.ceil(inputs.peak_rate / mu - 1e-9)}")
    min_replicas = max(1, math.ceil(MIN_HEADROOM * inputs.base_rate / mu - 1e-9))
    surge_backlog = max(0.0, inputs.peak_rate - min_replicas * mu) * (inputs.startup_seconds + poll)
    max_replicas = max(min_replicas, math.ceil((inputs.peak_rate + surge_backlog / drain) / mu - 1e-9))
    if inputs.max_send_rate is not None:
        useful = max(min_replicas, math.ceil(inputs.max_send_rate / mu - 1e-9))
        if useful < max_replicas:
            warnings.append(f"the provider cap {inputs.max_send_rate:g}/s makes pods beyond {useful} useless: "
                            f"max lowered from {max_replicas}; surges above the cap queue up whatever you run")
            max_replicas = useful
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
    return Plan(inputs, min_replicas, max_replicas, drain, backlog_per_replica, poll, spec, tuple(warnings))


def manifest(plan: Plan) -> str:
    """The EmailQueue as YAML, ready for `kubectl apply -f -`."""
    document = {
        "apiVersion": "emailqueue.dev/v1alpha1",
        "kind": "EmailQueue",
        "metadata": {"name": plan.inputs.name},
        "spec": plan.spec,
    }
    return yaml.safe_dump(document, sort_keys=False)


def surge_scenario(plan: Plan) -> Scenario:
    """A synthetic unforeseen surge: base rate, the peak from t=10 min, back to base."""
    i = plan.inputs
    end_of_surge = SURGE_START_SECONDS + i.surge_seconds
    return scenario_from_mapping({
        "name": "planned-surge",
        "description": f"{i.base_rate:g}/s, {i.peak_rate:g}/s for {i.surge_seconds:g}s, back to {i.base_rate:g}/s",
        "duration_seconds": end_of_surge + AFTER_SURGE_SECONDS,
        "arrival": {"steps": [[0, i.base_rate], [SURGE_START_SECONDS, i.peak_rate], [end_of_surge, i.base_rate]]},
        "rate_per_replica": i.rate_per_replica, "startup_seconds": i.startup_seconds,
        "min": plan.min_replicas, "max": plan.max_replicas, "drain_seconds": plan.drain_seconds,
        "max_send_rate": i.max_send_rate,
    })


def evaluate(plan: Plan) -> dict[str, Metrics]:
    """Replay the synthetic surge: ours with the plan, KEDA's default, the ideal bound."""
    scenario = surge_scenario(plan)
    results = {
        "keda-queuelength": simulate(scenario, keda_queue_length(scenario)).metrics,
        "ideal-reactive": simulate(scenario, IdealReactive(scenario)).metrics,
    }
    if scaling_available():
        # Replayed as the operator will see it through the chosen source.
        policy = OurPolicy(plan.spec, name="ours (planned)", observation=plan.inputs.metrics_source)
        results["ours (planned)"] = simulate(scenario, policy).metrics
    return results


def run_cli_plan(argv: Sequence[str] | None = None) -> int:
    """`emailqueue-operator plan --peak-rate 400 --rate-per-replica 10 --startup-seconds 30 ...`."""
    parser = argparse.ArgumentParser(prog="emailqueue-operator plan",
                                     description="Recommend EmailQueue settings for a peak rate and an SLO, "
                                                 "and replay a surge with them.")
    parser.add_argument("--peak-rate", type=float, required=True, help="emails/s at the worst surge")
    parser.add_argument("--base-rate", type=float, required=True, help="emails/s on an ordinary day")
    parser.add_argument("--rate-per-replica", type=float, required=True, help="emails/s one worker sustains")
    parser.add_argument("--startup-seconds", type=float, required=True, help="pod creation until consuming")
    slo = parser.add_mutually_exclusive_group(required=True)
    slo.add_argument("--drain-seconds", type=float, help="SLO: a backlog drains within this")
    slo.add_argument("--max-age-seconds", type=float, help="SLO: no message waits longer than this")
    parser.add_argument("--max-send-rate", type=float, help="provider cap on the total send rate, emails/s")
    parser.add_argument("--surge-seconds", type=float, default=1800.0, help="length of the replayed surge")
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
    results = {} if args.no_simulate else evaluate(plan)
    if args.json:
        json.dump({"recommendation": {"min": plan.min_replicas, "max": plan.max_replicas,
                                      "drainSeconds": plan.drain_seconds,
                                      "backlogPerReplica": plan.backlog_per_replica,
                                      "pollSeconds": plan.poll_seconds},
                   "warnings": list(plan.warnings), "spec": plan.spec,
                   "simulation": {name: asdict(m) for name, m in results.items()}}, sys.stdout, indent=2)
        print()
        return 0
    print(f"# min {plan.min_replicas}, max {plan.max_replicas}, drain {plan.drain_seconds:g}s, "
          f"backlogPerReplica {plan.backlog_per_replica:g}, poll {plan.poll_seconds}s")
    print(f"# metrics source {plan.inputs.metrics_source}: {METRICS_SOURCES[plan.inputs.metrics_source][0]}")
    for warning in plan.warnings:
        print(f"# WARNING: {warning}")
    print(manifest(plan), end="")
    if results:
        scenario = surge_scenario(plan)
        print(f"\n# replayed surge: {scenario.description}")
        print(f"# {'policy':<18} {'p99 s':>6} {'max s':>6} {'peak backlog':>13} {'replica·s':>10}")
        for name, m in results.items():
            print(f"# {name:<18} {m.p99_seconds:>6.0f} {m.max_seconds:>6.0f} {m.peak_backlog:>13,.0f} "
                  f"{m.replica_seconds:>10,.0f}")
    return 0
