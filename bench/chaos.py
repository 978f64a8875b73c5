"""`make chaos`: run the fault suite and regenerate docs/reliability.md from what it recorded.

    python bench/chaos.py            # long form: bigger loads, longer faults (CHAOS_LONG=1)
    python bench/chaos.py --short    # the CI subset (what `make test` runs), then the report
    python bench/chaos.py --render   # only re-render the report from out/chaos/

Two pytest runs, each with a JUnit XML file:
1. the fault suite — tests/chaos (closed loop under load), tests/integration/test_faults_*.py,
   tests/unit/test_*_fuzz.py — whose tests write their figures to out/chaos/results/*.json;
2. the existing reliability and security tests the report also stands on (CRD validation
   table, RBAC can-i, chart non-root/NetworkPolicy, broker-outage fallback, worker faults,
   message parser properties), recorded as pass/fail counts.
The report is rendered only from those files: nothing in it is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "chaos"
RESULTS = OUT / "results"
REPORT = REPO / "docs" / "reliability.md"

FAULT_SUITE = ["tests/chaos",
               # broker crashes: a node SIGKILLed while dead-lettering; a cluster's quorum leader SIGKILLed
               "tests/integration/test_broker_crash.py", "tests/integration/test_broker_cluster.py",
               *sorted(str(p.relative_to(REPO)) for p in (REPO / "tests/integration").glob("test_faults_*.py")),
               *sorted(str(p.relative_to(REPO)) for p in (REPO / "tests/unit").glob("test_*_fuzz.py"))]
# (file, what it covers in the terms)
EXISTING: tuple[tuple[str, str], ...] = (
    ("tests/integration/test_crd_validation.py", "Bad input: invalid EmailQueues rejected by the apiserver"),
    ("tests/integration/test_rbac.py", "Security: RBAC least privilege (`kubectl auth can-i`)"),
    ("tests/integration/test_chart.py", "Security: chart non-root, restricted PSA dry-run, NetworkPolicy"),
    ("tests/unit/test_chart_static.py", "Security: chart static checks (securityContext, NetworkPolicy)"),
    ("tests/integration/test_operator_outage.py", "Fault: broker stopped → fallback, no blind scale-down"),
    ("tests/integration/test_worker_delivery.py", "Fault: worker SIGTERM/SIGKILL, 4xx/5xx, malformed messages"),
    ("tests/integration/test_broker_probes.py", "Security: wrong broker password never leaked"),
    ("tests/unit/test_message.py", "Bad input: message parser properties (hypothesis)"),
)

# Scenario → (order, table). Anything else recorded lands in "other".
LOOP = ("sigkill-workers", "rabbitmq-restart", "smtp-4xx-5xx", "operator-restart", "apiserver-restart")
OPERATOR = ("conflicting-hpa", "target-recreated", "unreachable-broker-300")
SECURITY = ("credentials-not-leaked",)
COMPOUND = ("compound-100k", "compound-short")


def run_pytest(paths: Iterable[str], junit: Path, long: bool, log: Path) -> int:
    env = {**os.environ, "CHAOS_LONG": "1" if long else "0", "CHAOS_RESULTS_DIR": str(RESULTS)}
    # The short form is what `make test` runs: without the 100,000-email compound run (mark `soak`).
    argv = [sys.executable, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
            "-o", "junit_family=xunit2", *(() if long else ("-m", "not soak"))]
    print("$ " + " ".join(argv[2:]), flush=True)
    with open(log, "w") as out:
        proc = subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    print(f"  exit {proc.returncode} (log {log.relative_to(REPO)})", flush=True)
    return proc.returncode


# --------------------------------------------------------------------------- reading (pure-ish)
def junit_cases(path: Path) -> list[dict[str, Any]]:
    """Every testcase of a JUnit XML file: file, name, outcome (passed|failed|skipped), seconds."""
    if not path.exists():
        return []
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        classname = case.get("classname", "")
        cases.append({"file": classname.replace(".", "/").rsplit("/", 0)[0], "classname": classname,
                      "name": case.get("name", ""), "outcome": outcome, "seconds": float(case.get("time", 0))})
    return cases


def outcome_of(test_id: str, cases: list[dict[str, Any]]) -> str:
    """pytest node id (tests/x/test_y.py::test_z[param]) → its JUnit outcome, or 'not run'."""
    if "::" not in test_id:
        return "not run"
    path, name = test_id.split("::", 1)
    classname = path[:-3].replace("/", ".")
    for case in cases:
        if case["classname"] == classname and case["name"] == name:
            return case["outcome"]
    return "not run"


def by_file(cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for case in cases:
        path = case["classname"].replace(".", "/") + ".py"
        entry = files.setdefault(path, {"passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0, "failures": []})
        entry[case["outcome"]] += 1
        entry["seconds"] += case["seconds"]
        if case["outcome"] == "failed":
            entry["failures"].append(case["name"])
    return files


def load_results(directory: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


# --------------------------------------------------------------------------- rendering (pure)
def _n(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _reasons(result: Mapping[str, Any]) -> str:
    reasons = result.get("dead_letter_reasons") or {}
    total = result.get("dead_lettered", 0)
    if not total:
        return "0"
    text = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
    entries = sum(int(v) for v in reasons.values())
    if entries > total:  # reasons count dead-queue entries: an email redelivered after its dead letter
        return f"{total} (dead-queue entries {text}: {entries - total} dead-lettered twice, same Message-ID)"
    return f"{total} ({text})"


def _loop_notes(name: str, r: Mapping[str, Any]) -> str:
    if name == "sigkill-workers":
        return f"{r.get('workers_killed')} workers SIGKILLed, {r.get('kubelet_restarts')} restarted by the kubelet"
    if name == "rabbitmq-restart":
        drops = len(r.get('scale_downs_while_blind') or [])
        return (f"{r.get('blind_seconds')} s blind, scale-downs while blind: {drops},"
                f" {r.get('publish_errors')} publishes retried by the producer,"
                f" fallback {'engaged' if r.get('fallback_seen') else 'not reached (outage < afterFailures polls)'}")
    if name == "smtp-4xx-5xx":
        refused, details = r.get('refused_recipients') or [], r.get('dead_letter_details') or []
        return f"550 for {', '.join(refused)}; {'; '.join(details)}"
    if name == "apiserver-restart":
        return (f"operator alive throughout: {r.get('operator_alive')}; desired before {r.get('desired_before')}, "
                f"after the restart {r.get('desired_after_restart')}; decided again "
                f"{_n(r.get('recovery_seconds'))} s after the apiserver was ready")
    if name == "operator-restart":
        return (f"desired before kill {r.get('desired_before_kill')}, "
                f"during downtime {r.get('desired_during_downtime')},"
                f" replica changes in the 10 s after restart: {r.get('replica_changes_after_restart')}")
    return str(r.get("notes", ""))


def _operator_figures(name: str, r: Mapping[str, Any]) -> str:
    if name == "conflicting-hpa":
        cond = r.get("condition") or {}
        return (f"detected in {_n(r.get('detected_seconds'))} s: Ready={cond.get('status')} "
                f"reason {cond.get('reason')} (\"{str(cond.get('message', ''))[:90]}\"), "
                f"{r.get('warning_events')} Warning event(s); "
                f"replicas while conflicting {r.get('replicas_while_conflicting')}")
    if name == "target-recreated":
        cond = r.get("condition_while_missing") or {}
        return (f"reported in {_n(r.get('reported_seconds'))} s: reason {cond.get('reason')} "
                f"(\"{str(cond.get('message', ''))[:80]}\"); Ready={r.get('ready_after')} afterwards")
    if name == "unreachable-broker-300":
        return (f"all {r.get('emailqueues')} polled in {_n(r.get('all_polled_seconds'))} s; over "
                f"{_n(r.get('window_seconds'))} s: CPU {_n(r.get('operator_cpu_share_of_one_core'))} of one core, "
                f"RSS {r.get('rss_mib')} MiB, broker connections max {r.get('broker_connections_max')}, "
                f"apiserver connections max {r.get('apiserver_connections_max')} "
                f"→ {r.get('apiserver_connections_last')}"
                f", threads {r.get('threads')}")
    return json.dumps({k: v for k, v in r.items() if k not in ("scenario", "test", "form", "recorded_at")})[:200]


def _compound(name: str, r: Mapping[str, Any], fault_cases: list[dict[str, Any]]) -> list[str]:
    """The compound run: its totals, then one row per fault (they overlap: see from/to)."""
    load = r.get("load") or {}
    lines = [f"### {'The long form' if name == 'compound-100k' else 'Compressed form (not the issue run)'}: "
             f"{_n(load.get('emails'))} emails at {_n(load.get('rate_per_second'))}/s — "
             f"test {outcome_of(r.get('test', ''), fault_cases)}", "",
             f"Accepted **{_n(r.get('published'))}** ({_n(r.get('accepted_per_second'))}/s from first to last "
             "confirm), "
             f"delivered {_n(r.get('delivered'))}, dead-lettered {_reasons(r)}, **lost {_n(r.get('lost'))}**, "
             f"duplicates {_n(r.get('duplicates'))} (counted by Message-ID, which is derived from the job id), "
             f"publishes refused and retried by the producer {_n(r.get('publish_errors'))} "
             f"({', '.join(f'{k} {v}' for k, v in sorted((r.get('publish_error_kinds') or {}).items())) or 'none'}), "
             f"publishers blocked by the broker ({', '.join(r.get('publisher_blocked_reasons') or []) or '–'}) "
             f"for {_n(r.get('publisher_blocked_seconds'))} s, "
             f"workers SIGKILLed {_n(r.get('workers_killed'))}, scale-downs while blind "
             f"{len(r.get('scale_downs_while_blind') or [])}, peak backlog {_n(r.get('peak_backlog'))}, "
             f"peak replicas {_n(r.get('peak_replicas'))}, run {_n(r.get('run_seconds'))} s.", "",
             "| fault | from s | to s | recovery s | duplicates received during it or ≤ 30 s after | applied |",
             "|---|---:|---:|---:|---:|---|"]
    for row in r.get("per_fault") or []:
        applied = "yes" if not row.get("failed") else "failed: " + "; ".join(map(str, row["failed"]))
        lines.append(f"| {row.get('fault')} | {_n(row.get('from'))} | {_n(row.get('to'))} | "
                     f"{_n(row.get('recovery_seconds'))} | {_n(row.get('duplicates_near'))} | {applied} |")
    lines += ["", f"Expectations: {r.get('expectation', '')}.", ""]
    return lines


def render(results: Mapping[str, Mapping[str, Any]], fault_cases: list[dict[str, Any]],
           existing_cases: list[dict[str, Any]], meta: Mapping[str, Any]) -> str:
    lines = [
        "# Reliability and security report",
        "",
        "<!-- GENERATED by `make chaos` (bench/chaos.py) from out/chaos/: do not edit by hand. -->",
        "",
        f"Generated {meta.get('generated')}, form **{meta.get('form')}** "
        f"({'bigger loads, longer faults' if meta.get('form') == 'long' else 'the CI subset with small loads'}); "
        f"fault suite {meta.get('fault_seconds', 0):.0f} s, existing tests {meta.get('existing_seconds', 0):.0f} s. "
        "Every figure below was measured by the tests named in each row on the test bed "
        "(real kube-apiserver, RabbitMQ, operator and `email-worker` processes, recording SMTP server).",
        "",
        "**Accepted** = confirmed by the broker to the publisher. **Lost** = accepted, never received by SMTP and "
        "not in the dead queue. **Duplicates** = extra SMTP receipts of an accepted email (delivery is at least once). "
        "**Recovery** = seconds from the end of the fault until the backlog is back to ≤ 3 s of arrivals with mail "
        "flowing (operator rows: until the expected replicas/decision are back).",
        "",
    ]
    compound = [name for name in COMPOUND if name in results]
    if compound:
        lines += ["## Compound faults at load (three-node cluster, workers in a network namespace of the test "
                  "bed's own)", "",
                  "Every fault overlaps others; SMTP refuses one recipient of 100 for good all along (550), so the "
                  "dead queue holds messages throughout. Recovery = seconds from a fault's end until the backlog is "
                  "back to ≤ 3 s of arrivals with mail flowing (masked by the next fault when they overlap). The "
                  "network faults act between the workers' namespace and the gateway namespace (a partition drops "
                  "packets, no RST); this kernel has no `netem`, so latency is added by the gateway.", ""]
        for name in compound:
            lines += _compound(name, results[name], fault_cases)
    lines += [
        "## Faults under load (closed loop: operator + kubelet + workers + RabbitMQ + SMTP)",
        "",
        "| fault | load | accepted | delivered | dead-lettered | lost | duplicates | recovery s | test | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in [*LOOP, *sorted(set(results) - set(LOOP) - set(OPERATOR) - set(SECURITY) - set(COMPOUND))]:
        r = results.get(name)
        if r is None:
            continue
        load = r.get("load") or {}
        load_text = f"{load.get('emails')} emails at {_n(load.get('rate_per_second'))}/s" if load else "–"
        lines.append(f"| {r.get('fault', name)} | {load_text} | {_n(r.get('published'))} | {_n(r.get('delivered'))} | "
                     f"{_reasons(r)} | **{_n(r.get('lost'))}** | {_n(r.get('duplicates'))} | "
                     f"{_n(r.get('recovery_seconds'))} | {outcome_of(r.get('test', ''), fault_cases)} | "
                     f"{_loop_notes(name, r)} |")
    lines += ["", "Expectations asserted by those tests:", ""]
    for name in LOOP:
        if name in results:
            lines.append(f"- {results[name].get('fault', name)}: {results[name].get('expectation', '')}")
    lines += ["", "## Faults around the operator", "",
              "| fault | expectation | figures | recovery s | test |", "|---|---|---|---|---|"]
    for name in OPERATOR:
        r = results.get(name)
        if r is None:
            continue
        lines.append(f"| {r.get('fault', name)} | {r.get('expectation', '')} | {_operator_figures(name, r)} | "
                     f"{_n(r.get('recovery_seconds'))} | {outcome_of(r.get('test', ''), fault_cases)} |")
    lines += ["", "## Credentials", "", "| check | captured (bytes) | passwords found | test |", "|---|---|---|---|"]
    for name in SECURITY:
        r = results.get(name)
        if r is None:
            continue
        captured = ", ".join(f"{k} {v}" for k, v in (r.get("captured_bytes") or {}).items())
        found = ", ".join(f"{k} {v}" for k, v in (r.get("leaks") or {}).items())
        outcome = outcome_of(r.get('test', ''), fault_cases)
        lines.append(f"| {r.get('fault', name)} | {captured} | {found} | {outcome} |")
    lines += ["", "## Bad input and security (fault suite)", "", "| test file | passed | failed | skipped | s |",
              "|---|---|---|---|---|"]
    for path, entry in sorted(by_file(fault_cases).items()):
        if path.startswith("tests/chaos/") or "test_faults_operator" in path:
            continue
        lines.append(f"| `{path}` | {entry['passed']} | {entry['failed']} | {entry['skipped']} "
                     f"| {entry['seconds']:.0f} |")
    lines += ["", "## Existing reliability and security tests this report stands on", "",
              "| covers | test file | passed | failed | skipped |", "|---|---|---|---|---|"]
    files = by_file(existing_cases)
    for path, covers in EXISTING:
        entry = files.get(path)
        if entry is None:
            lines.append(f"| {covers} | `{path}` | not run | | |")
            continue
        failed = f"{entry['failed']} ({', '.join(entry['failures'][:3])})" if entry["failed"] else "0"
        lines.append(f"| {covers} | `{path}` | {entry['passed']} | {failed} | {entry['skipped']} |")
    failures = [c for c in fault_cases + existing_cases if c["outcome"] == "failed"]
    lines += ["", "## Failures", ""]
    lines += [f"- `{c['classname']}::{c['name']}`" for c in failures] or ["None."]
    not_run = [name for name in (*LOOP, *OPERATOR) if name not in results]
    lines += ["", "## Not covered in this run", ""]
    lines += [f"- `{name}`: no figures recorded" for name in not_run] or ["Nothing."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="the CI subset (small loads) instead of the long form")
    parser.add_argument("--render", action="store_true", help="only render the report from out/chaos/")
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    fault_junit, existing_junit, meta_path = OUT / "junit-faults.xml", OUT / "junit-existing.xml", OUT / "meta.json"
    code = 0
    if not args.render:
        for stale in RESULTS.glob("*.json"):
            stale.unlink()  # a scenario that did not run must not show old figures
        started = time.monotonic()
        code |= run_pytest(FAULT_SUITE, fault_junit, not args.short, OUT / "faults.log")
        fault_seconds = time.monotonic() - started
        started = time.monotonic()
        code |= run_pytest([path for path, _ in EXISTING], existing_junit, not args.short, OUT / "existing.log")
        meta = {"generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "form": "short" if args.short else "long",
                "fault_seconds": fault_seconds, "existing_seconds": time.monotonic() - started}
        meta_path.write_text(json.dumps(meta) + "\n")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"generated": "?", "form": "?"}
    report = render(load_results(RESULTS), junit_cases(fault_junit), junit_cases(existing_junit), meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"report: {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 1 if code else 0


if __name__ == "__main__":
    sys.exit(main())
