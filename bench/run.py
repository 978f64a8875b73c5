"""`make bench`: every benchmark in one run; writes out/bench/ and docs/benchmarks.md.

1. policy comparison in the simulator, every shipped scenario (ratios against the
   ideal-reactive and clairvoyant bounds and KEDA, measured in the same run);
2. the live demo run beside the simulator's prediction for the same scenario;
3. worker throughput against one SMTP sink, beside bare smtplib loops;
4. operator overhead: 200 and 1000 EmailQueues on one broker at a 5 s poll.

Flags skip parts (`--only sim,worker`); a part that fails is reported as failed in the
document, never silently dropped.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "bench"
DOC = REPO / "docs" / "benchmarks.md"
ASSETS = REPO / "docs" / "assets"  # plots the document shows are committed beside it
PARTS = ("sim", "live", "worker", "operator")


def machine() -> str:
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GiB, Python {platform.python_version()}"


def run_sim() -> dict[str, Any]:
    from emailqueue_operator import sim

    reports = []
    for name in sim.scenario_names():
        report = sim.compare(name, with_series=True)
        sim.plot([report], ASSETS / f"sim-{name}.png")
        series = {k: v.pop("series", None) for k, v in report["policies"].items()}
        (OUT / f"sim-{name}.json").write_text(json.dumps({**report, "series": series}))
        reports.append(report)
    return {"scenarios": reports}


def run_live() -> dict[str, Any]:
    out = OUT / "demo"
    result = subprocess.run([sys.executable, "-m", "emailqueue_testbed.demo", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=1800)
    (OUT / "demo.log").write_text(result.stdout + result.stderr)
    if result.returncode:
        raise RuntimeError(f"demo exited {result.returncode}; see out/bench/demo.log")
    shutil.copyfile(out / "surge.png", ASSETS / "demo-surge.png")
    return json.loads((out / "report.json").read_text())


def _run_script(script: str, out_name: str, timeout: float) -> dict[str, Any]:
    """Run one bench/ script (it writes JSON to --out); its output goes to out/bench/NAME.log."""
    path = OUT / f"{out_name}.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), "--out", str(path)],
                            cwd=REPO, capture_output=True, text=True, timeout=timeout)
    (OUT / f"{out_name}.log").write_text(result.stdout + result.stderr)
    if result.returncode:
        raise RuntimeError(f"{script} exited {result.returncode}; see out/bench/{out_name}.log")
    return json.loads(path.read_text())


def run_worker() -> dict[str, Any]:
    return _run_script("worker_throughput.py", "worker", timeout=1800)


def run_operator() -> dict[str, Any]:
    return _run_script("operator_overhead.py", "operator", timeout=3600)


RUNNERS: dict[str, Callable[[], dict[str, Any]]] = {
    "sim": run_sim, "live": run_live, "worker": run_worker, "operator": run_operator}


# --- the document -----------------------------------------------------------------------

def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def section_sim(data: dict[str, Any]) -> list[str]:
    lines = ["## 1. Policies in the simulator", "",
             "Every policy runs against the same arrivals (`emailqueue-operator simulate --all`). `ours` is the real "
             "`scaling.decide` with the settings `emailqueue-operator plan` recommends (poll ≈ start-up ÷ 10, "
             "tolerance 0, scale up to max in one step, scale-down stabilization = start-up); `ours-crd-defaults` is "
             "the same policy with the CRD's HPA-style defaults. KEDA rows emulate KEDA's RabbitMQ scaler with the "
             "HPA's legacy behavior (30 s poll, 15 s sync, 0.1 tolerance, max(2×, 4) per sync, 300 s stabilization).",
             ""]
    for report in data["scenarios"]:
        sc = report["scenario"]
        lines += [f"### {sc['name']}", "", sc.get("description", ""), "",
                  f"![{sc['name']}](assets/sim-{sc['name']}.png)", "",
                  "| policy | p50 s | p99 s | max s | peak backlog | time to drain s | replica·s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, m in report["policies"].items():
            lines.append(f"| {name} | {_f(m['p50_seconds'], 0)} | {_f(m['p99_seconds'], 0)} | {_f(m['max_seconds'], 0)} "
                         f"| {_f(m['peak_backlog'], 0)} | {_f(m['time_to_drain_seconds'], 0)} "
                         f"| {_f(m['replica_seconds'], 0)} |")
        lines += ["", "| acceptance check | value | limit | met |", "|---|---:|---:|---|"]
        for check in report.get("acceptance", []):
            lines.append(f"| {check['check']} | {_f(check['value'], 3)} | {_f(check['limit'])} | {_f(check['passed'])} |")
        lines.append("")
    return lines


def section_live(data: dict[str, Any]) -> list[str]:
    scenario = data.get("scenario") or {}
    lines = ["## 2. The live demo beside the simulator", "",
             "`make demo` on the test bed: the real operator, real `email-worker` processes (started and stopped by "
             "the local kubelet), RabbitMQ and the recording SMTP server, replaying a time-compressed incident. The "
             "simulator ran the same compressed scenario with the same EmailQueue spec.", ""]
    if scenario:
        lines += [f"Scenario: `{json.dumps(scenario)[:600]}`", ""]
    lines += ["![demo](assets/demo-surge.png)", "", "| figure | live | simulated |", "|---|---:|---:|"]
    simulated = data.get("simulated") or {}

    def pick(block: dict[str, Any], key: str) -> Any:
        if key.startswith("tiq_"):
            return (block.get("time_in_queue_seconds") or {}).get(key[4:])
        return block.get(key)

    for key, label in (("published", "published"), ("delivered", "delivered (unique)"), ("lost", "lost"),
                       ("duplicates", "duplicates"), ("peak_backlog", "peak backlog"),
                       ("tiq_p50", "p50 time in queue s"), ("tiq_p99", "p99 time in queue s"),
                       ("tiq_max", "max time in queue s"), ("time_to_drain_seconds", "time to drain s"),
                       ("replica_seconds", "replica·s"), ("peak_replicas_desired", "peak replicas")):
        sim_value = pick(simulated, key) if key != "peak_replicas_desired" else simulated.get("peak_replicas")
        lines.append(f"| {label} | {_f(pick(data, key))} | {_f(sim_value)} |")
    others = simulated.get("other_policies") or {}
    if others:
        lines += ["", "The simulator's other policies on the same compressed scenario:", "",
                  "| policy | p99 s | peak backlog | replica·s |", "|---|---:|---:|---:|"]
        for name, m in others.items():
            lines.append(f"| {name} | {_f(m.get('p99_seconds'))} | {_f(m.get('peak_backlog'))} "
                         f"| {_f(m.get('replica_seconds'))} |")
    lines.append("")
    return lines


def section_worker(data: dict[str, Any]) -> list[str]:
    lines = ["## 3. Worker throughput", "",
             "One recording SMTP sink process; every sender in the same run, N emails each "
             f"(settings: `{json.dumps({k: v for k, v in data.items() if k not in ('emails_per_second', 'ratios', 'goals')})[:400]}`).",
             "`bare1`/`bare8`: smtplib over 1 / 8 reused connections; `worker1`/`worker8`: `email-worker run` at "
             "concurrency 1 / 8 draining pre-published jobs (consume, send, ack).", "",
             "| sender | emails/s |", "|---|---:|"]
    for name, rate in (data.get("emails_per_second") or {}).items():
        lines.append(f"| {name} | {_f(rate, 1)} |")
    lines += ["", "| ratio | value | goal | met |", "|---|---:|---:|---|"]
    goals = data.get("goals") or {}
    for name, value in (data.get("ratios") or {}).items():
        goal = goals.get(name) or {}
        lines.append(f"| {name} | {_f(value, 3)} | {_f(goal.get('min'))} | {_f(goal.get('met'))} |")
    lines.append("")
    return lines


def section_operator(data: dict[str, Any]) -> list[str]:
    lines = ["## 4. Operator overhead", "",
             "N EmailQueues (each with its Deployment and queue) on one broker, one operator process, 5 s poll. "
             "Goals: p95 poll lag < 1 s, < 0.5 core, < 300 MB, ≤ 2 broker connections.", "",
             "| EmailQueues | polls / expected | p50 lag s | p95 lag s | CPU cores | peak RSS MB | broker connections |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["operator_overhead"]:
        lines.append(f"| {r['emailqueues']} | {r['polls']} / {r['polls_expected']} | {_f(r['poll_lag_p50_seconds'], 3)} "
                     f"| {_f(r['poll_lag_p95_seconds'], 3)} | {_f(r['cpu_cores'], 3)} | {_f(r['rss_peak_mb'], 0)} "
                     f"| {r['broker_connections']} |")
    lines += ["", "Goals met: " + "; ".join(
        f"{r['emailqueues']}: " + ", ".join(f"{k} {_f(v)}" for k, v in r["goals_met"].items())
        for r in data["operator_overhead"]), ""]
    return lines


SECTIONS = {"sim": section_sim, "live": section_live, "worker": section_worker, "operator": section_operator}


def write_doc(results: dict[str, Any]) -> None:
    took = ", ".join(f"{part} {results[part]['_seconds']} s" for part in PARTS
                     if part in results and "_seconds" in results[part])
    lines = ["# Benchmarks", "",
             f"Generated by `make bench` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"on {machine()}; the parts took {took or 'unknown'}. Raw figures: `out/bench/*.json`.",
             "Reproduce: `make bench` (or `python bench/run.py --only sim,worker`). Every ratio below compares "
             "figures measured in the same run.", ""]
    for part in PARTS:
        if part not in results:
            continue
        outcome = results[part]
        if "error" in outcome:
            lines += [f"## {part}: FAILED", "", f"`{outcome['error']}`", ""]
        else:
            lines += SECTIONS[part](outcome)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(line for line in lines if line is not None) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ",".join(PARTS))
    parser.add_argument("--render", action="store_true",
                        help="run nothing: rewrite docs/benchmarks.md from out/bench/results.json")
    args = parser.parse_args()
    parts = [] if args.render else [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    OUT.mkdir(parents=True, exist_ok=True)
    ASSETS.mkdir(parents=True, exist_ok=True)
    previous = OUT / "results.json"
    results: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {}
    failed = False
    for part in parts:
        print(f"== bench: {part}", flush=True)
        t0 = time.time()
        try:
            results[part] = RUNNERS[part]()
        except Exception as exc:  # report, keep going with the other parts
            results[part] = {"error": f"{type(exc).__name__}: {exc}"}
            failed = True
        results[part]["_seconds"] = round(time.time() - t0)
        print(f"   {part} took {time.time() - t0:.0f} s", flush=True)
    previous.write_text(json.dumps(results, indent=2, default=str))
    if not results:
        parser.error("no results to render: run some parts first")
    write_doc(results)
    print(f"wrote {DOC.relative_to(REPO)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
