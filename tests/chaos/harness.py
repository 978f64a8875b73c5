"""The chaos suite's closed loop: steady load through the real stack while faults are injected.

It reuses the demo's `DemoStack` (namespace, vhost, private recording SMTP server,
Deployment, Secret, EmailQueue, operator process, local kubelet running real
`email-worker run` processes) and adds what a fault run needs on top:

- `ChaosStack`: the same stack with short retry tiers (so a 4xx outage resolves within
  the test) and hooks to SIGKILL a worker, kill/restart the operator;
- `LoadPlan` / `run_load`: publish at a steady rate with confirms (an email counts as
  *accepted* once the broker confirmed it), sample the loop every second, run the fault
  schedule, then wait until every accepted email was delivered or dead-lettered;
- `figures`: the outcome as plain values — published, delivered, dead-lettered with
  reasons, lost, duplicates, recovery seconds — which `record` writes to
  `out/chaos/results/<scenario>.json`; `bench/chaos.py` renders docs/reliability.md from them.

Expectations are asserted by the test modules, not here.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika

from emailqueue_testbed import state
from emailqueue_testbed.demo import (
    QUEUE,
    QUORUM_STATS_SPEC,
    REPO,
    DemoStack,
    Endpoints,
    SurgePlan,
    job_id_from_message_id,
)

RESULTS_DIR = Path(os.environ.get("CHAOS_RESULTS_DIR", REPO / "out" / "chaos" / "results"))
LONG = os.environ.get("CHAOS_LONG", "") not in ("", "0")
DEAD_QUEUE = f"{QUEUE}.dead"


def long_or_short(long: Any, short: Any) -> Any:
    """The long form (`make chaos`, CHAOS_LONG=1) gets bigger loads and every fault."""
    return long if LONG else short


# --------------------------------------------------------------------------- results
def record(scenario: str, figures: Mapping[str, Any]) -> Path:
    """Write one scenario's figures (overwrites the previous run of the same scenario)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{scenario}.json"
    # The test's node id lets bench/chaos.py join these figures with the test's pass/fail.
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    payload = {"scenario": scenario, "form": "long" if LONG else "short", "recorded_at": time.time(),
               "test": test, **figures}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class LoadPlan:
    """A steady load: `rate` emails/s for `duration_seconds`, to `recipients` distinct addresses."""

    rate: float
    duration_seconds: float
    rate_per_replica: float = 3.0
    min_replicas: int = 1
    max_replicas: int = 5
    recipients: int = 50
    pod_start_delay_seconds: float = 1.0
    retry_tiers: str = "2s,5s"
    max_retries: int = 20
    """Temporary failures tolerated: 20 × 5 s outlasts the 4xx windows injected here."""
    publishers: int = 1
    """Publisher threads, each with its own connection (one confirm round trip at a time each)."""

    @property
    def total(self) -> int:
        return int(self.rate * self.duration_seconds)

    def surge_plan(self, name: str) -> SurgePlan:
        """The demo's plan type, so `DemoStack` builds the EmailQueue for this load."""
        return SurgePlan(name=name, steps=((0.0, self.rate),), duration_seconds=self.duration_seconds,
                         rate_per_replica=self.rate_per_replica, pod_start_delay_seconds=self.pod_start_delay_seconds,
                         min_replicas=self.min_replicas, max_replicas=self.max_replicas, drain_seconds=10.0,
                         poll_seconds=2, spec_overrides=QUORUM_STATS_SPEC)

    @staticmethod
    def recipient(seq: int, recipients: int) -> str:
        return f"user{seq % recipients}@example.org"


# --------------------------------------------------------------------------- the stack
class ChaosStack(DemoStack):
    """`DemoStack` with short retry tiers and the fault hooks a chaos run needs."""

    def __init__(self, load: LoadPlan, endpoints: Endpoints, out_dir: Path, name: str) -> None:
        super().__init__(load.surge_plan(name), endpoints, out_dir, say=lambda text: None)
        self.load = load
        self.operator_restarts = 0
        self.receipt_cache: list[tuple[str, float]] = []
        self.receipts_read = 0

    def publisher_url(self) -> str:
        """Where the load's publishers connect (a node list on a cluster)."""
        return self.amqp_url

    def worker_env(self) -> dict[str, str]:
        # As DemoStack's, plus retry tiers short enough for an SMTP outage to resolve in the test.
        return {**super().worker_env(), "LOG_LEVEL": "info", "RETRY_TIERS": self.load.retry_tiers,
                "MAX_RETRIES": str(self.load.max_retries), "MESSAGE_ID_DOMAIN": "chaos.emailqueue.dev",
                "HEARTBEAT_SECONDS": "5"}

    # -- faults ---------------------------------------------------------------------------------
    def sigkill_random_worker(self, rng: random.Random) -> str | None:
        """SIGKILL one running worker process (the kubelet restarts it, as a real one would)."""
        kubelet = self.kubelet
        assert kubelet is not None
        # The kubelet exposes no process handles; its pod table is the only place they live.
        with kubelet._lock:  # test bed internals, read only
            running = [(name, pod.proc) for name, pod in kubelet._pods.items()
                       if pod.proc is not None and pod.proc.poll() is None and pod.phase != "terminating"]
        if not running:
            return None
        name, proc = rng.choice(running)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return name

    def kill_operator(self) -> None:
        """SIGKILL the operator: no cleanup, no final status write."""
        proc = self.operator
        assert proc is not None
        proc.kill()
        proc.wait(10)

    def restart_operator(self) -> None:
        """A new operator process on the same namespace (as a Deployment would restart it)."""
        self.operator_restarts += 1
        log = open(self.out_dir / f"operator-restart-{self.operator_restarts}.log", "ab")  # noqa: SIM115 (closed by _stop_operator)
        env = {**os.environ, "KUBECONFIG": self.endpoints.kubeconfig}
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "emailqueue_operator", "run", "--namespace", self.namespace,
             "--metrics-port", str(state.free_port()), "--health-port", "0"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
            start_new_session=True)
        self._later("stop the restarted operator", lambda: self._stop_operator(log))

    def operator_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.out_dir.glob("operator*.log")))

    def dead_letters(self) -> list[tuple[str, str, str]]:
        """(job id, x-death-reason, x-death-detail) of every message in the dead queue (drained)."""
        letters = []
        with contextlib.closing(pika.BlockingConnection(pika.URLParameters(self.amqp_url))) as connection:
            channel = connection.channel()
            while True:
                method, properties, _body = channel.basic_get(DEAD_QUEUE, auto_ack=True)
                if method is None:
                    return letters
                headers = properties.headers or {}
                letters.append((str(properties.message_id), str(headers.get("x-death-reason", "")),
                                str(headers.get("x-death-detail", ""))))

    def dead_count(self) -> int | None:
        try:
            return int(self.mgmt.queue(self.vhost, DEAD_QUEUE).get("messages") or 0)
        except Exception:
            return None


# --------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class Tick:
    """The loop once a second; t is seconds since publishing started."""

    t: float
    accepted: int
    received: int
    backlog: int | None            # ready + unacked; None: the management API did not answer
    desired: int | None
    ready: int
    conditions: Mapping[str, str]  # EmailQueue condition type → status
    decided_at: str                # status.lastDecision.at


@dataclass(frozen=True)
class Fault:
    """Something done to the stack at `at` seconds; `heal` (if any) `duration` seconds later."""

    name: str
    at: float
    action: Callable[[], Any]
    heal: Callable[[], Any] | None = None
    duration: float = 0.0


@dataclass
class LoadRun:
    load: LoadPlan
    accepted: dict[str, float] = field(default_factory=dict)   # job id → wall clock when confirmed
    attempted: set[str] = field(default_factory=set)
    publish_errors: int = 0
    publish_error_kinds: Counter[str] = field(default_factory=Counter)
    blocked: list[tuple[float, str]] = field(default_factory=list)   # (t, reason) a publisher was blocked
    receipts: list[tuple[str, float]] = field(default_factory=list)
    dead: list[tuple[str, str, str]] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    fault_log: list[dict[str, Any]] = field(default_factory=list)   # name, event, t, detail
    started_at: float = 0.0
    complete: bool = False


class _Publisher(threading.Thread):
    """Publishes its share of the load with confirms; a failed publish is retried with the same id.

    Publisher `shard` of `shards` takes sequence numbers shard, shard + shards, ... at rate/shards.
    """

    def __init__(self, load: LoadPlan, amqp_url: str, run_id: str, run: LoadRun, stop: threading.Event,
                 shard: int = 0, shards: int = 1) -> None:
        super().__init__(name=f"chaos-publisher-{shard}", daemon=True)
        self.load, self.amqp_url, self.run_id, self.run_, self.stop_event = load, amqp_url, run_id, run, stop
        self.shard, self.shards = shard, shards
        self.finished = threading.Event()
        self.client: Any = None
        """The open Publisher (its `blocked` is sampled every tick: a resource alarm is surfaced there)."""

    def run(self) -> None:
        from email_worker.publisher import Publisher, PublishError

        origin = time.monotonic()
        mine = range(self.shard, self.load.total, self.shards)
        index = 0
        try:
            with Publisher(self.amqp_url, queue=QUEUE, app_id="emailqueue-chaos") as publisher:
                self.client = publisher
                while not self.stop_event.is_set() and index < len(mine):
                    due = min(len(mine), int((time.monotonic() - origin) * self.load.rate / self.shards))
                    while index < due and not self.stop_event.is_set():
                        seq = mine[index]
                        job_id = f"{self.run_id}-{seq:06d}"
                        self.run_.attempted.add(job_id)
                        try:
                            publisher.publish({"id": job_id, "to": LoadPlan.recipient(seq, self.load.recipients),
                                               "from": "Chaos <chaos@emailqueue.dev>", "subject": f"chaos #{seq}",
                                               "text": "fault injection\n"})
                        except PublishError as exc:
                            # Not accepted (yet): the application would retry, and so do we.
                            self.run_.publish_errors += 1
                            self.run_.publish_error_kinds[type(exc).__name__] += 1
                            self.stop_event.wait(0.5)
                            continue
                        self.run_.accepted[job_id] = time.time()
                        index += 1
                    self.stop_event.wait(0.02)
        finally:
            self.finished.set()


def run_load(stack: ChaosStack, faults: Sequence[Fault] = (), drain_timeout: float = 120.0,
             sample: Callable[[Tick], None] | None = None) -> LoadRun:
    """Publish the stack's load, apply the faults on schedule, wait for every accepted email's fate."""
    load = stack.load
    run = LoadRun(load)
    stop = threading.Event()
    publishers = [_Publisher(load, stack.publisher_url(), stack.run_id, run, stop, shard, load.publishers)
                  for shard in range(load.publishers)]
    run.started_at = time.time()
    origin = time.monotonic()
    for publisher in publishers:
        publisher.start()
    pending = sorted(faults, key=lambda f: f.at)
    heals: list[tuple[float, Fault]] = []
    workers: list[threading.Thread] = []

    def log(fault: Fault, event: str, detail: Any = None) -> None:
        run.fault_log.append({"fault": fault.name, "event": event, "t": round(time.monotonic() - origin, 2),
                              "detail": detail})

    def apply(fault: Fault, fn: Callable[[], Any], event: str) -> None:
        # Faults run beside the sampler: stopping a broker takes seconds and the loop keeps watching.
        def go() -> None:
            log(fault, event + "-begin")
            try:
                log(fault, event, fn())
            except Exception as exc:  # recorded: a fault that failed to apply is a finding, not a crash
                log(fault, event + "-failed", f"{type(exc).__name__}: {exc}")
        thread = threading.Thread(target=go, daemon=True)
        thread.start()
        workers.append(thread)

    deadline: float | None = None
    try:
        while True:
            t = time.monotonic() - origin
            while pending and pending[0].at <= t:
                fault = pending.pop(0)
                apply(fault, fault.action, "inject")
                if fault.heal is not None:
                    heals.append((t + fault.duration, fault))
            for due, fault in list(heals):
                if due <= t:
                    heals.remove((due, fault))
                    apply(fault, fault.heal, "heal")  # type: ignore[arg-type]
            tick = _tick(stack, run, t)
            run.ticks.append(tick)
            run.blocked += [(tick.t, str(p.client.blocked)) for p in publishers
                            if p.client is not None and p.client.blocked]
            if sample is not None:
                sample(tick)
            published = all(p.finished.is_set() for p in publishers)
            if published and not pending and not heals and all(not w.is_alive() for w in workers):
                deadline = deadline or time.monotonic() + drain_timeout
                dead = stack.dead_count() or 0
                if tick.received >= len(run.accepted) - dead and tick.backlog == 0 and _all_accounted(stack, run):
                    run.complete = True
                    break
                if time.monotonic() > deadline:
                    break
            time.sleep(max(0.0, 1.0 - (time.monotonic() - origin - t)))
    finally:
        stop.set()
        for publisher in publishers:
            publisher.join(15)
        for worker in workers:
            worker.join(60)
    run.receipts = _receipts(stack)
    run.dead = stack.dead_letters()
    return run


def _all_accounted(stack: ChaosStack, run: LoadRun) -> bool:
    """Every accepted id delivered, or as many missing as there are dead letters (the ids are
    checked after the run, when the dead queue is drained: peeking would redeliver them)."""
    seen = {job_id for job_id, _ in _receipts(stack)}
    missing = set(run.accepted) - seen
    if not missing:
        return True
    dead = stack.dead_count()
    return dead is not None and dead >= len(missing)


def _receipts(stack: ChaosStack) -> list[tuple[str, float]]:
    """(job id, received at) of every email SMTP recorded, read incrementally (long runs record 10^5)."""
    assert stack.smtp is not None
    cache = stack.receipt_cache
    for message_id, received_at in stack.smtp.receipts(since=stack.receipts_read):
        stack.receipts_read += 1
        job_id = job_id_from_message_id(message_id)
        if job_id is not None:
            cache.append((job_id, received_at))
    return list(cache)


def _tick(stack: ChaosStack, run: LoadRun, t: float) -> Tick:
    ready_msgs, unacked = stack.queue_depth()
    status = stack.emailqueue_status()
    try:
        received = stack.smtp.count()  # type: ignore[union-attr]
    except OSError:
        received = run.ticks[-1].received if run.ticks else 0
    conditions = {str(c.get("type")): str(c.get("status")) for c in status.get("conditions") or []}
    assert stack.kubelet is not None
    return Tick(t=round(t, 2), accepted=len(run.accepted), received=received,
                backlog=None if ready_msgs is None else ready_msgs + (unacked or 0),
                desired=stack.desired_replicas(), ready=stack.kubelet.ready(), conditions=conditions,
                decided_at=str((status.get("lastDecision") or {}).get("at", "")))


# --------------------------------------------------------------------------- figures (pure)
def figures(run: LoadRun) -> dict[str, Any]:
    """Outcome of a run from recorded values only: the report's row for this fault."""
    delivered_counts = Counter(job_id for job_id, _ in run.receipts if job_id in run.accepted)
    dead_ids = {job_id for job_id, _, _ in run.dead}
    dead_accepted = {i for i in dead_ids if i in run.accepted}
    delivered = set(delivered_counts)
    lost = sorted(set(run.accepted) - delivered - dead_accepted)
    last_t = run.ticks[-1].t if run.ticks else 0.0
    return {
        "load": {"emails": run.load.total, "rate_per_second": run.load.rate,
                 "duration_seconds": run.load.duration_seconds, "rate_per_replica": run.load.rate_per_replica,
                 "max_replicas": run.load.max_replicas},
        "published": len(run.accepted),
        "publish_errors": run.publish_errors,
        "publish_error_kinds": dict(run.publish_error_kinds),
        "publisher_blocked_seconds": len({t for t, _ in run.blocked}),
        "publisher_blocked_reasons": sorted({reason for _, reason in run.blocked}),
        "delivered": len(delivered),
        "dead_lettered": len(dead_accepted),
        "dead_letter_reasons": dict(Counter(reason for job_id, reason, _ in run.dead if job_id in run.accepted)),
        "dead_letter_details": sorted({detail[:80] for _, _, detail in run.dead})[:5],
        "delivered_and_dead_lettered": len(delivered & dead_accepted),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "duplicates": sum(delivered_counts.values()) - len(delivered_counts),
        # Confirm lost with the connection, the retry published it again: not an accepted email.
        "unconfirmed_but_delivered": sum(1 for job_id, _ in run.receipts
                                         if job_id not in run.accepted and job_id in run.attempted),
        "complete": run.complete,
        "run_seconds": last_t,
        "peak_backlog": max((t.backlog for t in run.ticks if t.backlog is not None), default=0),
        "peak_replicas": max((t.desired for t in run.ticks if t.desired is not None), default=0),
        "faults": run.fault_log,
    }


def fault_window(run: LoadRun, name: str) -> tuple[float, float]:
    """(first inject, last heal or inject) seconds of a named fault."""
    times = [e["t"] for e in run.fault_log if e["fault"] == name and e["event"] in ("inject", "heal")]
    return (min(times), max(times)) if times else (0.0, 0.0)


def recovery_seconds(run: LoadRun, healed_at: float, threshold: int | None = None) -> float | None:
    """Seconds from `healed_at` until the backlog is back to ≤ threshold (default: 3 s of arrivals)
    and mail flows again (SMTP receipts rising); None if it never did within the run."""
    limit = threshold if threshold is not None else max(3, int(run.load.rate * 3))
    after = [t for t in run.ticks if t.t >= healed_at]
    for previous, tick in itertools.pairwise(after):
        flowing = tick.received > previous.received or tick.accepted == previous.accepted
        if tick.backlog is not None and tick.backlog <= limit and flowing:
            return round(tick.t - healed_at, 1)
    return None


def scale_downs_while(run: LoadRun, blind: Callable[[Tick], bool]) -> list[tuple[float, int, int]]:
    """(t, from, to) for every drop in desired replicas between ticks where `blind` holds."""
    drops = []
    for previous, tick in itertools.pairwise(run.ticks):
        if blind(previous) and blind(tick) and previous.desired is not None and tick.desired is not None \
                and tick.desired < previous.desired:
            drops.append((tick.t, previous.desired, tick.desired))
    return drops
