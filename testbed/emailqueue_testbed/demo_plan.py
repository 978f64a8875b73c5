"""The demo's surge plan (pure): the 2023-09-20 incident compressed for the live test bed.

- `SurgePlan`: arrival steps, per-replica rate, start-up, SLO, bounds, and the EmailQueue spec
  the operator gets for it (the simulator's `ours` spec pointed at the demo's objects);
- `compress` / `preset`: a simulator scenario shrunk into a plan, factors recorded;
- the names of the objects the demo creates (Deployment, EmailQueue, queue, Secret).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

DEPLOYMENT = "email-worker"
EMAILQUEUE = "emails"
QUEUE = "emails"
SECRET = "rabbitmq"
SOURCE_SCENARIO = "incident-2023-09-20"
# Measured on the test bed: `email-worker run` answers /readyz ~0.5-1.5 s after exec on an idle
# machine; the plans' startup_seconds = emulated delay + this.
PROCESS_START_SECONDS = 1.5
# RabbitMQ 3.10 updates a quorum queue's counters every 5 s; with the test bed's 1 s
# statistics interval (collect_statistics_interval = 1000) the management API's publish
# rate reads 0.0 for ~3.5 s of every 5 s (measured; steady at RabbitMQ's default 5000).
# A poll that reads 0/s with an empty queue recommends min: with the planner's scale-down
# window (= start-up, 4 s here) that scaled 9 → 2 mid-surge, and a 10 s window still let
# one 17 → 2 through. The incident's own window (30 s = its pod start-up) does not shrink
# with the timeline, so the demo keeps it; the simulator runs the same spec.
QUORUM_STATS_SPEC: Mapping[str, Any] = {"behavior": {"scaleDown": {"stabilizationSeconds": 30}}}
# When the system counts as healthy again after the backlog is gone: the operator's rates
# (two polls) and RabbitMQ's statistics tick must have forgotten the surge.
STEADY_AFTER_DRAIN_POLLS = 2
RABBIT_STATS_TICK_SECONDS = 5.0


@dataclass(frozen=True)
class SurgePlan:
    """A compressed surge: what is published when, and how the fleet is configured."""

    name: str
    steps: tuple[tuple[float, float], ...]
    """Arrival rate, piecewise constant: (seconds from start, emails/s)."""
    duration_seconds: float
    rate_per_replica: float
    """Emails/s one worker sends (its RATE_LIMIT) and the spec's ratePerReplica."""
    pod_start_delay_seconds: float
    """Emulated pod creation → process start (the kubelet's delay)."""
    min_replicas: int
    max_replicas: int
    drain_seconds: float
    """The SLO (spec.target.drainSeconds)."""
    poll_seconds: int
    compression: Mapping[str, float] = field(default_factory=dict)
    """Live value ÷ incident value per quantity (time, arrival_rate, rate_per_replica, ...)."""
    spec_overrides: Mapping[str, Any] = field(default_factory=dict)
    """EmailQueue spec settings over the simulator's `ours` spec; the simulator gets them too."""

    @property
    def startup_seconds(self) -> float:
        """Pod creation → consuming, as the model and spec.target.startupSeconds see it."""
        return self.pod_start_delay_seconds + PROCESS_START_SECONDS

    @property
    def base_rate(self) -> float:
        return self.steps[0][1]

    @property
    def peak_rate(self) -> float:
        return max(rate for _, rate in self.steps)

    @property
    def peak_replicas_needed(self) -> int:
        """Replicas that just keep up with the peak arrival rate (no backlog to drain)."""
        return math.ceil(self.peak_rate / self.rate_per_replica - 1e-9)

    def scenario(self) -> Any:
        """The plan as a simulator `Scenario` (for the live-vs-model comparison)."""
        from emailqueue_operator.sim import scenario_from_mapping

        return scenario_from_mapping({
            "name": self.name, "description": f"{SOURCE_SCENARIO} compressed for the live demo",
            "duration_seconds": self.duration_seconds, "arrival": {"steps": [list(s) for s in self.steps]},
            "rate_per_replica": self.rate_per_replica, "startup_seconds": self.startup_seconds,
            "min": self.min_replicas, "max": self.max_replicas, "drain_seconds": self.drain_seconds,
            "poll_seconds": self.poll_seconds, "spec": dict(self.spec_overrides),
        })

    @property
    def surge_end(self) -> float:
        """When the arrival rate last falls back to the base rate."""
        from emailqueue_operator.sim import surge_end

        return surge_end(self.scenario().arrival, self.duration_seconds)

    @property
    def surge_start(self) -> float:
        return next((t for t, rate in self.steps if rate > self.base_rate), 0.0)

    def rate_at(self, t: float) -> float:
        rate = self.steps[0][1]
        for start, value in self.steps:
            if start <= t:
                rate = value
        return rate if 0 <= t < self.duration_seconds else 0.0

    def published_by(self, t: float) -> float:
        """Emails due in [0, t): the area under the step curve."""
        t = min(max(t, 0.0), self.duration_seconds)
        total = 0.0
        knots = [*self.steps, (self.duration_seconds, 0.0)]
        for (start, rate), (end, _) in itertools.pairwise(knots):
            if t <= start:
                break
            total += rate * (min(t, end) - start)
        return total

    def total_emails(self) -> int:
        return math.floor(self.published_by(self.duration_seconds) + 1e-9)

    def emailqueue_spec(self, prometheus: bool = False) -> dict[str, Any]:
        """The EmailQueue spec: what the simulator runs for `ours`, pointed at the demo's objects.
        Counts and rates from the management API, or from the Prometheus plugin."""
        from emailqueue_operator.baselines import scenario_spec

        spec = scenario_spec(self.scenario())
        spec["scaleTargetRef"] = {"apiVersion": "apps/v1", "kind": "Deployment", "name": DEPLOYMENT}
        source = ({"prometheusSecretRef": {"name": SECRET, "urlKey": "prometheus-url"}} if prometheus
                  else {"managementSecretRef": {"name": SECRET, "urlKey": "url"}})
        spec["broker"] = {"queue": QUEUE, "amqpSecretRef": {"name": SECRET, "uriKey": "uri"}, **source}
        return spec

    def describe(self) -> list[str]:
        """Human lines: what was compressed and by how much."""
        c = self.compression
        lines = [
            f"{self.name}: {self.base_rate:g}/s → {self.peak_rate:g}/s at t={self.surge_start:g}s for "
            f"{self.surge_end - self.surge_start:g}s → {self.base_rate:g}/s, {self.duration_seconds:g}s in all",
            f"{self.rate_per_replica:g} emails/s per worker (RATE_LIMIT), ~{self.peak_replicas_needed} workers at the "
            f"peak, min {self.min_replicas} max {self.max_replicas}, start-up {self.startup_seconds:g}s, "
            f"drainSeconds {self.drain_seconds:g}, pollSeconds {self.poll_seconds}",
        ]
        if c:
            lines.append("compression vs the incident (live ÷ real): " + ", ".join(
                f"{k} ×{v:.3g}" for k, v in c.items()))
        return lines


def compress(original: Any, *, time_factor: float, arrival_factor: float, rate_per_replica: float,
             pod_start_delay_seconds: float, drain_seconds: float, min_replicas: int, max_replicas: int,
             poll_seconds: int, name: str, spec_overrides: Mapping[str, Any] | None = None) -> SurgePlan:
    """Shrink a simulator scenario with piecewise-constant arrivals into a `SurgePlan`.

    The timeline shrinks by `time_factor` and the arrival rates by `arrival_factor`; the
    control-loop constants (start-up, SLO, poll) cannot shrink as much — the broker's rates
    are 5 s averages and a process takes ~1 s to start — so they are given, and their
    factors are reported beside the others.
    """
    times, rates = original.arrival.times, original.arrival.rates
    steps = tuple((round(t * time_factor, 3), round(r * arrival_factor, 3)) for t, r in zip(times, rates, strict=True))
    plan = SurgePlan(
        name=name, steps=steps, duration_seconds=round(original.duration_seconds * time_factor, 3),
        rate_per_replica=rate_per_replica, pod_start_delay_seconds=pod_start_delay_seconds,
        min_replicas=min_replicas, max_replicas=max_replicas, drain_seconds=drain_seconds, poll_seconds=poll_seconds,
        spec_overrides=dict(spec_overrides or {}))
    factors = {
        "time": time_factor, "arrival_rate": arrival_factor,
        "rate_per_replica": rate_per_replica / original.rate_per_replica,
        "startup": plan.startup_seconds / original.startup_seconds if original.startup_seconds else 1.0,
        "drain_seconds": drain_seconds / original.drain_seconds,
        "peak_replicas_needed": plan.peak_replicas_needed / math.ceil(
            max(rates) / original.rate_per_replica - 1e-9),
        "min": min_replicas / original.min_replicas, "max": max_replicas / original.max_replicas,
    }
    return replace(plan, compression=factors)


def preset(name: str) -> SurgePlan:
    """`full` (make demo, ~8 min), `quick` (~3 min) or `e2e` (the closed-loop test, ~2 min)."""
    from emailqueue_operator.sim import load_scenario

    original = load_scenario(SOURCE_SCENARIO)
    common: dict[str, Any] = dict(rate_per_replica=3.0, pod_start_delay_seconds=2.5, poll_seconds=2,
                                  spec_overrides=QUORUM_STATS_SPEC)
    if name == "full":
        # 45 min → 3 min of surge; 20 → 2.5/s and 400 → 50/s; ~17 workers at the peak.
        return compress(original, time_factor=1 / 15, arrival_factor=1 / 8, drain_seconds=20, min_replicas=2,
                        max_replicas=24, name=f"{SOURCE_SCENARIO} ×1/15", **common)
    if name == "quick":
        # 45 min → 67.5 s of surge; 2 → 40/s; ~14 workers at the peak.
        return compress(original, time_factor=1 / 40, arrival_factor=1 / 10, drain_seconds=20, min_replicas=2,
                        max_replicas=20, name=f"{SOURCE_SCENARIO} ×1/40", **common)
    if name == "e2e":
        # 45 min → 45 s of surge; 1 → 20/s; ~7 workers at the peak.
        return compress(original, time_factor=1 / 60, arrival_factor=1 / 20, drain_seconds=15, min_replicas=1,
                        max_replicas=10, name=f"{SOURCE_SCENARIO} ×1/60", **common)
    raise ValueError(f"unknown preset {name!r} (full, quick, e2e)")
