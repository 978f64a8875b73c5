"""What the demo proves about alerting: the alert timeline against the surge, and the dashboard.

Pure (values in, values out):
- `first_slo_breach`: the first moment an email had waited longer than the SLO;
- `alert_report`: the alert timeline next to the surge onset, the first SLO breach and the end
  of the backlog — seconds of warning the congestion alert gave, and any critical alert that
  fired while the system was healthy (before the surge, after the backlog was gone);
- `runbook_section`: the runbook heading an alert's `runbook_url` points at.

I/O (against the test bed's `PrometheusServer`):
- `check_dashboard`: every panel query of the shipped dashboard over a time range;
- `smtp_storm`: the demo's second scripted fault (an SMTP 4xx storm) and the alert it raises.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import state

if TYPE_CHECKING:
    from .prometheus import AlertSpan, PrometheusServer

RUNBOOK = state.REPO / "docs" / "runbook.md"
CONGESTION = "EmailQueueCongestion"
SMTP_ERRORS = "EmailSMTPErrorRatioHigh"


# =========================================================================== pure
def first_slo_breach(published: Mapping[str, float], first_seen: Mapping[str, float], slo: float,
                     end: float) -> float | None:
    """Wall-clock moment the first email had waited `slo` seconds without being sent.

    An email published at p and first received at r breached at p + slo when r - p > slo; one
    never received by `end` breached at p + slo if that is before `end`. None: no breach.
    """
    breaches = [p + slo for job, p in published.items()
                if (first_seen.get(job, end) - p) > slo]
    return min(breaches, default=None)


def first_breach_in_series(t: Sequence[float], arrival_rate: Sequence[float], backlog: Sequence[float],
                           slo: float) -> float | None:
    """First moment an email waited `slo` seconds, from a FIFO queue's sampled series (the simulator's).

    Arrivals A(t) are the integral of the arrival rate, departures D(t) = A(t) − backlog(t); the
    next email after a is gone once D reaches A(a) + 1: a breach at a + slo when D(a + slo) < A(a) + 1.
    """
    if not t:
        return None
    arrived = [0.0]
    for i in range(1, len(t)):
        arrived.append(arrived[-1] + arrival_rate[i - 1] * (t[i] - t[i - 1]))
    departed = [a - b for a, b in zip(arrived, backlog, strict=True)]
    j = 0
    for i, start in enumerate(t):
        while j < len(t) - 1 and t[j] < start + slo:
            j += 1
        if t[j] < start + slo:
            return None  # the series ends before this email's deadline
        # The next email after a is number A(a) + 1 (in a fluid series: at most one step's arrivals).
        nxt = arrived[i] + min(1.0, arrived[i + 1] - arrived[i] if i + 1 < len(t) else 0.0)
        if arrival_rate[i] > 0 and departed[j] + 1e-6 < nxt:
            return start + slo
    return None


def alert_report(spans: Sequence[AlertSpan], *, surge_start: float, surge_end: float, slo: float,
                 first_breach: float | None, backlog_end: float | None, run_end: float,
                 settle_seconds: float) -> dict[str, Any]:
    """The alert timeline of one surge run (every time in seconds since publishing started).

    Healthy steady phases: before the surge starts, and from `settle_seconds` after the backlog
    is gone (what the operator's rates and the rules' windows need to forget the surge) to the
    end. A critical alert that goes firing there is a false alarm.
    """
    congestion = next((s for s in spans if s.alertname == CONGESTION and s.firing_at is not None), None)
    fired_at = congestion.firing_at if congestion else None
    steady = [(0.0, surge_start)]
    if backlog_end is not None:
        steady.append((backlog_end + settle_seconds, run_end))
    false_critical = [s.as_dict() for s in spans if s.severity == "critical" and s.firing_at is not None
                      and any(lo <= s.firing_at < hi for lo, hi in steady)]
    still_firing = [s.alertname for s in spans if s.firing_at is not None and s.resolved_at is None]
    warning = None if fired_at is None or first_breach is None else round(first_breach - fired_at, 1)
    return {
        "surge_start": surge_start, "surge_end": surge_end, "slo_seconds": slo,
        "congestion_pending_at": _r(next((s.pending_at for s in spans if s.alertname == CONGESTION
                                          and s.pending_at is not None), None)),
        "congestion_firing_at": _r(fired_at),
        "congestion_after_onset_seconds": None if fired_at is None else round(fired_at - surge_start, 1),
        "first_slo_breach_at": _r(first_breach),
        # Seconds between the congestion alert firing and the first email older than the SLO
        # (None when no email breached it: the warning came with no breach to follow).
        "warning_seconds": warning,
        "fired_before_breach": None if fired_at is None else (first_breach is None or fired_at < first_breach),
        "backlog_end_at": _r(backlog_end),
        "steady_phases": [[_r(lo), _r(hi)] for lo, hi in steady],
        "false_critical": false_critical,
        "still_firing_at_end": still_firing,
        "alerts": [s.as_dict() for s in spans],
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_section(url: str, runbook_text: str) -> str | None:
    """The heading of `docs/runbook.md` that a runbook_url's #anchor names (None: no such section)."""
    if "#" not in url:
        return None
    anchor = url.rsplit("#", 1)[1]
    for line in runbook_text.splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match and _anchor(match.group(1)) == anchor:
            return match.group(1).strip()
    return None


# =========================================================================== I/O
def check_dashboard(prom: PrometheusServer, start: float, end: float, variables: Mapping[str, str],
                    step: float = 1.0) -> list[dict[str, Any]]:
    """Every panel query of the shipped dashboard over [start, end]: series returned, data or not."""
    import json

    from .prometheus import DASHBOARD_FILE, has_data, panel_queries

    dashboard = json.loads(DASHBOARD_FILE.read_text())
    # Grafana's $__rate_interval: max(step + scrape interval, 4 × scrape interval).
    rate_interval = f"{max(step + prom.scrape_seconds, 4 * prom.scrape_seconds):g}s"
    results = []
    for q in panel_queries(dashboard, variables, rate_interval):
        try:
            result = prom.query_range(q.expr, start, end, step)
            error = None
        except Exception as exc:  # an invalid query is a finding, reported with the others
            result, error = [], str(exc)
        results.append({"panel": q.panel, "ref": q.ref, "expr": q.expr, "series": len(result),
                        "has_data": has_data(result), "error": error})
    return results


__all__ = ["first_slo_breach", "first_breach_in_series", "alert_report", "runbook_section", "check_dashboard",
           "CONGESTION", "SMTP_ERRORS", "RUNBOOK"]
