"""Faults injected into the running closed loop (issue 8): nothing accepted is ever lost.

Each test runs a steady load through operator + local kubelet + real workers + RabbitMQ
+ SMTP (see harness.py), injects one fault, waits until every accepted email was
delivered or dead-lettered, records its figures for docs/reliability.md and asserts
what a user relies on:
- lost = 0 (every email the broker confirmed reached SMTP at least once, or sits in the
  dead queue with a reason); duplicates are allowed (at-least-once) and counted;
- the loop recovers on its own (recovery seconds recorded, bounded);
- fault-specific promises: no scale-down while blind, no flapping after an operator restart,
  permanent rejections parked with reason `rejected`.

Short form (CI, `make test`): small loads, ~20-30 s each. `CHAOS_LONG=1` (make chaos): bigger loads
and longer faults, as the issue states them (4xx for a minute).
"""
from __future__ import annotations

import itertools
import json
import random

import pytest

from .harness import (
    Fault,
    LoadPlan,
    fault_window,
    figures,
    long_or_short,
    record,
    recovery_seconds,
    run_load,
    scale_downs_while,
)

# A hang guard, not a speed target: the short form's broker outage measured 196 s with its setup
# and teardown on a loaded 2-core machine (stop 7 s, restart 27 s, drain), and the timeout also
# covers session fixtures (apiserver, private broker) when this is the first test to need them.
pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(long_or_short(900, 420))]


def _shown(result: dict) -> str:
    return json.dumps({k: v for k, v in result.items() if k != "faults"}, indent=1, default=str)


def test_sigkill_of_random_workers_under_load_loses_nothing(chaos_stack, shared_endpoints):
    load = LoadPlan(rate=long_or_short(12.0, 8.0), duration_seconds=long_or_short(90, 24), max_replicas=5)
    stack = chaos_stack(load, shared_endpoints, "sigkill-workers")
    rng = random.Random(8)
    every = long_or_short(5.0, 4.0)
    kills = [Fault("sigkill-worker", at=6 + i * every, action=lambda: stack.sigkill_random_worker(rng))
             for i in range(int((load.duration_seconds - 8) // every))]
    run = run_load(stack, kills, drain_timeout=90)
    result = figures(run)
    _, last_kill = fault_window(run, "sigkill-worker")
    killed = [e["detail"] for e in run.fault_log if e["event"] == "inject" and e["detail"]]
    assert stack.kubelet is not None
    crashes = sum(1 for e in stack.kubelet.events if e.kind == "crash")
    result.update(fault=f"SIGKILL of a random worker every {every:g} s under load",
                  workers_killed=len(killed), kubelet_restarts=crashes,
                  recovery_seconds=recovery_seconds(run, last_kill),
                  expectation="lost 0; killed workers' unacked emails redelivered (duplicates counted)")
    record("sigkill-workers", result)
    shown = _shown(result)
    assert len(killed) >= 3, shown
    assert result["complete"] and result["lost"] == 0, shown
    assert result["dead_lettered"] == 0, shown
    assert result["recovery_seconds"] is not None, shown


def test_rabbitmq_stopped_and_restarted_mid_load_loses_nothing_and_never_scales_down_blind(
        chaos_stack, kube_env, private_rabbitmq):
    from .conftest import _endpoints

    load = LoadPlan(rate=long_or_short(9.0, 6.0), duration_seconds=long_or_short(90, 30), max_replicas=5)
    stack = chaos_stack(load, _endpoints(kube_env, private_rabbitmq), "rabbitmq-restart")
    outage = long_or_short(30.0, 10.0)
    fault = Fault("rabbitmq-stop-start", at=10, action=private_rabbitmq.stop_broker,
                  heal=private_rabbitmq.start_broker, duration=outage)
    run = run_load(stack, [fault], drain_timeout=120)
    result = figures(run)
    stopped_at, healed_at = fault_window(run, "rabbitmq-stop-start")
    back = next((e["t"] for e in run.fault_log if e["event"] == "heal"), healed_at)  # start_broker returned
    blind = [t for t in run.ticks if t.backlog is None]
    drops = scale_downs_while(run, lambda t: t.t >= stopped_at and t.backlog is None)
    result.update(fault=f"RabbitMQ node stopped for {outage:g} s mid-load, then restarted (private broker)",
                  blind_seconds=len(blind), scale_downs_while_blind=drops,
                  fallback_seen=any(t.conditions.get("FallbackActive") == "True" for t in run.ticks),
                  recovery_seconds=recovery_seconds(run, back),
                  expectation="lost 0; publishes during the outage retried by the producer; "
                              "no scale-down while blind; workers and operator reconnect on their own")
    record("rabbitmq-restart", result)
    shown = _shown(result)
    assert result["complete"] and result["lost"] == 0, shown
    assert not drops, shown
    assert blind, "the outage was not observed: " + shown
    assert result["recovery_seconds"] is not None, shown


def test_smtp_4xx_outage_then_5xx_for_some_recipients_loses_nothing(chaos_stack, shared_endpoints):
    load = LoadPlan(rate=long_or_short(6.0, 5.0), duration_seconds=long_or_short(100, 28), max_replicas=4,
                    recipients=20)
    stack = chaos_stack(load, shared_endpoints, "smtp-4xx-5xx")
    smtp = stack.smtp
    assert smtp is not None
    outage = long_or_short(60.0, 10.0)
    refused = [LoadPlan.recipient(n, load.recipients) for n in (3, 7)]
    temporary = Fault("smtp-451", at=4, duration=outage,
                      action=lambda: smtp.set_fault(451, "4.3.0 try again later", seconds=outage))
    permanent_at = 4 + outage + 2
    permanent = Fault("smtp-550-some-recipients", at=permanent_at,
                      action=lambda: smtp.set_fault(550, "5.1.1 no such user", recipients=refused))
    run = run_load(stack, [temporary, permanent], drain_timeout=120)
    result = figures(run)
    result.update(fault=f"SMTP answers 451 to everything for {outage:g} s, then 550 for {len(refused)} of "
                        f"{load.recipients} recipients",
                  refused_recipients=refused,
                  recovery_seconds=recovery_seconds(run, 4 + outage, threshold=max(3, int(load.rate * 3))),
                  expectation="lost 0; 4xx retried until delivered; 5xx dead-lettered with reason `rejected`")
    record("smtp-4xx-5xx", result)
    shown = _shown(result)
    assert result["complete"] and result["lost"] == 0, shown
    assert set(result["dead_letter_reasons"]) <= {"rejected"}, shown
    # Every dead letter is one of the refused recipients' emails, sent after the 5xx began.
    refused_seqs = {n for n in range(load.total) if LoadPlan.recipient(n, load.recipients) in refused}
    dead_seqs = {int(job_id.rsplit("-", 1)[1]) for job_id, _, _ in run.dead}
    assert dead_seqs <= refused_seqs, shown
    assert result["dead_lettered"] >= 1, shown
    assert result["recovery_seconds"] is not None, shown


def test_operator_killed_and_restarted_under_load_decides_the_same_and_recovers(chaos_stack, shared_endpoints):
    from emailqueue_testbed.demo import QUORUM_STATS_SPEC

    # 3.5 and 2.5 workers' worth (3 emails/s each): a load that sits on a whole number of workers
    # (12/s = 4.0) makes any operator, restarted or not, hop between 4 and 5 on sampling noise.
    load = LoadPlan(rate=long_or_short(10.5, 7.5), duration_seconds=long_or_short(90, 40), max_replicas=6)
    stack = chaos_stack(load, shared_endpoints, "operator-restart")
    down = long_or_short(15.0, 6.0)
    kill_at = long_or_short(40.0, 18.0)
    at_kill: dict = {}

    def kill() -> None:
        at_kill.update(stack.emailqueue_status())   # what the killed process left in status
        stack.kill_operator()

    fault = Fault("operator-sigkill-restart", at=kill_at, action=kill, heal=stack.restart_operator, duration=down)
    run = run_load(stack, [fault], drain_timeout=90)
    result = figures(run)
    killed_at, restarted_at = fault_window(run, "operator-sigkill-restart")
    before = [t for t in run.ticks if t.t < killed_at and t.desired is not None]
    desired_before = before[-1].desired if before else None
    decided_before = before[-1].decided_at if before else ""
    after = [t for t in run.ticks if t.t >= restarted_at]
    first_decision = next((t for t in after if t.decided_at and t.decided_at != decided_before), None)
    # The policy's memory (stabilization history, last scale time) lives in status: the new
    # process must pick up where the old one stopped, not re-decide from scratch.
    window = [(t.t, t.desired) for t in after
              if first_decision is not None and t.t <= first_decision.t + 10 and t.desired is not None]
    changes = [(t, a, b) for (_, a), (t, b) in itertools.pairwise(window) if a != b]
    # A scale-down after the restart is the one an uninterrupted operator would make: every
    # recommendation the killed process recorded within the stabilization window before it is
    # at or below the new count (slack: one poll and one sample).
    stabilization = QUORUM_STATS_SPEC["behavior"]["scaleDown"]["stabilizationSeconds"]
    history = [(float(r["at"]), int(r["replicas"]))
               for r in ((at_kill.get("policy") or {}).get("recommendations") or [])]
    unjustified = [(t, a, b, [r for at, r in history
                              if at >= run.started_at + t - stabilization + 3 and r > b])
                   for t, a, b in changes if b < a]
    unjustified = [u for u in unjustified if u[3]]
    result.update(fault=f"operator SIGKILLed under load, restarted {down:g} s later",
                  desired_before_kill=desired_before,
                  desired_during_downtime=sorted({t.desired for t in run.ticks
                                                  if killed_at <= t.t < restarted_at and t.desired is not None}),
                  desired_first_10s_after_restart=[d for _, d in window], replica_changes_after_restart=len(changes),
                  recommendations_at_kill=history, scale_downs_against_history=unjustified,
                  recovery_seconds=None if first_decision is None else round(first_decision.t - restarted_at, 1),
                  expectation="lost 0; the restarted operator resumes from status: same first decision, at most one "
                              "change in the next 10 s, and a scale-down only when the recorded stabilization "
                              "history allows it")
    record("operator-restart", result)
    shown = _shown(result)
    assert result["complete"] and result["lost"] == 0, shown
    assert first_decision is not None, "the restarted operator never decided: " + shown
    assert window and window[0][1] == desired_before, shown
    assert len(changes) <= 1, shown
    assert history and all(at > 1e9 for at, _ in history), "no stabilization history in status: " + shown
    assert not unjustified, shown


def test_apiserver_restarted_mid_load_operator_and_workers_recover(chaos_stack, shared_endpoints):
    from emailqueue_testbed import kube

    # The apiserver takes ~10-20 s to become ready again on 2 cores: the load outlasts that.
    load = LoadPlan(rate=long_or_short(12.0, 6.0), duration_seconds=long_or_short(120, 60), max_replicas=6)
    stack = chaos_stack(load, shared_endpoints, "apiserver-restart")
    down = long_or_short(15.0, 3.0)
    restart_at = long_or_short(30.0, 10.0)
    fault = Fault("apiserver-restart", at=restart_at,
                  action=lambda: kube.restart_apiserver(down_seconds=down).facts["server"])
    run = run_load(stack, [fault], drain_timeout=90)
    result = figures(run)
    # The action returns once the restarted apiserver is ready: "inject-begin" is the stop.
    started = min((e["t"] for e in run.fault_log if e["event"] == "inject-begin"), default=0.0)
    _, healed = fault_window(run, "apiserver-restart")
    before = [t for t in run.ticks if t.t < started and t.desired is not None]
    decided_before = before[-1].decided_at if before else ""
    after = [t for t in run.ticks if t.t >= healed]
    first_decision = next((t for t in after if t.decided_at and t.decided_at != decided_before), None)
    desired_after = [t.desired for t in after if t.desired is not None]
    result.update(fault=f"kube-apiserver stopped for {down:g} s and restarted (same etcd, same port) under load",
                  desired_before=before[-1].desired if before else None,
                  desired_after_restart=sorted(set(desired_after)),
                  operator_alive=stack.operator is not None and stack.operator.poll() is None,
                  recovery_seconds=None if first_decision is None else round(first_decision.t - healed, 1),
                  expectation="lost 0; the operator's watch and polls reconnect by themselves and it decides again")
    record("apiserver-restart", result)
    shown = _shown(result)
    assert result["complete"] and result["lost"] == 0, shown
    assert result["operator_alive"], "the operator exited when the apiserver went away: " + shown
    assert first_decision is not None, "the operator never decided again after the apiserver came back: " + shown
