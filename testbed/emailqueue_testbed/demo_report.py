"""What one surge recorded and the report computed from it (pure, but for `simulate`, which
runs the simulator, and `write_report`).

- `Sample`, `ScaleEvent`, `SurgeRun`: the loop once a second, the EmailQueue's Events, and
  everything a run left behind;
- `summarize`: delivered / lost / duplicates, time-in-queue percentiles, peak backlog, time
  to drain, replica-seconds, scale events, alerting and dashboard blocks;
- `simulate`: the simulator's prediction for the same plan; `print_summary`: the text table;
  `write_report`: report.json.
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .alerting import alert_report, first_breach_in_series, first_slo_breach
from .demo_plan import RABBIT_STATS_TICK_SECONDS, SOURCE_SCENARIO, STEADY_AFTER_DRAIN_POLLS, SurgePlan
from .kubelet import KubeletEvent
from .prometheus import AlertSpan


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
    for prev, cur in itertools.pairwise(run.samples):
        replica_seconds += prev.pods * (cur.t - prev.t)
        ready_seconds += prev.ready * (cur.t - prev.t)
    desired = [s.desired for s in run.samples if s.desired is not None]
    changes = []
    for prev, cur in itertools.pairwise(run.samples):
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


def write_report(report: Mapping[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def trailing_rate(counts: Sequence[int], t: Sequence[float], window: float = 5.0) -> list[float]:
    """Per-second rate of a cumulative count over a trailing window."""
    rates: list[float] = []
    lo = 0
    for i, now in enumerate(t):
        while t[lo] < now - window:
            lo += 1
        span = now - t[lo]
        rates.append((counts[i] - counts[lo]) / span if span > 0 else 0.0)
    return rates


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
