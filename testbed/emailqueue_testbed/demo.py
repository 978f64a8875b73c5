"""`make demo`: the 2023-09-20 surge replayed end to end on the test bed (issue 7).

Everything is real except time and scale: the kube-apiserver, RabbitMQ, the operator
process, `email-worker run` processes started by the local kubelet, a recording SMTP
server. The incident's scenario is compressed (`PRESETS`, factors printed and written to
the report) so two cores cope and it finishes in minutes.

The demo is split along its seams, from pure to I/O; this module keeps the CLI and
re-exports the names the tests and bench/ import from `emailqueue_testbed.demo`:
- `demo_plan`: `SurgePlan` / `compress` / `preset`, the compressed scenario (arrival steps,
  per-replica rate, start-up, SLO, bounds) and the EmailQueue spec the operator gets for it;
- `demo_report`: recorded values (`Sample`, `SurgeRun`) and `summarize`, the report
  (delivered / lost / duplicates, time-in-queue percentiles, peak backlog, time to drain,
  replica-seconds, scale events), the simulator's prediction and the printed summary;
- `demo_stack`: `DemoStack`, namespace, vhost, recording SMTP sink, Deployment, Secret,
  EmailQueue, operator and kubelet, torn down in reverse order (also on Ctrl-C / SIGTERM);
- `demo_surge`: `run_surge` publishes the surge, samples the loop every second, waits for
  the drain and the return to min, returns a `SurgeRun`; `run_smtp_storm`, the second fault;
- `demo_plot` (`surge.png`) and `demo_ui` (live view: rich on a terminal, plain lines otherwise);
- here, `main`: the CLI (`python -m emailqueue_testbed.demo [--quick] [--out DIR]`), writing
  `report.json` and `surge.png`.

tests/e2e/test_closed_loop.py drives the same `DemoStack` and `run_surge` with `E2E`.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import bed
from .demo_plan import (
    DEPLOYMENT,
    EMAILQUEUE,
    PROCESS_START_SECONDS,
    QUEUE,
    QUORUM_STATS_SPEC,
    RABBIT_STATS_TICK_SECONDS,
    SECRET,
    SOURCE_SCENARIO,
    STEADY_AFTER_DRAIN_POLLS,
    SurgePlan,
    compress,
    preset,
)
from .demo_plot import alert_marks, plot
from .demo_report import (
    Sample,
    ScaleEvent,
    SurgeRun,
    job_id_from_message_id,
    percentile,
    print_summary,
    simulate,
    summarize,
    time_to_drain,
    trailing_rate,
    write_report,
)
from .demo_stack import CRD_DIR, REPO, DemoStack, Endpoints
from .demo_surge import run_smtp_storm, run_surge
from .demo_ui import LiveView


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
    view = LiveView(plan, fancy=sys.stdout.isatty() and not args.plain)
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
           "write_report", "plot", "print_summary", "main",
           # re-exported for the e2e, chaos and unit tests and bench/, which import them from here
           "CRD_DIR", "DEPLOYMENT", "EMAILQUEUE", "PROCESS_START_SECONDS", "QUEUE", "QUORUM_STATS_SPEC",
           "RABBIT_STATS_TICK_SECONDS", "REPO", "SECRET", "SOURCE_SCENARIO", "STEADY_AFTER_DRAIN_POLLS",
           "LiveView", "alert_marks", "run_smtp_storm", "trailing_rate"]

if __name__ == "__main__":
    sys.exit(main())
