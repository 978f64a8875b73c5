"""A Prometheus server for the test bed: the shipped alert rules and dashboard, evaluated live.

Built from the same pinned module as promtool (`testbed/build-bins.sh prometheus`). One server
per run (`PrometheusServer`), on loopback, with a data directory of its own, scraping what
the chart's ServiceMonitors would: the operator as job `emailqueue-operator` (honorLabels:
its series carry the EmailQueue's namespace), the workers as job = their Deployment's name
with the pod's namespace (targets from a file_sd file the caller keeps current: pods come
and go), and RabbitMQ's Prometheus plugin as job `rabbitmq`.

The module owns, from pure to I/O:
- `compress_rules`: the shipped rules file with its `for:` and range windows scaled by a
  run's time compression (a demo that plays 45 minutes in 3 cannot wait `for: 3m`);
- `alert_timeline`: when each alert went pending, firing and resolved, from `ALERTS` samples;
- `panel_queries`: every PromQL target of a Grafana dashboard, its template variables
  substituted (`$__rate_interval` included), ready to be evaluated;
- `PrometheusServer`: config, process, and the HTTP API (`query`, `query_range`).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import state

REPO = state.REPO
RULES_FILE = REPO / "deploy" / "monitoring" / "rules" / "emailqueue.rules.yaml"
DASHBOARD_FILE = REPO / "deploy" / "monitoring" / "dashboards" / "emailqueue-overview.json"
OPERATOR_JOB = "emailqueue-operator"
RABBITMQ_JOB = "rabbitmq"
COMPONENT_PREFIX = "prometheus-"  # .testbed/prometheus-<port>.json


def down_all() -> list[str]:
    """Stop every Prometheus a run started and did not stop (killed tests, Ctrl-C twice)."""
    stopped = []
    for path in sorted(state.STATE_DIR.glob(f"{COMPONENT_PREFIX}*.json")):
        if state.stop(path.stem):
            stopped.append(path.stem)
    return stopped

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
# A range selector `[5m]` or a subquery `[5m:1m]` (both parts are scaled).
_RANGE = re.compile(r"\[(\d[0-9smhdwy.]*)(?::(\d[0-9smhdwy.]*))?\]")


# =========================================================================== rules (pure)
def parse_duration(text: str) -> float:
    """A Prometheus duration ("90s", "1h30m", "500ms") in seconds."""
    text = text.strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """Seconds as a Prometheus duration, to the millisecond ("12s", "7500ms")."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def compress_rules(rules: Mapping[str, Any], factor: float, min_range_seconds: float) -> dict[str, Any]:
    """The rules with every `for:` and range window multiplied by `factor` (a run's time compression).

    Range windows never go below `min_range_seconds` (a rate needs a few scrapes in its window:
    Grafana's `$__rate_interval` uses four scrape intervals for the same reason). Everything
    else — expressions, thresholds, labels, annotations — is left as shipped.
    """
    if not 0 < factor <= 1:
        raise ValueError(f"compression factor must be in (0, 1], got {factor}")

    def window(match: re.Match[str]) -> str:
        rng = format_duration(max(parse_duration(match.group(1)) * factor, min_range_seconds))
        if match.group(2) is None:
            return f"[{rng}]"
        step = format_duration(max(parse_duration(match.group(2)) * factor, 0.001))
        return f"[{rng}:{step}]"

    groups = []
    for group in rules.get("groups") or []:
        new_rules = []
        for rule in group.get("rules") or []:
            rule = dict(rule)
            rule["expr"] = _RANGE.sub(window, str(rule["expr"]))
            if "for" in rule:
                rule["for"] = format_duration(parse_duration(str(rule["for"])) * factor)
            new_rules.append(rule)
        group = dict(group, rules=new_rules)
        if "interval" in group:
            group["interval"] = format_duration(parse_duration(str(group["interval"])) * factor)
        groups.append(group)
    return {"groups": groups}


# =========================================================================== alert timeline (pure)
@dataclass(frozen=True)
class AlertSpan:
    """One alert instance's life: seconds on the caller's clock (None: did not happen in the range)."""

    alertname: str
    severity: str
    labels: Mapping[str, str]
    pending_at: float | None
    firing_at: float | None
    resolved_at: float | None
    runbook_url: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"alertname": self.alertname, "severity": self.severity, "labels": dict(self.labels),
                "pending_at": _r(self.pending_at), "firing_at": _r(self.firing_at),
                "resolved_at": _r(self.resolved_at), "runbook_url": self.runbook_url}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def alert_timeline(series: Sequence[Mapping[str, Any]], origin: float, step: float, end: float,
                   runbooks: Mapping[str, str] | None = None) -> list[AlertSpan]:
    """Spans from a `query_range` of `ALERTS` (matrix result) ending at `end`, times relative to `origin`.

    An `ALERTS` sample exists while the alert is pending or firing (label `alertstate`); a
    gap longer than two steps ends a span (the alert resolved, or went back to inactive), and
    so does the range ending more than two steps after the last sample. One span per instance
    and activation, in order of first activity.
    """
    # (alertname, labels without alertstate) -> {"pending": [t...], "firing": [t...]}
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, list[float]]] = {}
    for s in series:
        labels = dict(s.get("metric") or {})
        alertstate = labels.pop("alertstate", "firing")
        labels.pop("__name__", None)
        key = (labels.get("alertname", ""), tuple(sorted(labels.items())))
        times = samples.setdefault(key, {"pending": [], "firing": []}).setdefault(alertstate, [])
        times.extend(float(t) for t, _ in s.get("values") or [])
    spans: list[AlertSpan] = []
    for (name, items), states in samples.items():
        labels = dict(items)
        marks = sorted([(t, "pending") for t in states.get("pending", [])]
                       + [(t, "firing") for t in states.get("firing", [])])
        current: dict[str, float | None] | None = None
        last = -math.inf
        for t, alertstate in marks:
            if current is not None and t - last > 2 * step + 1e-6:
                current["resolved"] = last + step
                spans.append(_span(name, labels, current, origin, runbooks))
                current = None
            if current is None:
                current = {"pending": None, "firing": None, "resolved": None}
            if current[alertstate] is None:
                current[alertstate] = t
            last = t
        if current is not None:
            if end - last > 2 * step + 1e-6:
                current["resolved"] = last + step
            spans.append(_span(name, labels, current, origin, runbooks))
    return sorted(spans, key=lambda s: min(x for x in (s.pending_at, s.firing_at, math.inf) if x is not None))


def _span(name: str, labels: Mapping[str, str], marks: Mapping[str, float | None], origin: float,
          runbooks: Mapping[str, str] | None) -> AlertSpan:
    def rel(key: str) -> float | None:
        value = marks[key]
        return None if value is None else value - origin
    shown = {k: v for k, v in labels.items() if k not in ("alertname", "severity")}
    return AlertSpan(name, labels.get("severity", ""), shown, rel("pending"), rel("firing"), rel("resolved"),
                     (runbooks or {}).get(name, ""))


def runbook_urls(rules: Mapping[str, Any]) -> dict[str, str]:
    """alertname -> runbook_url annotation of the rules file."""
    return {rule["alert"]: (rule.get("annotations") or {}).get("runbook_url", "")
            for group in rules.get("groups") or [] for rule in group.get("rules") or [] if "alert" in rule}


# =========================================================================== dashboard (pure)
@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str


def panel_queries(dashboard: Mapping[str, Any], variables: Mapping[str, str],
                  rate_interval: str) -> list[PanelQuery]:
    """Every Prometheus target of every panel (rows included), variables substituted.

    `variables` maps a template variable's name to the value a user would pick (regex
    matchers take `.*` for All); `$__rate_interval` becomes `rate_interval`. A variable the
    dashboard uses but `variables` does not give is an error, not a silent `$name` in PromQL.
    """
    def walk(panels: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels") or [])

    values = {**variables, "__rate_interval": rate_interval}
    names = sorted(values, key=len, reverse=True)
    pattern = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(" + "|".join(re.escape(n) for n in names) + r")\b|\$(\w+)")

    def substitute(expr: str, where: str) -> str:
        def one(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2) or match.group(3)
            if name not in values:
                raise ValueError(f"{where}: template variable ${name} has no value")
            return values[name]
        return pattern.sub(one, expr)

    queries = []
    for panel in walk(dashboard.get("panels") or []):
        for target in panel.get("targets") or []:
            expr = target.get("expr")
            if not expr or target.get("hide"):
                continue
            title = str(panel.get("title") or panel.get("id"))
            ref = str(target.get("refId") or "")
            queries.append(PanelQuery(title, ref, substitute(expr, f"panel {title!r} {ref}")))
    return queries


# =========================================================================== the server (I/O)
class PrometheusError(RuntimeError):
    """The test bed's Prometheus could not be started or answered with an error."""


class PrometheusServer:
    """One Prometheus process on loopback, its config and rules written into `workdir`."""

    def __init__(self, workdir: Path, *, operator_target: str, operator_namespace: str,
                 worker_job: str, rabbitmq_target: str | None = None, time_factor: float = 1.0,
                 scrape_seconds: float = 1.0, rules: Mapping[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.port = state.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.worker_job = worker_job
        self.targets_file = workdir / "workers.json"
        self.scrape_seconds = scrape_seconds
        self.shipped_rules = dict(rules) if rules is not None else yaml.safe_load(RULES_FILE.read_text())
        self.rules = compress_rules(self.shipped_rules, time_factor, min_range_seconds=4 * scrape_seconds) \
            if time_factor != 1.0 else self.shipped_rules
        scrape = format_duration(scrape_seconds)
        jobs: list[dict[str, Any]] = [
            # As the ServiceMonitor gives them: job from the Service's app.kubernetes.io/name,
            # honorLabels so the operator's own {namespace, name} labels are kept.
            {"job_name": OPERATOR_JOB, "honor_labels": True, "static_configs": [
                {"targets": [operator_target], "labels": {"namespace": operator_namespace}}]},
            {"job_name": worker_job,
             "file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": "1s"}]},
        ]
        if rabbitmq_target:
            jobs.append({"job_name": RABBITMQ_JOB, "static_configs": [{"targets": [rabbitmq_target]}]})
        self.config = {
            "global": {"scrape_interval": scrape, "scrape_timeout": scrape, "evaluation_interval": scrape},
            "rule_files": [str(workdir / "rules.yaml")],
            "scrape_configs": jobs,
        }
        self.pid: int | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        binary = state.binary("prometheus")
        data = self.workdir / "data"
        shutil.rmtree(data, ignore_errors=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "rules.yaml").write_text(yaml.safe_dump(self.rules, sort_keys=False))
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.set_worker_targets({}, "")
        log = self.workdir / "prometheus.log"
        self.pid = state.spawn([binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                                f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{self.port}",
                                "--storage.tsdb.retention.time=1d", "--log.level=warn"], log)
        # Recorded like the test bed's components: `make testbed-down` stops one a killed run left.
        state.save(state.Record(self.component, (self.pid,), {"url": self.url, "workdir": str(self.workdir)}))

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    return resp.status == 200
            except (OSError, urllib.error.URLError):
                return False

        state.wait_until(ready, timeout, "the test bed's Prometheus", log=log)

    @property
    def component(self) -> str:
        return f"{COMPONENT_PREFIX}{self.port}"

    def stop(self) -> None:
        if self.pid is not None:
            state.stop(self.component)
            self.pid = None

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_worker_targets(self, ports: Mapping[str, int], namespace: str) -> None:
        """The workers to scrape (pod name -> metrics port), as the pods' Endpoints would list them."""
        groups = [{"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": namespace, "pod": pod}}
                  for pod, port in sorted(ports.items())]
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.targets_file)  # file_sd must never read a half-written file

    # -- API ----------------------------------------------------------------------------------------
    def _get(self, path: str, params: Mapping[str, Any]) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise PrometheusError(f"{path} {dict(params)}: HTTP {exc.code}: {detail}") from exc
        except (OSError, urllib.error.URLError, ValueError) as exc:
            raise PrometheusError(f"{path}: {type(exc).__name__}: {exc}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {dict(params)}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return list(self._get("/api/v1/query", params)["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                       "step": format_duration(step)})["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing) with their labels and rendered annotations."""
        return list(self._get("/api/v1/alerts", {})["alerts"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets", {"state": "active"})["activeTargets"])

    def timeline(self, start: float, end: float, origin: float) -> list[AlertSpan]:
        """Every alert's pending/firing/resolved times in [start, end], relative to `origin`."""
        step = self.scrape_seconds
        series = self.query_range("ALERTS", start, end, step)
        return alert_timeline(series, origin, step, end, runbook_urls(self.shipped_rules))


def has_data(result: Sequence[Mapping[str, Any]]) -> bool:
    """A query_range result with at least one finite value (NaN/Inf alone: the panel shows nothing)."""
    for series in result:
        for _, value in series.get("values") or []:
            if math.isfinite(float(value)):
                return True
    return False


__all__ = ["PrometheusServer", "PrometheusError", "AlertSpan", "PanelQuery", "compress_rules", "alert_timeline",
           "panel_queries", "runbook_urls", "parse_duration", "format_duration", "has_data",
           "DASHBOARD_FILE", "RULES_FILE", "OPERATOR_JOB", "RABBITMQ_JOB"]
