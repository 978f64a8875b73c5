"""At least once under compound faults at real load (issue #16): 100,000 emails, nothing lost.

One run of the closed loop (operator + kubelet + real workers + recording SMTP) on a three-node
RabbitMQ cluster, the workers in a network namespace of the test bed's own, publishing at
105 emails/s with confirms while faults overlap:

- workers SIGKILLed every D/30 throughout, and scaled in mid-send (max replicas cut to min, 3);
- SMTP slow (2 s per email), then flapping (451 on and off), then partitioned from the workers;
- one recipient refused for good (550), so the dead queue fills all along;
- RabbitMQ's disk alarm (publishers blocked, `connection.blocked`);
- the quorum leader's node SIGKILLed while retry tiers and the dead queue hold messages;
- the workers partitioned from every broker node, then 200 ms (± 50) added to the broker path
  and 300 ms to the SMTP path;
- a broker node frozen (SIGSTOP: it stops answering clients and peers alike);
- the operator SIGKILLed and restarted, the apiserver restarted.

Asserted: every accepted email delivered or dead-lettered as rejected (lost 0); only the refused
recipient's emails in the dead queue; duplicates (by Message-ID, derived from the job id) bounded;
no scale-down while the operator was blind; the publishers saw the alarm as a clear error.

The long form (`make chaos`, CHAOS_LONG=1) is the issue's run: D ≈ 950 s. Without it the same
schedule is compressed into ~2 minutes (for developing the suite; `make test` deselects the
`soak` mark).
"""
from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emailqueue_testbed import rabbit_cluster

from .compound import CompoundStack, cluster_endpoints
from .harness import (
    Fault,
    LoadPlan,
    LoadRun,
    fault_window,
    figures,
    long_or_short,
    record,
    recovery_seconds,
    run_load,
    scale_downs_while,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.soak,
              pytest.mark.timeout(long_or_short(2400, 900))]

RATE = 105.0                                  # published; the issue asks for ≥ 100/s accepted
EMAILS = long_or_short(100_000, 12_000)
RECIPIENTS = 100
REFUSED = LoadPlan.recipient(7, RECIPIENTS)   # 550 5.1.1 for the whole run: 1 % of the load
DUPLICATES_BOUND = 0.01                       # of the accepted emails


def schedule(stack: CompoundStack, duration: float, rng: random.Random) -> list[Fault]:
    """The faults at fractions of the load's duration D (so the compressed form keeps their order)."""
    smtp, lab = stack.smtp, stack.lab
    assert smtp is not None and lab is not None

    def at(fraction: float) -> float:
        return round(duration * fraction, 1)

    def span(start: float, end: float) -> float:
        return round(duration * (end - start), 1)

    faults = [Fault("worker-sigkill", at=at(0.05) + i * duration / 30,
                    action=lambda: stack.sigkill_random_worker(rng)) for i in range(27)]
    faults += [
        Fault("smtp-permanent-550", at=0.0, action=lambda: smtp.set_fault(550, "5.1.1 no such user",
                                                                         recipients=[REFUSED])),
        Fault("smtp-slow-2s", at=at(0.06), action=lambda: smtp.set_delay(2.0), heal=lambda: smtp.set_delay(0.0),
              duration=span(0.06, 0.10)),
        Fault("disk-alarm", at=at(0.09), action=stack.disk_alarm, heal=stack.clear_disk_alarm,
              duration=span(0.09, 0.12)),
    ]
    # 451 for everyone, on and off: three cycles of one-hundredth of D each.
    flap = span(0.0, 0.01)
    for cycle in range(3):
        faults.append(Fault("smtp-flapping-451", at=at(0.16 + cycle * 0.02), duration=flap,
                            action=lambda: smtp.set_fault(451, "4.3.0 try later", seconds=flap),
                            heal=lambda: "451 window over"))
    faults += [
        Fault("leader-node-sigkill", at=at(0.17), action=stack.kill_leader, heal=stack.restart_killed_node,
              duration=span(0.17, 0.21)),
        Fault("partition-workers-broker", at=at(0.28), action=lambda: lab.partition("broker"),
              heal=lambda: lab.heal("broker"), duration=span(0.28, 0.31)),
        Fault("latency-broker-200ms", at=at(0.35), action=lambda: lab.set_latency("broker", 0.2, 0.05),
              heal=lambda: lab.set_latency("broker", 0.0), duration=span(0.35, 0.41)),
        Fault("latency-smtp-300ms", at=at(0.35), action=lambda: lab.set_latency("smtp", 0.3),
              heal=lambda: lab.set_latency("smtp", 0.0), duration=span(0.35, 0.41)),
        Fault("partition-workers-smtp", at=at(0.45), action=lambda: lab.partition("smtp"),
              heal=lambda: lab.heal("smtp"), duration=span(0.45, 0.475)),
        Fault("operator-sigkill", at=at(0.51), action=stack.kill_operator, heal=stack.restart_operator,
              duration=span(0.51, 0.53)),
        Fault("apiserver-restart", at=at(0.57), action=_restart_apiserver(long_or_short(10.0, 3.0))),
        Fault("scale-in-to-min", at=at(0.63), action=lambda: stack.set_max_replicas(stack.load.min_replicas),
              heal=lambda: stack.set_max_replicas(stack.load.max_replicas), duration=span(0.63, 0.67)),
        Fault("node-frozen", at=at(0.73), action=lambda: rabbit_cluster.freeze(stack.cluster, 2),
              heal=lambda: rabbit_cluster.thaw(stack.cluster, 2), duration=span(0.73, 0.77)),
    ]
    return faults


def _restart_apiserver(down: float) -> Callable[[], Any]:
    def restart() -> Any:
        from emailqueue_testbed import kube

        return kube.restart_apiserver(down_seconds=down).facts["server"]
    return restart


def per_fault(run: LoadRun, names: list[str]) -> list[dict[str, Any]]:
    """Each fault's window, recovery and the duplicates received during it or within 30 s after."""
    first_receipt: dict[str, float] = {}
    extra: list[float] = []
    for job_id, received in sorted(run.receipts, key=lambda r: r[1]):
        if job_id in first_receipt:
            extra.append(received - run.started_at)
        else:
            first_receipt[job_id] = received
    rows = []
    for name in names:
        start, end = fault_window(run, name)
        failed = [e["detail"] for e in run.fault_log if e["fault"] == name and e["event"].endswith("-failed")]
        rows.append({"fault": name, "from": start, "to": end,
                     "recovery_seconds": recovery_seconds(run, end),
                     "duplicates_near": sum(1 for t in extra if start <= t <= end + 30),
                     "failed": failed[:3]})
    return rows


def test_100k_emails_under_compound_faults_lose_nothing(kube_env, cluster, tmp_path: Path):
    load = LoadPlan(rate=RATE, duration_seconds=EMAILS / RATE, rate_per_replica=20.0, min_replicas=3,
                    max_replicas=12, recipients=RECIPIENTS, publishers=4, retry_tiers="2s,5s", max_retries=40)
    stack = CompoundStack(load, cluster_endpoints(kube_env.kubeconfig, cluster), tmp_path / "compound",
                          "compound", cluster)
    try:
        stack.open()
        rng = random.Random(16)
        faults = schedule(stack, load.duration_seconds, rng)
        run = run_load(stack, faults, drain_timeout=long_or_short(600, 300))
    finally:
        stack.close()
    result = figures(run)
    names = sorted({f.name for f in faults} - {"worker-sigkill"}, key=lambda n: fault_window(run, n)[0])
    first, last = min(run.accepted.values(), default=0.0), max(run.accepted.values(), default=0.0)
    dead_recipients = Counter(LoadPlan.recipient(int(job_id.rsplit("-", 1)[1]), RECIPIENTS)
                              for job_id, _, _ in run.dead if job_id in run.accepted)
    blind_drops = scale_downs_while(run, lambda t: t.backlog is None)
    killed = [e["detail"] for e in run.fault_log if e["fault"] == "worker-sigkill" and e["event"] == "inject"]
    alarm_from, alarm_to = fault_window(run, "disk-alarm")
    result.update(
        fault="compound: every fault below, overlapping, on a three-node cluster",
        accepted_per_second=round(len(run.accepted) / max(1e-9, last - first), 1),
        per_fault=per_fault(run, names), workers_killed=sum(1 for k in killed if k),
        dead_letter_recipients=dict(dead_recipients), scale_downs_while_blind=blind_drops,
        alarm_window=[alarm_from, alarm_to],
        blocked_seen_in_alarm=sorted({round(t) for t, _ in run.blocked if alarm_from <= t <= alarm_to + 5}),
        peak_replicas_series=[t.desired for t in itertools.islice(run.ticks, 0, None, 30)],
        expectation="lost 0; only the refused recipient dead-lettered (rejected); duplicates ≤ 1 % of accepted, "
                    "by Message-ID; no scale-down while blind; publishers told of the disk alarm")
    record("compound-100k" if EMAILS >= 100_000 else "compound-short", result)
    shown = json.dumps({k: v for k, v in result.items() if k != "faults"}, indent=1, default=str)
    assert len(run.accepted) == EMAILS, shown
    assert result["complete"] and result["lost"] == 0, shown
    assert set(result["dead_letter_reasons"]) <= {"rejected"}, shown
    assert set(dead_recipients) == {REFUSED}, shown
    assert result["duplicates"] <= DUPLICATES_BOUND * len(run.accepted), shown
    assert not blind_drops, shown
    # The disk alarm reached the publishers as `connection.blocked` (Publisher.blocked), and nothing else did.
    assert result["blocked_seen_in_alarm"] and result["publisher_blocked_reasons"] == ["low on disk"], shown
    assert not [row for row in result["per_fault"] if row["failed"]], shown
