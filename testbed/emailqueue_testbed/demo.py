"""`make demo`: the 2023-09-20 surge replayed end to end on the test bed (issue 7).

Everything is real except time and scale: the kube-apiserver, RabbitMQ, the operator
process, `email-worker run` processes started by the local kubelet, a recording SMTP
server. The incident's scenario is compressed (`PRESETS`, factors printed and written to
the report) so two cores cope and it finishes in minutes.

The module owns, from pure to I/O:
- `SurgePlan` / `compress`: the compressed scenario (arrival steps, per-replica rate,
  start-up, SLO, bounds) and the EmailQueue spec the operator gets for it;
- `summarize`: the report (delivered / lost / duplicates, time-in-queue percentiles,
  peak backlog, time to drain, replica-seconds, scale events) from recorded values;
- `DemoStack`: namespace, vhost, recording SMTP sink, Deployment, Secret, EmailQueue,
  operator and kubelet, torn down in reverse order (also on Ctrl-C / SIGTERM);
- `run_surge`: publishes the surge, samples the loop every second, waits for the drain
  and the return to min, returns a `SurgeRun`;
- `main`: the CLI (`python -m emailqueue_testbed.demo [--quick] [--out DIR]`), live view
  (rich on a terminal, plain lines otherwise), `report.json` and `surge.png`.

tests/e2e/test_closed_loop.py drives the same `DemoStack` and `run_surge` with `E2E`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from . import bed, state
from .alerting import alert_report, check_dashboard, first_breach_in_series, first_slo_breach
from .kubelet import ApiDeployment, KubeletConfig, KubeletEvent, LocalKubelet
from .prometheus import OPERATOR_JOB, AlertSpan, PrometheusServer
from .rabbit import Management
from .smtp import SmtpControl

REPO = state.REPO
CRD_DIR = REPO / "deploy" / "crds"
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


# =========================================================================== the plan (pure)
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
        for (start, rate), (end, _) in zip(knots, knots[1:]):
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
    steps = tuple((round(t * time_factor, 3), round(r * arrival_factor, 3)) for t, r in zip(times, rates))
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


# =========================================================================== recorded values
@dataclass(frozen=True)
class Sample:
    """The loop once a second. t is seconds since publishing started."""

    t: float
    published: int
    received: int                  # SMTP receipts, duplicates included
    backlog_ready: int | None      # None: the management API did not answer
    backlog_unacked: int | None
    desired: int | None            # Deployment spec.replicas (what the operator asked for)
    pods: int                      # pods the kubelet runs, starting ones included
    ready: int
    reason: str = ""               # the EmailQueue's status.lastDecision.reason

    @property
    def backlog(self) -> int | None:
        if self.backlog_ready is None:
            return None
        return self.backlog_ready + (self.backlog_unacked or 0)


@dataclass(frozen=True)
class ScaleEvent:
    at: float                      # seconds since publishing started
    reason: str
    message: str
    type: str = "Normal"


@dataclass(frozen=True)
class SurgeRun:
    """What one surge left behind: enough to recompute every figure of the report."""

    plan: SurgePlan
    started_at: float                                   # wall clock of t=0
    published: Mapping[str, float]                      # job id → wall clock before publish
    receipts: tuple[tuple[str, float], ...]             # (job id, SMTP receive wall clock), in order
    samples: tuple[Sample, ...]
    scale_events: tuple[ScaleEvent, ...]
    kubelet_events: tuple[KubeletEvent, ...]
    drained: bool                                       # every published id seen before the deadline
    settled: bool                                       # fleet back at min before the deadline
    publish_errors: int = 0
    interrupted: bool = False
    alert_spans: tuple[AlertSpan, ...] | None = None     # from the test bed's Prometheus (None: not run)
    annotations: Mapping[str, Mapping[str, str]] | None = None  # alertname -> annotations as rendered
    dashboard: tuple[Mapping[str, Any], ...] | None = None  # every panel query's result over the run


def job_id_from_message_id(message_id: str) -> str | None:
    """`<job-id@domain>` (the worker's Message-ID) → job id."""
    text = message_id.strip()
    if not (text.startswith("<") and text.endswith(">") and "@" in text):
        return None
    return text[1:-1].rsplit("@", 1)[0]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def time_to_drain(samples: Sequence[Sample], surge_end: float, threshold: float) -> tuple[float | None, bool]:
    """Seconds from the surge's end until the backlog is back to ≤ threshold (0 if it already was).

    The same definition as the simulator's, on live samples: (seconds, drained); when it
    never drains, the time to the last sample and False.
    """
    after = [s for s in samples if s.t >= surge_end and s.backlog is not None]
    if not after:
        return None, False
    for sample in after:
        if sample.backlog <= threshold:  # type: ignore[operator]
            return max(0.0, sample.t - surge_end), True
    return after[-1].t - surge_end, False


def summarize(run: SurgeRun, simulated: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report: every figure from recorded values only (pure)."""
    plan = run.plan
    first_seen: dict[str, float] = {}
    unexpected = 0
    for job_id, at in run.receipts:
        if job_id not in run.published:
            unexpected += 1  # e.g. a publish that failed its confirm but reached the queue
            continue
        first_seen.setdefault(job_id, min(at, first_seen.get(job_id, at)))
    in_queue = [first_seen[i] - run.published[i] for i in first_seen]
    delivered = len(first_seen)
    receipts_known = sum(1 for job_id, _ in run.receipts if job_id in run.published)
    backlogs = [(s.backlog, s.t) for s in run.samples if s.backlog is not None]
    peak_backlog, peak_at = max(backlogs, default=(0, 0.0))
    threshold = max(1.0, plan.base_rate)
    drain_s, drained = time_to_drain(run.samples, plan.surge_end, threshold)
    replica_seconds = ready_seconds = 0.0
    for prev, cur in zip(run.samples, run.samples[1:]):
        replica_seconds += prev.pods * (cur.t - prev.t)
        ready_seconds += prev.ready * (cur.t - prev.t)
    desired = [s.desired for s in run.samples if s.desired is not None]
    changes = []
    for prev, cur in zip(run.samples, run.samples[1:]):
        if cur.desired is not None and prev.desired is not None and cur.desired != prev.desired:
            changes.append({"at": round(cur.t, 1), "from": prev.desired, "to": cur.desired, "reason": cur.reason})
    last = run.samples[-1] if run.samples else None
    report: dict[str, Any] = {
        "scenario": {
            "name": plan.name, "source": SOURCE_SCENARIO, "steps": [list(s) for s in plan.steps],
            "duration_seconds": plan.duration_seconds, "surge_start": plan.surge_start, "surge_end": plan.surge_end,
            "rate_per_replica": plan.rate_per_replica, "startup_seconds": plan.startup_seconds,
            "pod_start_delay_seconds": plan.pod_start_delay_seconds, "min": plan.min_replicas,
            "max": plan.max_replicas, "drain_seconds": plan.drain_seconds, "poll_seconds": plan.poll_seconds,
            "peak_replicas_needed": plan.peak_replicas_needed, "compression": dict(plan.compression),
        },
        "published": len(run.published),
        "delivered": delivered,
        # An interrupted run stops before the drain: what is still queued then is not lost.
        "lost": None if run.interrupted else len(run.published) - delivered,
        "undelivered": len(run.published) - delivered,
        "duplicates": receipts_known - delivered,
        "unexpected_receipts": unexpected,
        "publish_errors": run.publish_errors,
        "peak_backlog": peak_backlog,
        "peak_backlog_at": round(peak_at, 1),
        "time_in_queue_seconds": {
            "p50": _round(percentile(in_queue, 50)), "p99": _round(percentile(in_queue, 99)),
            "max": _round(max(in_queue, default=None)),
            "mean": _round(sum(in_queue) / len(in_queue) if in_queue else None),
        },
        "time_to_drain_seconds": _round(drain_s),
        "drained": drained and run.drained,
        "drain_threshold": threshold,
        "replica_seconds": round(replica_seconds, 1),
        "ready_replica_seconds": round(ready_seconds, 1),
        "peak_replicas_desired": max(desired, default=0),
        "peak_replicas_ready": max((s.ready for s in run.samples), default=0),
        "final_replicas": {"desired": last.desired if last else None, "ready": last.ready if last else None},
        "returned_to_min": run.settled,
        "replica_changes": changes,
        "scale_events": [{"at": round(e.at, 1), "type": e.type, "reason": e.reason, "message": e.message}
                         for e in run.scale_events],
        "kubelet": {kind: sum(1 for e in run.kubelet_events if e.kind == kind)
                    for kind in ("create", "ready", "stop", "crash", "kill")},
        "interrupted": run.interrupted,
    }
    if run.alert_spans is not None:
        end_wall = run.started_at + (last.t if last else 0.0)
        breach = first_slo_breach(run.published, first_seen, plan.drain_seconds, end_wall)
        report["alerting"] = alert_report(
            run.alert_spans, surge_start=plan.surge_start, surge_end=plan.surge_end, slo=plan.drain_seconds,
            first_breach=None if breach is None else breach - run.started_at,
            backlog_end=plan.surge_end + drain_s if drained and drain_s is not None else None,
            run_end=last.t if last else 0.0, settle_seconds=STEADY_AFTER_DRAIN_POLLS * plan.poll_seconds
            + RABBIT_STATS_TICK_SECONDS)
        # What the on-call reads: an annotation naming a label the expression dropped renders
        # "<no value>" (pint's alerts/template check, here on the live rendering).
        report["alerting"]["annotations"] = {k: dict(v) for k, v in (run.annotations or {}).items()}
        static_breach = (simulated or {}).get("static_first_slo_breach_at")
        fired = report["alerting"]["congestion_firing_at"]
        report["alerting"]["static_fleet_first_slo_breach_at"] = static_breach
        # Seconds of warning against the incident's fixed fleet (simulated on the same plan).
        report["alerting"]["warning_vs_static_fleet_seconds"] = (
            None if static_breach is None or fired is None else round(static_breach - fired, 1))
    if run.dashboard is not None:
        report["dashboard"] = {"panels": len({d["panel"] for d in run.dashboard}), "queries": len(run.dashboard),
                               "without_data": [f"{d['panel']} ({d['ref']})" for d in run.dashboard
                                                if not d["has_data"]],
                               "results": [dict(d) for d in run.dashboard]}
    if simulated is not None:
        report["simulated"] = dict(simulated)
    return report


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _static_breach(plan: SurgePlan, series: Mapping[str, Any]) -> float | None:
    if not series.get("t"):
        return None
    return first_breach_in_series(series["t"], series["arrival_rate"], series["backlog"], plan.drain_seconds)


def simulate(plan: SurgePlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """The simulator's prediction for the same plan: (report block, ours' series for the plot)."""
    from emailqueue_operator.sim import compare

    result = compare(plan.scenario(), with_series=True)
    policies = result["policies"]
    ours = policies.get("ours", {})
    block = {
        "policy": "ours",
        "published": ours.get("published"), "delivered": ours.get("delivered"),
        "peak_backlog": ours.get("peak_backlog"), "peak_backlog_at": ours.get("peak_backlog_at"),
        "time_in_queue_seconds": {"p50": ours.get("p50_seconds"), "p99": ours.get("p99_seconds"),
                                  "max": ours.get("max_seconds"), "mean": ours.get("mean_seconds")},
        "time_to_drain_seconds": ours.get("time_to_drain_seconds"), "drained": ours.get("drained"),
        "replica_seconds": ours.get("replica_seconds"), "peak_replicas": ours.get("peak_replicas"),
        "scale_events": ours.get("scale_events"),
        # The incident's fixed fleet (min replicas, no scaling) on the same plan: when its first
        # email would have waited longer than the SLO — what the congestion alert warns against.
        "static_first_slo_breach_at": _static_breach(plan, result.get("series", {}).get("static") or {}),
        "other_policies": {name: {"p99_seconds": m["p99_seconds"], "peak_backlog": m["peak_backlog"],
                                  "replica_seconds": m["replica_seconds"], "peak_replicas": m["peak_replicas"]}
                           for name, m in policies.items() if name != "ours"},
    }
    return block, result.get("series", {}).get("ours", {})


# =========================================================================== the stack (I/O)
@dataclass(frozen=True)
class Endpoints:
    """Where the test bed answers (from `bed.current()` or the test fixtures)."""

    kubeconfig: str
    amqp_url: str
    mgmt_url: str
    user: str
    password: str
    prom_url: str | None = None
    """RabbitMQ's Prometheus plugin: when set, the operator reads the queue there."""
    broker_metrics_url: str | None = None
    """RabbitMQ's Prometheus plugin for the test bed's Prometheus to scrape (job rabbitmq)."""

    @staticmethod
    def from_env(env: bed.Env) -> "Endpoints":
        missing = [n for n, v in (("kube", env.kubeconfig), ("rabbitmq", env.amqp_url)) if not v]
        if missing:
            raise state.TestbedError(f"test bed components not running: {', '.join(missing)}")
        # The operator reads the queue from RabbitMQ's Prometheus plugin (counters: rates that do
        # not blink with the management API's statistics tick), the setup RabbitMQ recommends.
        return Endpoints(env.kubeconfig or "", env.amqp_url or "", env.rabbitmq_mgmt_url or "",
                         env.rabbitmq_user or "", env.rabbitmq_password or "",
                         prom_url=env.rabbitmq_prometheus_url, broker_metrics_url=env.rabbitmq_prometheus_url)


class DemoStack:
    """Everything one surge needs, created in order and removed in reverse (see `close`).

    A namespace and a vhost of its own, a private recording SMTP server (the shared one is
    cleared by tests running beside us), the CRD, the worker Deployment at min replicas,
    the AMQP/management Secret, the EmailQueue, the operator process and the kubelet; with
    `prometheus=True`, a Prometheus server scraping the operator, every worker and RabbitMQ,
    the shipped alert rules loaded (`for:` and windows compressed like the timeline).
    """

    def __init__(self, plan: SurgePlan, endpoints: Endpoints, out_dir: Path,
                 on_kubelet_event: Callable[[KubeletEvent], None] | None = None,
                 say: Callable[[str], None] = print, prometheus: bool = False) -> None:
        self.plan, self.endpoints, self.out_dir = plan, endpoints, out_dir
        self.run_id = uuid.uuid4().hex[:6]
        self.namespace = f"demo-{self.run_id}"
        self.vhost = self.namespace
        self.amqp_url = bed.vhost_url(endpoints.amqp_url, self.vhost)
        self.say = say
        self._on_kubelet_event = on_kubelet_event
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self.smtp: SmtpControl | None = None
        self.kubelet: LocalKubelet | None = None
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_metrics_port: int | None = None
        self.with_prometheus = prometheus
        self.prometheus: PrometheusServer | None = None
        self.rendered_annotations: dict[str, dict[str, str]] = {}
        """alertname -> annotations as Prometheus rendered them the first time the alert was seen."""
        self.mgmt = Management(endpoints.mgmt_url, endpoints.user, endpoints.password)
        from kubernetes import client, config

        api_client = config.new_client_from_config(config_file=endpoints.kubeconfig)
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> "DemoStack":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._start_smtp()
        self._apply_crd()
        self._create_broker_objects()
        self._create_kube_objects()
        self._start_kubelet()
        self._start_operator()
        if self.with_prometheus:
            self._start_prometheus()

    def close(self) -> None:
        """Undo everything, newest first; one failing step does not stop the others."""
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:
                self.say(f"cleanup: {what} failed: {type(exc).__name__}: {exc}")

    def _later(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    # -- steps --------------------------------------------------------------------------------------
    def _start_smtp(self) -> None:
        port, control_port = state.free_port(), state.free_port()
        log = self.out_dir / "smtp.log"
        pid = state.spawn([sys.executable, "-m", "emailqueue_testbed.smtp", "--port", str(port),
                           "--control-port", str(control_port), "--no-bodies"], log)
        self._later("stop the SMTP sink", lambda: state.kill_group(pid, timeout=5))
        smtp = SmtpControl("127.0.0.1", port, control_port)

        def up() -> bool:
            try:
                smtp.count()
                return state.port_open(port)
            except OSError:
                return False

        state.wait_until(up, 30, "the demo's recording SMTP server", log=log)
        self.smtp = smtp

    def _apply_crd(self) -> None:
        kubectl = str(state.binary("kubectl"))
        env = {**os.environ, "KUBECONFIG": self.endpoints.kubeconfig}
        for argv in (["apply", "-f", str(CRD_DIR)],
                     ["wait", "--for=condition=Established", "crd/emailqueues.emailqueue.dev", "--timeout=60s"]):
            result = subprocess.run([kubectl, *argv], capture_output=True, text=True, env=env, timeout=90)
            if result.returncode:
                raise state.TestbedError(f"kubectl {' '.join(argv)}: {result.stderr.strip()}")

    def _create_broker_objects(self) -> None:
        from email_worker.topology import Topology, declare

        import pika

        self.mgmt.create_vhost(self.vhost, self.endpoints.user)
        self._later(f"delete vhost {self.vhost}", lambda: self.mgmt.delete_vhost(self.vhost))
        # Declared up front (same arguments as `email-worker run` defaults) so the first
        # publish and the operator's first probe find the queue.
        with contextlib.closing(pika.BlockingConnection(pika.URLParameters(self.amqp_url))) as conn:
            declare(conn.channel(), Topology(prefix=QUEUE))

    def _create_kube_objects(self) -> None:
        ns = self.namespace
        self.core.create_namespace({"metadata": {"name": ns, "labels": {"app.kubernetes.io/part-of": "emailqueue-demo"}}})
        self._later(f"delete namespace {ns}", self._delete_namespace)
        self.core.create_namespaced_secret(ns, {"metadata": {"name": SECRET}, "stringData": {
            "uri": self.amqp_url, "url": self.endpoints.mgmt_url, "prometheus-url": self.endpoints.prom_url or ""}})
        self.apps.create_namespaced_deployment(ns, {
            "metadata": {"name": DEPLOYMENT},
            "spec": {"replicas": self.plan.min_replicas, "selector": {"matchLabels": {"app": DEPLOYMENT}},
                     "template": {"metadata": {"labels": {"app": DEPLOYMENT}},
                                  "spec": {"containers": [{"name": "worker",
                                                           "image": "emailqueue/email-worker:demo"}]}}}})
        self.custom.create_namespaced_custom_object("emailqueue.dev", "v1alpha1", ns, "emailqueues", {
            "apiVersion": "emailqueue.dev/v1alpha1", "kind": "EmailQueue", "metadata": {"name": EMAILQUEUE},
            "spec": self.plan.emailqueue_spec(prometheus=bool(self.endpoints.prom_url))})

    def _delete_namespace(self) -> None:
        from kubernetes.client.exceptions import ApiException

        ns = self.namespace
        # No controller-manager on the test bed: a namespace is never emptied for us, so the
        # objects go first. The EmailQueue's finalizer is gone once the operator has stopped
        # (kopf removes it on cleanup), else it is removed here.
        with contextlib.suppress(ApiException):
            self.custom.patch_namespaced_custom_object("emailqueue.dev", "v1alpha1", ns, "emailqueues", EMAILQUEUE,
                                                       {"metadata": {"finalizers": None}})
        for delete in (lambda: self.custom.delete_namespaced_custom_object("emailqueue.dev", "v1alpha1", ns,
                                                                           "emailqueues", EMAILQUEUE),
                       lambda: self.apps.delete_namespaced_deployment(DEPLOYMENT, ns),
                       lambda: self.core.delete_namespaced_secret(SECRET, ns),
                       lambda: self.core.delete_collection_namespaced_event(ns),
                       lambda: self.core.delete_namespace(ns),
                       # ...and it stays Terminating until someone finalizes it, as the
                       # namespace controller does once the namespace is empty.
                       lambda: self.core.replace_namespace_finalize(
                           ns, {"metadata": {"name": ns}, "spec": {"finalizers": []}})):
            with contextlib.suppress(ApiException):
                delete()

    def worker_env(self) -> dict[str, str]:
        """The environment every worker process gets (what a Deployment's pod spec would set)."""
        smtp = self.smtp
        assert smtp is not None
        return {"AMQP_URL": self.amqp_url, "SMTP_HOST": smtp.host, "SMTP_PORT": str(smtp.port),
                "QUEUE": QUEUE, "RATE_LIMIT": f"{self.plan.rate_per_replica:g}", "RATE_BURST": "1",
                "CONCURRENCY": "2", "GRACE_SECONDS": "10", "LOG_LEVEL": "warning",
                "MESSAGE_ID_DOMAIN": "demo.emailqueue.dev"}

    def _start_kubelet(self) -> None:
        config = KubeletConfig(
            worker_env=self.worker_env(),
            startup_delay_seconds=self.plan.pod_start_delay_seconds, poll_seconds=0.5,
            termination_grace_seconds=15, log_dir=self.out_dir / "pods", pod_prefix=DEPLOYMENT)
        self.kubelet = LocalKubelet(ApiDeployment(self.namespace, DEPLOYMENT, self.endpoints.kubeconfig), config,
                                    on_event=self._on_kubelet_event)
        self.kubelet.start()
        self._later("stop the kubelet and its workers", self.kubelet.stop)
        self.kubelet.wait_ready(self.plan.min_replicas, 60)

    def _start_operator(self) -> None:
        self.operator_metrics_port = state.free_port()
        log = open(self.out_dir / "operator.log", "ab")
        env = {**os.environ, "KUBECONFIG": self.endpoints.kubeconfig}
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "emailqueue_operator", "run", "--namespace", self.namespace,
             "--metrics-port", str(self.operator_metrics_port), "--health-port", "0"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
            start_new_session=True)  # our Ctrl-C handler stops it, in order
        self._later("stop the operator", lambda: self._stop_operator(log))
        deadline = time.monotonic() + 60
        while not self._first_poll_done():
            if self.operator.poll() is not None:
                raise state.TestbedError(f"the operator exited ({self.operator.returncode}); see {log.name}")
            if time.monotonic() > deadline:
                raise state.TestbedError("the operator did not poll the EmailQueue within 60 s; see operator.log")
            time.sleep(0.5)

    def _start_prometheus(self) -> None:
        """After the operator's first poll: a Prometheus that started first would see the operator
        down during its start-up and (with `for:` compressed) fire EmailQueueOperatorDown."""
        broker = urllib.parse.urlsplit(self.endpoints.broker_metrics_url).netloc \
            if self.endpoints.broker_metrics_url else None
        time_factor = self.plan.compression.get("time", 1.0)
        prom = PrometheusServer(self.out_dir / "prometheus", operator_target=f"127.0.0.1:{self.operator_metrics_port}",
                                operator_namespace=self.namespace, worker_job=DEPLOYMENT, rabbitmq_target=broker,
                                time_factor=time_factor)
        prom.start()
        self._later("stop Prometheus", prom.stop)
        self.prometheus = prom
        self.sync_scrape_targets()

        def operator_scraped() -> bool:
            try:
                return bool(prom.query(f'up{{job="{OPERATOR_JOB}"}} == 1'))
            except Exception:
                return False

        # Until the first scrape, absent(up) is true: the surge starts once Prometheus sees the operator.
        state.wait_until(operator_scraped, 30, "Prometheus' first scrape of the operator", interval=0.5,
                         log=prom.workdir / "prometheus.log")

    def sync_scrape_targets(self) -> None:
        """Point Prometheus at the workers that run now (what the worker Service's Endpoints list)."""
        if self.prometheus is not None and self.kubelet is not None:
            self.prometheus.set_worker_targets(self.kubelet.metrics_ports(), self.namespace)

    def _stop_operator(self, log: Any) -> None:
        proc = self.operator
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()

    def _first_poll_done(self) -> bool:
        status = self.emailqueue_status()
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])

    # -- reads ----------------------------------------------------------------------------------------
    def firing_alerts(self) -> dict[str, str]:
        """alertname -> pending|firing, as the test bed's Prometheus evaluates the shipped rules now."""
        if self.prometheus is None:
            return {}
        try:
            alerts = self.prometheus.alerts()
        except Exception:  # Prometheus busy: nothing new to report this second
            return {}
        states: dict[str, str] = {}
        for alert in alerts:
            name = (alert.get("labels") or {}).get("alertname", "")
            self.rendered_annotations.setdefault(name, dict(alert.get("annotations") or {}))
            if states.get(name) != "firing":
                states[name] = str(alert.get("state", ""))
        return states

    def dashboard_variables(self) -> dict[str, str]:
        """The shipped dashboard's template variables as a user would pick them for this run."""
        return {"namespace": self.namespace, "emailqueue": EMAILQUEUE, "job": DEPLOYMENT, "instance": ".*",
                "datasource": "prometheus"}

    def emailqueue_status(self) -> dict[str, Any]:
        try:
            obj = self.custom.get_namespaced_custom_object("emailqueue.dev", "v1alpha1", self.namespace,
                                                           "emailqueues", EMAILQUEUE, _request_timeout=5)
        except Exception:  # an API error or an apiserver that is down (fault tests): nothing to report now
            return {}
        return obj.get("status") or {}

    def desired_replicas(self) -> int | None:
        try:
            return int(self.apps.read_namespaced_deployment_scale(DEPLOYMENT, self.namespace,
                                                                  _request_timeout=5).spec.replicas)
        except Exception:
            return None

    def queue_depth(self) -> tuple[int | None, int | None]:
        try:
            q = self.mgmt.queue(self.vhost, QUEUE)
        except (OSError, urllib.error.URLError, ValueError):
            return None, None
        return int(q.get("messages_ready") or 0), int(q.get("messages_unacknowledged") or 0)

    def scale_events(self, started_at: float) -> list[ScaleEvent]:
        """The EmailQueue's Kubernetes Events (what `kubectl describe eq` shows), oldest first."""
        try:
            items = self.core.list_namespaced_event(self.namespace, field_selector="involvedObject.kind=EmailQueue",
                                                    _request_timeout=10).items
        except Exception:
            return []
        events = []
        for item in items:
            when = item.event_time or item.last_timestamp or item.first_timestamp or item.metadata.creation_timestamp
            at = when.timestamp() - started_at if when else 0.0
            events.append(ScaleEvent(at, item.reason or "", item.message or "", item.type or "Normal"))
        return sorted(events, key=lambda e: e.at)


# =========================================================================== the surge (I/O)
class _SurgePublisher(threading.Thread):
    """Publishes on the plan's schedule through the project's Publisher (confirms on)."""

    def __init__(self, plan: SurgePlan, amqp_url: str, run_id: str, stop: threading.Event) -> None:
        super().__init__(name="surge-publisher", daemon=True)
        self.plan, self.amqp_url, self.run_id, self.stop_event = plan, amqp_url, run_id, stop
        self.published: dict[str, float] = {}
        self.errors = 0
        self.started_at = 0.0
        self.started = threading.Event()
        self.finished = threading.Event()

    def run(self) -> None:
        from email_worker.publisher import Publisher, PublishError

        with Publisher(self.amqp_url, queue=QUEUE, app_id="emailqueue-demo") as publisher:
            self.started_at = time.time()
            origin = time.monotonic()
            self.started.set()
            seq = 0
            try:
                while not self.stop_event.is_set():
                    elapsed = time.monotonic() - origin
                    due = math.floor(self.plan.published_by(elapsed) + 1e-9)
                    while seq < due and not self.stop_event.is_set():
                        job_id = f"{self.run_id}-{seq:06d}"
                        at = time.time()
                        try:
                            publisher.publish({"id": job_id, "to": f"user{seq % 997}@example.org",
                                               "from": "Demo <demo@emailqueue.dev>",
                                               "subject": f"surge #{seq}", "text": "hello from the surge\n"})
                        except PublishError:
                            self.errors += 1
                            self.stop_event.wait(0.5)
                            continue
                        self.published[job_id] = at
                        seq += 1
                    if elapsed >= self.plan.duration_seconds:
                        break
                    self.stop_event.wait(0.02)
            finally:
                self.finished.set()


def _deliveries(smtp: SmtpControl) -> list[tuple[str, float]]:
    receipts = []
    for message in smtp.messages():
        job_id = job_id_from_message_id(message.get("message_id", ""))
        if job_id is not None:
            receipts.append((job_id, float(message["received_at"])))
    return receipts


def run_surge(stack: DemoStack, on_sample: Callable[[Sample, str], None] | None = None,
              settle_timeout: float = 180.0, stop: threading.Event | None = None) -> SurgeRun:
    """Publish the plan's surge, sample every second, then wait for the drain and the return to min.

    `on_sample(sample, phase)` is called once a second (the live view). `stop` set by a
    signal handler ends the run early (the result is marked interrupted).
    """
    plan, kubelet, smtp = stack.plan, stack.kubelet, stack.smtp
    assert kubelet is not None and smtp is not None
    stop = stop or threading.Event()
    publisher = _SurgePublisher(plan, stack.amqp_url, stack.run_id, stop)
    publisher.start()
    publisher.started.wait(30)
    origin = time.monotonic()
    samples: list[Sample] = []
    deadline: float | None = None
    drained = settled = False
    alert_states: dict[str, str] = {}
    while not stop.is_set():
        t = time.monotonic() - origin
        stack.sync_scrape_targets()
        if stack.prometheus is not None:
            now_states = stack.firing_alerts()
            for name in sorted(set(now_states) | set(alert_states)):
                if now_states.get(name) != alert_states.get(name):
                    stack.say(f"t={t:6.1f}s alert {name}: {now_states.get(name, 'resolved')}")
            alert_states = now_states
        ready_msgs, unacked = stack.queue_depth()
        status = stack.emailqueue_status()
        try:
            received = smtp.count()
        except OSError:
            received = samples[-1].received if samples else 0
        sample = Sample(t=round(t, 2), published=len(publisher.published), received=received,
                        backlog_ready=ready_msgs, backlog_unacked=unacked, desired=stack.desired_replicas(),
                        pods=sum(1 for p in kubelet.pods() if p.phase != "terminating"), ready=kubelet.ready(),
                        reason=str((status.get("lastDecision") or {}).get("reason", "")))
        samples.append(sample)
        publishing = not publisher.finished.is_set()
        if publishing:
            phase = "surge" if plan.surge_start <= t < plan.surge_end else "base rate"
        else:
            deadline = deadline or time.monotonic() + settle_timeout
            drained = drained or (sample.backlog == 0 and received >= sample.published)
            settled = sample.desired == plan.min_replicas and sample.ready == plan.min_replicas \
                and sample.pods == plan.min_replicas
            phase = "draining" if not drained else "settling" if not settled else "done"
        if on_sample is not None:
            on_sample(sample, phase)
        if not publishing and ((drained and settled) or time.monotonic() > deadline):  # type: ignore[operator]
            break
        stop.wait(max(0.0, 1.0 - (time.monotonic() - origin - t)))
    interrupted = stop.is_set()
    stop.set()
    publisher.join(10)
    receipts = tuple(_deliveries(smtp))
    seen = {job_id for job_id, _ in receipts}
    all_seen = all(job_id in seen for job_id in publisher.published)
    spans: tuple[AlertSpan, ...] | None = None
    dashboard: tuple[Mapping[str, Any], ...] | None = None
    if stack.prometheus is not None:
        time.sleep(2 * stack.prometheus.scrape_seconds)  # the last scrape and rule evaluation
        end = time.time()
        spans = tuple(stack.prometheus.timeline(publisher.started_at, end, origin=publisher.started_at))
        dashboard = tuple(check_dashboard(stack.prometheus, publisher.started_at, end, stack.dashboard_variables()))
    return SurgeRun(plan=plan, started_at=publisher.started_at, published=dict(publisher.published),
                    receipts=receipts, samples=tuple(samples), scale_events=tuple(stack.scale_events(publisher.started_at)),
                    kubelet_events=tuple(kubelet.events), drained=all_seen, settled=settled,
                    publish_errors=publisher.errors, interrupted=interrupted, alert_spans=spans, dashboard=dashboard,
                    annotations=dict(stack.rendered_annotations) if stack.prometheus is not None else None)


# =========================================================================== the second fault (I/O)
def run_smtp_storm(stack: DemoStack, stop: threading.Event | None = None,
                   say: Callable[[str], None] = print) -> dict[str, Any]:
    """The demo's second scripted fault, after the surge: the SMTP server answers 451 to every
    email (a provider in trouble) while mail keeps arriving at the base rate, and one malformed
    job is published. Ends when EmailSMTPErrorRatioHigh fires (or a timeout); then every email
    of the phase must still be delivered (4xx are retried). Returns the report block."""
    from email_worker.publisher import Publisher, PublishError

    from .alerting import SMTP_ERRORS, runbook_section
    from .prometheus import parse_duration

    prom, smtp, plan = stack.prometheus, stack.smtp, stack.plan
    assert prom is not None and smtp is not None
    stop = stop or threading.Event()
    rule = next(r for g in prom.rules["groups"] for r in g["rules"] if r.get("alert") == SMTP_ERRORS)
    hold = parse_duration(str(rule.get("for", "0s")))
    timeout = hold + 60.0
    published: dict[str, float] = {}
    origin_wall = time.time()
    smtp.set_fault(451, "4.3.0 injected storm: try again later", seconds=timeout)
    say(f"fault: SMTP answers 451 to every email until {SMTP_ERRORS} fires (rule for: {rule.get('for')})")
    fired_at: float | None = None
    interval = 1.0 / max(plan.base_rate, 0.5)
    with Publisher(stack.amqp_url, queue=QUEUE, app_id="emailqueue-demo") as publisher:
        publisher.publish_raw(b"{not json", None)  # dead-lettered as invalid: EmailDeadLetterGrowing
        seq = 0
        deadline = time.monotonic() + timeout
        next_check = time.monotonic()
        while not stop.is_set() and fired_at is None and time.monotonic() < deadline:
            job_id = f"{stack.run_id}-storm-{seq:05d}"
            try:
                publisher.publish({"id": job_id, "to": f"storm{seq}@example.org", "from": "Demo <demo@emailqueue.dev>",
                                   "subject": f"storm #{seq}", "text": "sent through an SMTP 4xx storm\n"})
                published[job_id] = time.time()
                seq += 1
            except PublishError:
                pass
            stack.sync_scrape_targets()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 1.0
                if stack.firing_alerts().get(SMTP_ERRORS) == "firing":
                    fired_at = time.time()
            stop.wait(interval)
    ended_at = time.time()
    smtp.clear_faults()
    say("fault: ended; waiting for the retried emails")
    delivered: set[str] = set()
    wait_until = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < wait_until:
        delivered = {job for job, _ in _deliveries(smtp) if job in published}
        if len(delivered) == len(published):
            break
        stack.sync_scrape_targets()
        stop.wait(2)
    time.sleep(2 * prom.scrape_seconds)
    spans = prom.timeline(origin_wall, time.time(), origin=origin_wall)
    span = next((x for x in spans if x.alertname == SMTP_ERRORS), None)
    url = span.runbook_url if span else next(
        (r.get("annotations", {}).get("runbook_url", "") for g in prom.shipped_rules["groups"] for r in g["rules"]
         if r.get("alert") == SMTP_ERRORS), "")
    from .alerting import RUNBOOK

    return {
        "fault": "smtp-4xx-storm", "code": 451, "seconds": round(ended_at - origin_wall, 1),
        "alert": SMTP_ERRORS, "rule_for": rule.get("for"),
        "pending_at": span.as_dict()["pending_at"] if span else None,
        "firing_at": span.as_dict()["firing_at"] if span else None,
        "runbook_url": url, "runbook_section": runbook_section(url, RUNBOOK.read_text()),
        "published": len(published), "delivered": len(delivered), "lost": len(published) - len(delivered),
        "alerts": [x.as_dict() for x in spans],
    }


# =========================================================================== outputs
def write_report(report: Mapping[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def plot(run: SurgeRun, path: Path, simulated_series: Mapping[str, Any] | None = None) -> Path:
    """Backlog, replicas desired/ready and arrival/send rates over time (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = run.samples
    t = [s.t for s in samples]
    fig, (ax_backlog, ax_replicas, ax_rates) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax_backlog.plot(t, [s.backlog if s.backlog is not None else float("nan") for s in samples], label="live")
    sim = simulated_series or {}
    if sim.get("t"):
        ax_backlog.plot(sim["t"], sim["backlog"], "--", alpha=0.7, label="simulated (ours)")
    ax_backlog.set_ylabel("backlog (ready + unacked)")
    ax_backlog.legend(loc="upper right")
    ax_replicas.step(t, [s.desired if s.desired is not None else float("nan") for s in samples], where="post",
                     label="desired (spec.replicas)")
    ax_replicas.step(t, [s.ready for s in samples], where="post", label="ready")
    if sim.get("t"):
        ax_replicas.step(sim["t"], sim["replicas"], "--", where="post", alpha=0.6, label="simulated desired")
    ax_replicas.axhline(run.plan.peak_replicas_needed, color="grey", lw=0.8, ls=":", label="needed at the peak")
    ax_replicas.set_ylabel("replicas")
    ax_replicas.legend(loc="upper right")
    ax_rates.plot(t, [run.plan.rate_at(x) for x in t], color="grey", lw=0.8, ls=":", label="planned arrival")
    ax_rates.plot(t, _rate([s.published for s in samples], t), label="arrival (published/s)")
    ax_rates.plot(t, _rate([s.received for s in samples], t), label="sent (SMTP receipts/s)")
    ax_rates.set_ylabel("emails/s (5 s window)")
    ax_rates.set_xlabel("seconds since the replay started")
    ax_rates.legend(loc="upper right")
    marks = alert_marks(run)
    for ax in (ax_backlog, ax_replicas, ax_rates):
        ax.axvspan(run.plan.surge_start, run.plan.surge_end, color="orange", alpha=0.08)
        for at, label, color in marks:
            ax.axvline(at, color=color, lw=1.0, ls="--", label=label if ax is ax_backlog else None)
        ax.grid(alpha=0.3)
    if marks:
        ax_backlog.legend(loc="upper right")
    fig.suptitle(f"{run.plan.name}: live closed loop (operator + workers + RabbitMQ + SMTP)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def alert_marks(run: SurgeRun) -> list[tuple[float, str, str]]:
    """Vertical lines for the plot: each alert going firing, and the first email older than the SLO."""
    if run.alert_spans is None:
        return []
    marks = [(span.firing_at, f"{span.alertname} firing", "red" if span.severity == "critical" else "purple")
             for span in run.alert_spans if span.firing_at is not None]
    first_seen: dict[str, float] = {}
    for job_id, at in run.receipts:
        first_seen.setdefault(job_id, at)
    end = run.started_at + (run.samples[-1].t if run.samples else 0.0)
    breach = first_slo_breach(run.published, first_seen, run.plan.drain_seconds, end)
    if breach is not None:
        marks.append((breach - run.started_at, "first email older than the SLO", "black"))
    return marks


def _rate(counts: Sequence[int], t: Sequence[float], window: float = 5.0) -> list[float]:
    """Per-second rate of a cumulative count over a trailing window."""
    rates: list[float] = []
    lo = 0
    for i, now in enumerate(t):
        while t[lo] < now - window:
            lo += 1
        span = now - t[lo]
        rates.append((counts[i] - counts[lo]) / span if span > 0 else 0.0)
    return rates


# =========================================================================== live view
class _View:
    """Rich live table on a terminal, a plain line every 5 s elsewhere (CI logs)."""

    def __init__(self, plan: SurgePlan, fancy: bool) -> None:
        self.plan, self.fancy = plan, fancy
        self._live: Any = None
        self._history: list[Sample] = []
        self._last_line = -10.0
        self._events: list[str] = []

    def __enter__(self) -> "_View":
        if self.fancy:
            from rich.live import Live

            self._live = Live(self._render(None, "starting"), refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def say(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text)
        else:
            print(text, flush=True)

    def kubelet_event(self, event: KubeletEvent) -> None:
        if event.kind in ("crash", "kill"):
            self.say(f"kubelet: {event.kind} {event.pod} {event.detail}")

    def sample(self, sample: Sample, phase: str) -> None:
        self._history.append(sample)
        if self._live is not None:
            self._live.update(self._render(sample, phase))
        elif sample.t - self._last_line >= 5 or phase == "done":
            self._last_line = sample.t
            arrival, sent = self._rates()
            print(f"t={sample.t:6.1f}s {phase:9} backlog={_fmt(sample.backlog):>6} arrival={arrival:5.1f}/s "
                  f"sent={sent:5.1f}/s replicas desired={_fmt(sample.desired)} ready={sample.ready} "
                  f"pods={sample.pods} published={sample.published} received={sample.received}", flush=True)

    def _rates(self) -> tuple[float, float]:
        history = self._history[-6:]
        t = [s.t for s in history]
        if len(t) < 2:
            return 0.0, 0.0
        return (_rate([s.published for s in history], t, 5.0)[-1], _rate([s.received for s in history], t, 5.0)[-1])

    def _render(self, sample: Sample | None, phase: str) -> Any:
        from rich.table import Table

        table = Table(title=f"[bold]{self.plan.name}[/] — live closed loop", show_header=False, min_width=64)
        table.add_column(style="cyan", no_wrap=True)
        table.add_column()
        if sample is None:
            table.add_row("phase", phase)
            return table
        arrival, sent = self._rates()
        need = math.ceil(arrival / self.plan.rate_per_replica) if arrival else 0
        bar = "█" * min(60, (sample.backlog or 0) // 10)
        table.add_row("elapsed", f"{sample.t:.0f} s of {self.plan.duration_seconds:g} s  ({phase})")
        table.add_row("planned arrival", f"{self.plan.rate_at(sample.t):g} emails/s")
        table.add_row("arrival / sent", f"{arrival:.1f} / {sent:.1f} emails/s  (~{need} workers needed)")
        table.add_row("backlog", f"{_fmt(sample.backlog)} (ready {_fmt(sample.backlog_ready)}, unacked "
                                 f"{_fmt(sample.backlog_unacked)}) {bar}")
        table.add_row("replicas", f"desired {_fmt(sample.desired)} · pods {sample.pods} · ready {sample.ready}  "
                                  f"[min {self.plan.min_replicas}, max {self.plan.max_replicas}]")
        table.add_row("published / received", f"{sample.published} / {sample.received}")
        table.add_row("last decision", sample.reason[:110] or "-")
        return table


def _fmt(value: int | None) -> str:
    return "?" if value is None else str(value)


def print_summary(report: Mapping[str, Any], say: Callable[[str], None]) -> None:
    tiq, sim = report["time_in_queue_seconds"], report.get("simulated") or {}
    sim_tiq = sim.get("time_in_queue_seconds") or {}
    rows = [
        ("published", report["published"], sim.get("published")),
        ("delivered (unique)", report["delivered"], sim.get("delivered")),
        ("lost", report["lost"] if report["lost"] is not None else "- (interrupted)", None),
        ("duplicates", report["duplicates"], None),
        ("peak backlog", report["peak_backlog"], sim.get("peak_backlog")),
        ("p50 time in queue s", tiq["p50"], sim_tiq.get("p50")),
        ("p99 time in queue s", tiq["p99"], sim_tiq.get("p99")),
        ("max time in queue s", tiq["max"], sim_tiq.get("max")),
        ("time to drain s", report["time_to_drain_seconds"], sim.get("time_to_drain_seconds")),
        ("replica-seconds", report["replica_seconds"], sim.get("replica_seconds")),
        ("peak replicas", report["peak_replicas_desired"], sim.get("peak_replicas")),
    ]
    say(f"{'':22} {'live':>10} {'simulated':>10}")
    for label, live, model in rows:
        say(f"{label:22} {_num(live):>10} {_num(model):>10}")
    say(f"scale events: {len(report['scale_events'])}; back at min: {report['returned_to_min']}")
    alerting = report.get("alerting")
    if alerting:
        say(f"alerts (t = seconds since the replay started; surge at t={alerting['surge_start']:g}):")
        for span in alerting["alerts"]:
            say(f"  {span['alertname']:32} {span['severity']:8} pending {_num(span['pending_at']):>7} "
                f"firing {_num(span['firing_at']):>7} resolved {_num(span['resolved_at']):>7}")
        breach = alerting["first_slo_breach_at"]
        say(f"congestion alert firing at t={_num(alerting['congestion_firing_at'])}; first email older than the "
            f"SLO at t={_num(breach) if breach is not None else 'never'}; warning gained: "
            f"{_num(alerting['warning_seconds'])} s; false critical alerts in steady phases: "
            f"{len(alerting['false_critical'])}")
        if alerting.get("static_fleet_first_slo_breach_at") is not None:
            say(f"the incident's fixed fleet (simulated, same plan) breaches the SLO at "
                f"t={_num(alerting['static_fleet_first_slo_breach_at'])}: "
                f"{_num(alerting['warning_vs_static_fleet_seconds'])} s of warning")
    dashboard = report.get("dashboard")
    if dashboard:
        say(f"dashboard: {dashboard['queries'] - len(dashboard['without_data'])}/{dashboard['queries']} panel "
            f"queries returned data" + (f"; none from {', '.join(dashboard['without_data'])}"
                                        if dashboard["without_data"] else ""))
    storm = report.get("second_fault")
    if storm:
        say(f"second fault ({storm['fault']}): {storm['alert']} firing at +{_num(storm['firing_at'])} s; runbook: "
            f"{storm['runbook_section'] or 'MISSING SECTION'}; lost {storm['lost']} of {storm['published']}")


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


# =========================================================================== CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emailqueue_testbed.demo",
                                     description="Replay the 2023-09-20 surge live on the test bed.")
    parser.add_argument("--quick", action="store_true", help="a ~3 minute version (shorter, smaller surge)")
    parser.add_argument("--preset", choices=["full", "quick", "e2e"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo", help="report folder (default out/demo)")
    parser.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    args = parser.parse_args(argv)
    plan = preset(args.preset or ("quick" if args.quick else "full"))
    out_dir: Path = args.out
    stop = threading.Event()
    interrupted = threading.Event()  # `stop` also ends the surge's publisher; this one only says Ctrl-C

    def on_signal(signum: int, _frame: Any) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt  # second signal: stop waiting, clean up now
        interrupted.set()
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    view = _View(plan, fancy=sys.stdout.isatty() and not args.plain)
    for line in plan.describe():
        print(line, flush=True)
    before = bed.status()
    needed = ("kube", "rabbitmq")
    print("test bed: starting " + (", ".join(n for n in needed if not before[n]) or "nothing (already running)"),
          flush=True)
    started_components = tuple(n for n in needed if not before[n])
    try:
        env = bed.up(needed)
        if stop.is_set():
            return 130
        simulated, sim_series = simulate(plan)
        with DemoStack(plan, Endpoints.from_env(env), out_dir, say=print, prometheus=True) as stack:
            print(f"namespace {stack.namespace}, vhost {stack.vhost}; operator metrics on "
                  f":{stack.operator_metrics_port}; logs in {out_dir}", flush=True)
            with view:
                stack.say = view.say
                assert stack.kubelet is not None
                stack.kubelet.on_event = view.kubelet_event
                run = run_surge(stack, on_sample=view.sample, stop=stop)
            stack.say = print
            storm = None if interrupted.is_set() else run_smtp_storm(stack, interrupted)
            print("cleaning up (operator, workers, namespace, vhost)...", flush=True)
        report = summarize(run, simulated)
        if storm is not None:
            report["second_fault"] = storm
        path = write_report(report, out_dir)
        png = plot(run, out_dir / "surge.png", sim_series)
        print_summary(report, print)
        print(f"report: {path}\nplot:   {png}", flush=True)
        if run.interrupted:
            print("interrupted: the report covers the part that ran", flush=True)
            return 130
        return 0 if report["lost"] == 0 and run.drained and run.settled else 1
    except KeyboardInterrupt:
        print("interrupted; cleaned up", flush=True)
        return 130
    finally:
        if started_components:
            bed.down(started_components)
            bed.write_env()  # down() drops .testbed/env; components we did not start may still run
            print(f"test bed: stopped {', '.join(started_components)} (this demo started them)", flush=True)


__all__ = ["SurgePlan", "compress", "preset", "Sample", "ScaleEvent", "SurgeRun", "summarize", "simulate",
           "time_to_drain", "percentile", "job_id_from_message_id", "Endpoints", "DemoStack", "run_surge",
           "write_report", "plot", "print_summary", "main"]

if __name__ == "__main__":
    sys.exit(main())
