"""The demo's plot: backlog, replicas and rates over time, alert and SLO-breach marks (matplotlib Agg)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .alerting import first_slo_breach
from .demo_report import SurgeRun, trailing_rate


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
    ax_rates.plot(t, trailing_rate([s.published for s in samples], t), label="arrival (published/s)")
    ax_rates.plot(t, trailing_rate([s.received for s in samples], t), label="sent (SMTP receipts/s)")
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
