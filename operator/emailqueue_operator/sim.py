"""Surge simulator front door: every policy side by side on a scenario, the acceptance
checks, the report and `emailqueue-operator simulate` (issue 4).

This module owns:

- `compare(scenario) -> dict`: every policy under every observation mode side by side,
  the bounds for each run, plus the acceptance checks (used by `make bench`);
- `acceptance(...)`: the project's acceptance figures, as checks;
- `format_table` / `print_report` / `plot`: the report, as text or a PNG;
- `run_cli_simulate(argv) -> int`: `emailqueue-operator simulate ...` (table, `--json`,
  `--plot FILE.png`).

The model itself (scenarios, observation modes, the `Policy` protocol and `simulate`) is
`sim_model.py`; the policies compared are `baselines.py`'s. Both import `sim_model`, this
module imports both, so the import graph has no cycle. The model's public names are
re-exported here: `sim` stays the one module callers of the simulator import.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .baselines import (
    CausalWaitFloor,
    arrivals_per_step,
    cost_floor,
    default_policies,
    tune_keda_queue_length,
    useful_max_replicas,
    wait_floor_applies,
)
from .sim_model import (
    DEFAULT_OBSERVATION,
    EPSILON,
    MANAGEMENT_STATS_TICK_SECONDS,
    OBSERVATION_MODES,
    SCENARIO_DIR,
    SCENARIO_VARIANTS,
    ArrivalProfile,
    BrokerSnapshot,
    Metrics,
    ObservationMode,
    Observer,
    Policy,
    Scenario,
    ScenarioError,
    Series,
    SimResult,
    SimView,
    benchmark_scenario_names,
    load_scenario,
    not_applicable,
    observation_mode,
    policy_observation,
    scenario_from_mapping,
    scenario_names,
    simulate,
    surge_end,
    weighted_percentile,
)

__all__ = [
    # the model, re-exported
    "EPSILON",
    "ScenarioError",
    "ArrivalProfile",
    "Scenario",
    "SCENARIO_DIR",
    "SCENARIO_VARIANTS",
    "scenario_names",
    "benchmark_scenario_names",
    "load_scenario",
    "scenario_from_mapping",
    "MANAGEMENT_STATS_TICK_SECONDS",
    "ObservationMode",
    "OBSERVATION_MODES",
    "DEFAULT_OBSERVATION",
    "observation_mode",
    "BrokerSnapshot",
    "SimView",
    "Observer",
    "Policy",
    "policy_observation",
    "not_applicable",
    "Series",
    "Metrics",
    "SimResult",
    "weighted_percentile",
    "surge_end",
    "simulate",
    # this module
    "acceptance",
    "compare",
    "detection_allowance",
    "format_table",
    "plot",
    "print_report",
    "run_cli_simulate",
    "run_policies",
    "scenario_summary",
    "KEDA_TARGET_SCENARIO",
    "TARGET_COST_VS_COST_FLOOR",
    "TARGET_COST_VS_COST_FLOOR_AMQP_STEADY",
    "TARGET_COST_VS_KEDA",
    "TARGET_P99_VS_KEDA",
    "TARGET_P99_VS_WAIT_FLOOR",
    "TARGET_PEAK_VS_SATURATION",
    "TARGET_SCALE_ACTIONS_PER_HOUR_AMQP_STEADY",
]


# --------------------------------------------------------------------------- comparison
# The project's acceptance figures (DESIGN "Measuring"; issues 4, 11 and 12). Ratios are
# against the bounds in `baselines` (the causal wait floor, the cost floor), which no
# policy in the model can beat, never against a reference policy.
TARGET_P99_VS_WAIT_FLOOR = 1.3
TARGET_COST_VS_COST_FLOOR = 1.15
TARGET_P99_VS_KEDA = 0.6
TARGET_COST_VS_KEDA = 0.8
KEDA_TARGET_SCENARIO = "incident-2023-09-20"
# Issue 11: blind to rates and unacked (AMQP only), a steady load must not cost much more
# than the floor nor flap.
TARGET_COST_VS_COST_FLOOR_AMQP_STEADY = 1.3
TARGET_SCALE_ACTIONS_PER_HOUR_AMQP_STEADY = 20.0
# Issue 11: a provider cap nobody configured: the fleet stops within 1.5x the saturation point.
TARGET_PEAK_VS_SATURATION = 1.5


def _ratio(numerator: float, denominator: float) -> float | None:
    if denominator <= EPSILON:
        return None if numerator > EPSILON else 1.0
    return numerator / denominator


def detection_allowance(scenario: Scenario, ours_poll_seconds: float, observation: str) -> float:
    """Seconds a causal policy reading this mode needs to see a surge the wait floor reacts
    to at its first step: one poll, plus the management API's stats tick (its counts are
    that stale); an announced surge needs no detection beyond the poll."""
    stale = observation_mode(observation).stats_tick_seconds or 0.0
    return ours_poll_seconds + (0.0 if scenario.announced else stale)


def acceptance(scenario: Scenario, metrics: Mapping[str, Metrics], ours_poll_seconds: float = 5.0,
               observation: str = DEFAULT_OBSERVATION,
               ours_saturation: Mapping[str, Any] | None = None,
               ours_cost_floor: float | None = None) -> list[dict[str, Any]]:
    """The acceptance checks that apply to this scenario under this observation mode.

    A check is a dict {check, mode, value, limit, passed, detail}; `value` is the measured
    quantity in the units of `limit` (a ratio, seconds, actions per hour or replicas).
    `metrics` must hold "ours" and, for the time-in-queue check, "wait-floor";
    `ours_cost_floor` is `baselines.cost_floor` at ours' longest wait. Which checks apply:
    - modes that carry rates (management, prometheus), shipped scenarios (not a variant
      withholding the cap): `ours` p99 <= 1.3 x the wait floor's p99 + the detection
      allowance (`detection_allowance`), and replica-seconds <= 1.15 x the cost floor;
    - management only, as issue 4 defined them: against KEDA's default on the incident;
    - amqp on a steady scenario: replica-seconds <= 1.3 x the cost floor and <= 20 scale
      actions per hour after the warm-up;
    - a provider cap withheld from our spec, under modes with an ack rate (without one no
      policy can see the cap): peak fleet <= 1.5x max_send_rate / rate_per_replica.
    """
    ours = metrics.get("ours")
    if ours is None:
        return []
    mode = observation_mode(observation)
    checks: list[dict[str, Any]] = []

    def check(label: str, value: float | None, limit: float, detail: str | None = None) -> None:
        checks.append({"check": label, "mode": mode.name, "value": value, "limit": limit,
                       "passed": value is not None and value <= limit + EPSILON, "detail": detail})

    floor = metrics.get("wait-floor")
    rate_mode = mode.rates is not None and not scenario.spec_withholds_cap
    if floor is not None and rate_mode:
        allowance = detection_allowance(scenario, ours_poll_seconds, mode.name)
        check(f"p99 s vs {TARGET_P99_VS_WAIT_FLOOR:g} x wait-floor p99 + {allowance:g} s detection", ours.p99_seconds,
              TARGET_P99_VS_WAIT_FLOOR * floor.p99_seconds + allowance, f"wait floor p99 {floor.p99_seconds:g} s")
    if ours_cost_floor is not None and rate_mode:
        check("replica-seconds / cost floor", _ratio(ours.replica_seconds, ours_cost_floor), TARGET_COST_VS_COST_FLOOR,
              f"cost floor {ours_cost_floor:,.0f} replica-s for a longest wait of {ours.max_seconds:g} s")
    keda = metrics.get("keda-queuelength")
    if keda is not None and scenario.name == KEDA_TARGET_SCENARIO and mode.name == DEFAULT_OBSERVATION:
        check("p99 / keda-queuelength p99", _ratio(ours.p99_seconds, keda.p99_seconds), TARGET_P99_VS_KEDA)
        check("replica-seconds / keda-queuelength", _ratio(ours.replica_seconds, keda.replica_seconds),
              TARGET_COST_VS_KEDA)
    if ours_cost_floor is not None and mode.name == "amqp" and scenario.steady:
        check("replica-seconds / cost floor (steady, amqp)", _ratio(ours.replica_seconds, ours_cost_floor),
              TARGET_COST_VS_COST_FLOOR_AMQP_STEADY)
        check(f"scale actions per hour after {scenario.warmup_seconds:g} s warm-up (steady, amqp)",
              ours.scale_actions_per_hour, TARGET_SCALE_ACTIONS_PER_HOUR_AMQP_STEADY)
    saturation_point = scenario.saturation_replicas
    if scenario.spec_withholds_cap and saturation_point is not None and "ack_rate" not in mode.hidden:
        # The fleet the policy holds once it has seen the plateau (the first scale-up of a
        # surge happens before any ack rate can show a cap); never raised: its peak.
        held = float(ours.peak_replicas)
        detail = "ours never raised saturation"
        if ours_saturation is not None and ours_saturation.get("first_at") is not None:
            held = float(ours_saturation["held_max"])
            detail = (f"ours raised saturation at t={ours_saturation['first_at']:g}s and then held at most "
                      f"{held:g} replicas (peak {ours.peak_replicas} before)")
        check(f"replicas held vs {TARGET_PEAK_VS_SATURATION:g} x saturation point {saturation_point:g} (cap withheld)",
              held, TARGET_PEAK_VS_SATURATION * saturation_point, detail)
    return checks


def run_policies(scenario: Scenario, policies: Iterable[Policy], dt: float = 1.0) -> dict[str, SimResult]:
    """Simulate each policy on the scenario under its own observation mode, by name (unique)."""
    results: dict[str, SimResult] = {}
    for policy in policies:
        if policy.name in results:
            raise ValueError(f"two policies named {policy.name!r}")
        results[policy.name] = simulate(scenario, policy, dt)
    return results


def scenario_summary(scenario: Scenario) -> dict[str, Any]:
    return {"name": scenario.name, "description": scenario.description,
            "duration_seconds": scenario.duration_seconds, "base_rate": scenario.base_rate,
            "rate_per_replica": scenario.rate_per_replica, "startup_seconds": scenario.startup_seconds,
            "min": scenario.min_replicas, "max": scenario.max_replicas,
            "drain_seconds": scenario.drain_seconds, "max_send_rate": scenario.max_send_rate,
            "announced": scenario.announced, "steady": scenario.steady, "warmup_seconds": scenario.warmup_seconds,
            "spec_withholds_cap": scenario.spec_withholds_cap}


def compare(scenario: Scenario | str, include_ours: bool = True, with_series: bool = False,
            observations: Sequence[str] | None = None) -> dict[str, Any]:
    """Every policy under every observation mode on one scenario, the bounds for each run,
    and the acceptance checks.

    Mode-independent policies (the static fleet, the reference policies and the wait
    floor) run once and appear under every mode; the others run once per mode; a policy
    needing a field the mode hides is listed in `not_applicable` instead. For every run but
    the floor's, `bounds` gives the cost floor at its longest wait and whether the wait
    floor provably bounds it (`baselines.wait_floor_applies`). Returns
    {"scenario": {...}, "observations": [modes], "mode_independent": [names],
     "wait_floor": {"react_at", "replicas", "p99_seconds", "max_seconds"},
     "modes": {mode: {"source", "keda_tuned_value", "keda_tuning", "policies": {name: metrics},
                      "bounds": {name: {"cost_floor", "cost_vs_floor", "wait_floor_applies",
                                        "wait_floor_note"}},
                      "not_applicable": {name: reason}, "saturation": {name: {...}},
                      "acceptance": [checks], "series"?: {name: series}}},
     "acceptance": [every mode's checks],
     # the first mode's figures again, as before observation modes existed:
     "keda_tuned_value": v, "keda_tuning": {...}, "policies": {...}, "series"?: {...}}.
    """
    if isinstance(scenario, str):
        scenario = load_scenario(scenario)
    modes = list(observations or OBSERVATION_MODES)
    for name in modes:
        observation_mode(name)
    floor_policy = CausalWaitFloor(scenario)
    floor_run = simulate(scenario, floor_policy)
    floor_run = SimResult(replace(floor_run.metrics, observation="any"), floor_run.series)
    once: dict[str, SimResult] = {floor_policy.name: floor_run}
    floor_bounds: dict[str, dict[str, Any]] = {}  # mode-independent runs: computed once
    arrivals = arrivals_per_step(scenario)

    def bounds_for(name: str, run: SimResult) -> dict[str, Any]:
        floor = cost_floor(scenario, run.metrics.max_seconds, arrivals=arrivals)
        note = wait_floor_applies(scenario, floor_run.series, run.series)
        finite = math.isfinite(floor.replica_seconds)
        return {"cost_floor": floor.replica_seconds if finite else None,
                "cost_vs_floor": _ratio(run.metrics.replica_seconds, floor.replica_seconds) if finite else None,
                "wait_floor_applies": note is None, "wait_floor_note": note}

    by_mode: dict[str, Any] = {}
    for mode in modes:
        tuned_value, tuning = tune_keda_queue_length(scenario, observation=mode,
                                                     floor_p99=floor_run.metrics.p99_seconds)
        policies = default_policies(scenario, include_ours, tuned_value, observation=mode, applicable_only=False)
        results: dict[str, SimResult] = {}
        skipped: dict[str, str] = {}
        saturation: dict[str, Any] = {}
        bounds: dict[str, Any] = {}
        for policy in policies:
            if policy.name in results or policy.name in skipped:
                raise ValueError(f"two policies named {policy.name!r}")
            if getattr(policy, "mode_independent", False):
                if policy.name not in once:
                    run = simulate(scenario, policy, observation=mode)
                    once[policy.name] = SimResult(replace(run.metrics, observation="any"), run.series)
                results[policy.name] = once[policy.name]
                if policy.name != floor_policy.name:
                    if policy.name not in floor_bounds:
                        floor_bounds[policy.name] = bounds_for(policy.name, once[policy.name])
                    bounds[policy.name] = floor_bounds[policy.name]
                continue
            reason = not_applicable(policy, mode)
            if reason is not None:
                skipped[policy.name] = reason
                continue
            results[policy.name] = simulate(scenario, policy, observation=mode)
            bounds[policy.name] = bounds_for(policy.name, results[policy.name])
            summary = getattr(policy, "saturation_summary", None)
            if callable(summary):
                saturation[policy.name] = summary()
        metrics = {name: r.metrics for name, r in results.items()}
        ours_poll = next((p.poll_seconds for p in policies if p.name == "ours"), 5.0)
        ours_floor = (bounds.get("ours") or {}).get("cost_floor")
        block: dict[str, Any] = {
            "source": OBSERVATION_MODES[mode].source,
            "hidden": sorted(OBSERVATION_MODES[mode].hidden),
            "keda_tuned_value": tuned_value,
            "keda_tuning": {str(v): {"p99_seconds": p99, "replica_seconds": cost} for v, (p99, cost) in tuning.items()},
            "policies": {name: asdict(m) for name, m in metrics.items()},
            "bounds": bounds,
            "not_applicable": skipped,
            "saturation": saturation,
            "ours_poll_seconds": ours_poll,
            "detection_allowance_seconds": detection_allowance(scenario, ours_poll, mode),
            "acceptance": acceptance(scenario, metrics, ours_poll, observation=mode,
                                     ours_saturation=saturation.get("ours"), ours_cost_floor=ours_floor),
        }
        if with_series:
            block["series"] = {name: {key: list(values) for key, values in vars(r.series).items()}
                               for name, r in results.items()}
        by_mode[mode] = block
    first = by_mode[modes[0]]
    react_at = floor_policy.react_at
    out: dict[str, Any] = {
        "scenario": scenario_summary(scenario),
        "observations": modes,
        "mode_independent": list(once),
        "wait_floor": {"react_at": react_at if math.isfinite(react_at) else None,
                       "replicas": max(scenario.initial_replicas, useful_max_replicas(scenario)),
                       "p99_seconds": floor_run.metrics.p99_seconds, "max_seconds": floor_run.metrics.max_seconds},
        "modes": by_mode,
        "acceptance": [c for mode in modes for c in by_mode[mode]["acceptance"]],
        "keda_tuned_value": first["keda_tuned_value"],
        "keda_tuning": first["keda_tuning"],
        "policies": first["policies"],
    }
    if with_series:
        out["series"] = first["series"]
    return out


# --------------------------------------------------------------------------- presentation (CLI edge)
TABLE_COLUMNS = (
    ("policy", "policy", "{}"), ("p50 s", "p50_seconds", "{:.0f}"), ("p99 s", "p99_seconds", "{:.0f}"),
    ("max s", "max_seconds", "{:.0f}"), ("peak backlog", "peak_backlog", "{:,.0f}"),
    ("drain s", "time_to_drain_seconds", "{:.0f}"), ("replica·s", "replica_seconds", "{:,.0f}"),
    ("peak pods", "peak_replicas", "{}"), ("scale events", "scale_events", "{}"),
    ("actions/h", "scale_actions_per_hour", "{:.1f}"),
)
# Columns from a block's `bounds`: replica-seconds over the cost floor at the run's longest
# wait, and whether the wait floor provably bounds the run.
BOUND_HEADERS = ("× cost floor", "wait floor holds")


def _bound_cells(block: Mapping[str, Any], name: str) -> list[str]:
    bound = (block.get("bounds") or {}).get(name)
    if bound is None:
        return ["–", "–"]
    ratio = "–" if bound.get("cost_vs_floor") is None else f"{bound['cost_vs_floor']:.3f}"
    return [ratio, "yes" if bound.get("wait_floor_applies") else "no"]


def _rows(block: Mapping[str, Any]) -> list[list[str]]:
    return [[fmt.format(m[key]) for _, key, fmt in TABLE_COLUMNS] + _bound_cells(block, name)
            for name, m in block["policies"].items()]


def _mode_blocks(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(mode, block) pairs; a report from before observation modes is one management block."""
    if "modes" in report:
        return [(mode, report["modes"][mode]) for mode in report["observations"]]
    return [(DEFAULT_OBSERVATION, report)]


def _check_line(c: Mapping[str, Any]) -> str:
    value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
    detail = f"; {c['detail']}" if c.get("detail") else ""
    return f"{c['check']}: {value} (limit {c['limit']:.3g}{detail})"


def format_table(report: Mapping[str, Any]) -> str:
    """A plain-text table per observation mode of one `compare` report."""
    headers = [h for h, _, _ in TABLE_COLUMNS] + list(BOUND_HEADERS)
    lines: list[str] = []
    for mode, block in _mode_blocks(report):
        rows = _rows(block)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        lines += [f"scenario {report['scenario']['name']}, observation {mode} "
                  f"(keda-queuelength-tuned value = {block['keda_tuned_value']:g})",
                  "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        for name, reason in block.get("not_applicable", {}).items():
            lines.append(f"  {name}: not applicable ({reason})")
        for c in block["acceptance"]:
            lines.append(f"  {'PASS' if c['passed'] else 'FAIL'}  {_check_line(c)}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def print_report(report: Mapping[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is an optional extra
        print(format_table(report))
        return
    console = Console(width=max(Console().width, 170))  # never truncate figures
    for mode, block in _mode_blocks(report):
        table = Table(title=f"{report['scenario']['name']} — observation {mode} — "
                            f"keda-queuelength-tuned value {block['keda_tuned_value']:g}")
        for header in [h for h, _, _ in TABLE_COLUMNS] + list(BOUND_HEADERS):
            table.add_column(header, justify="left" if header == "policy" else "right")
        for row in _rows(block):
            table.add_row(*row)
        console.print(table)
        for name, reason in block.get("not_applicable", {}).items():
            console.print(f"  {name}: not applicable ({reason})")
        for c in block["acceptance"]:
            mark = "[green]PASS[/green]" if c["passed"] else "[red]FAIL[/red]"
            console.print(f"  {mark}  {_check_line(c)}")


def plot(reports: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Stacked panels per scenario (arrival rate, backlog, replicas: one line per policy under
    the first observation mode; with several modes, a fourth: `ours` replicas per mode)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    def ours_by_mode(report: Mapping[str, Any]) -> dict[str, Any]:
        blocks = report.get("modes") or {}
        return {mode: b["series"]["ours"] for mode, b in blocks.items() if "ours" in (b.get("series") or {})}

    rows = 4 if any(len(ours_by_mode(r)) > 1 for r in reports) else 3
    fig, axes = plt.subplots(rows, len(reports), figsize=(7 * len(reports), 3 * rows), sharex="col", squeeze=False)
    for col, report in enumerate(reports):
        series = report["series"]
        top, mid, bottom = axes[0][col], axes[1][col], axes[2][col]
        first = next(iter(series.values()))
        minutes = [t / 60 for t in first["t"]]
        top.plot(minutes, first["arrival_rate"], color="black")
        first_mode = (report.get("observations") or [DEFAULT_OBSERVATION])[0]
        top.set_title(f"{report['scenario']['name']} (observation: {first_mode})")
        top.set_ylabel("arrival rate (emails/s)")
        for name, s in series.items():
            if name == "static":  # its backlog dwarfs every other line
                continue
            if name == "wait-floor":  # a bound on wait: its backlog is the floor, its fleet is max
                floor_line, = mid.plot(minutes, s["backlog"], label="wait-floor (bound)", color="black",
                                       linestyle="--", linewidth=1)
                mid.legend(handles=[floor_line], fontsize="small")
                continue
            mid.plot(minutes, s["backlog"], label=name, linewidth=1)
            bottom.plot(minutes, s["replicas"], label=name, linewidth=1)
        mid.set_ylabel("backlog (messages)")
        bottom.set_ylabel("replicas")
        bottom.legend(fontsize="small")
        last = bottom
        if rows == 4:
            last = axes[3][col]
            ideal = series.get("ideal-reactive")
            if ideal is not None:
                last.plot(minutes, ideal["replicas"], label="ideal-reactive", color="grey", linewidth=1)
            for mode, s in ours_by_mode(report).items():
                last.plot(minutes, s["replicas"], label=f"ours, {mode}", linewidth=1)
            last.set_ylabel("ours: replicas by observation")
            last.legend(fontsize="small")
        last.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cli_simulate(argv: Sequence[str] | None = None) -> int:
    """`emailqueue-operator simulate [SCENARIO|FILE ...] [--all] [--mode M] [--json] [--plot FILE.png]`."""
    parser = argparse.ArgumentParser(prog="emailqueue-operator simulate",
                                     description="Replay surge scenarios against scaling policies, under each "
                                                 "observation mode the operator can have.")
    parser.add_argument("scenarios", nargs="*",
                        help=f"shipped names ({', '.join(benchmark_scenario_names())}) or YAML paths")
    parser.add_argument("--all", action="store_true", help="every shipped scenario and variant")
    parser.add_argument("--mode", action="append", choices=list(OBSERVATION_MODES), dest="modes",
                        help="observation mode (repeatable; default: all of them)")
    parser.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    parser.add_argument("--series", action="store_true", help="include time series in --json output")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG: arrival rate, backlog, replicas")
    parser.add_argument("--no-ours", action="store_true", help="only the baselines")
    parser.add_argument("--list", action="store_true", help="list the shipped scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name in benchmark_scenario_names():
            print(f"{name}: {load_scenario(name).description}")
        return 0
    names = benchmark_scenario_names() if args.all else args.scenarios
    if not names:
        parser.error("name a scenario (or --all / --list)")
    try:
        reports = [compare(load_scenario(n), include_ours=not args.no_ours,
                           with_series=bool(args.plot or args.series), observations=args.modes) for n in names]
    except ScenarioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.plot:
        plot(reports, args.plot)
    if args.json:
        if args.plot and not args.series:
            for r in reports:
                r.pop("series", None)
                for block in r["modes"].values():
                    block.pop("series", None)
        json.dump(reports if len(reports) > 1 else reports[0], sys.stdout, indent=2)
        print()
    else:
        for report in reports:
            print_report(report)
        if args.plot:
            print(f"plot written to {args.plot}")
    failed = any(not c["passed"] for r in reports for c in r["acceptance"])
    return 1 if failed else 0
