"""Driving a surge through the stack (I/O): the publisher thread, the once-a-second sampling
loop (`run_surge`) and the demo's second scripted fault (`run_smtp_storm`)."""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .alerting import check_dashboard
from .demo_plan import QUEUE, SurgePlan
from .demo_report import Sample, SurgeRun, job_id_from_message_id
from .demo_stack import DemoStack
from .prometheus import AlertSpan
from .smtp import SmtpControl


class _SurgePublisher(threading.Thread):
    """Publishes on the plan's schedule through the project's Publisher (confirms on)."""

    def __init__(self, plan: SurgePlan, amqp_url: str, run_id: str, stop: threading.Event) -> None:
        super().__init__(name="surge-publisher", daemon=True)
        self.plan, self.amqp_url, self.run_id, self.stop_event = plan, amqp_url, run_id, stop
        self.published: dict[str, float] = {}
        self.errors = 0
        self.started_at = 0.0
        self.started = threading.Event()
        self.finished = threading.Event()

    def run(self) -> None:
        from email_worker.publisher import Publisher, PublishError

        with Publisher(self.amqp_url, queue=QUEUE, app_id="emailqueue-demo") as publisher:
            self.started_at = time.time()
            origin = time.monotonic()
            self.started.set()
            seq = 0
            try:
                while not self.stop_event.is_set():
                    elapsed = time.monotonic() - origin
                    due = math.floor(self.plan.published_by(elapsed) + 1e-9)
                    while seq < due and not self.stop_event.is_set():
                        job_id = f"{self.run_id}-{seq:06d}"
                        at = time.time()
                        try:
                            publisher.publish({"id": job_id, "to": f"user{seq % 997}@example.org",
                                               "from": "Demo <demo@emailqueue.dev>",
                                               "subject": f"surge #{seq}", "text": "hello from the surge\n"})
                        except PublishError:
                            self.errors += 1
                            self.stop_event.wait(0.5)
                            continue
                        self.published[job_id] = at
                        seq += 1
                    if elapsed >= self.plan.duration_seconds:
                        break
                    self.stop_event.wait(0.02)
            finally:
                self.finished.set()


def _deliveries(smtp: SmtpControl) -> list[tuple[str, float]]:
    receipts = []
    for message in smtp.messages():
        job_id = job_id_from_message_id(message.get("message_id", ""))
        if job_id is not None:
            receipts.append((job_id, float(message["received_at"])))
    return receipts


def run_surge(stack: DemoStack, on_sample: Callable[[Sample, str], None] | None = None,
              settle_timeout: float = 180.0, stop: threading.Event | None = None) -> SurgeRun:
    """Publish the plan's surge, sample every second, then wait for the drain and the return to min.

    `on_sample(sample, phase)` is called once a second (the live view). `stop` set by a
    signal handler ends the run early (the result is marked interrupted).
    """
    plan, kubelet, smtp = stack.plan, stack.kubelet, stack.smtp
    assert kubelet is not None and smtp is not None
    stop = stop or threading.Event()
    publisher = _SurgePublisher(plan, stack.amqp_url, stack.run_id, stop)
    publisher.start()
    publisher.started.wait(30)
    origin = time.monotonic()
    samples: list[Sample] = []
    deadline: float | None = None
    drained = settled = False
    alert_states: dict[str, str] = {}
    while not stop.is_set():
        t = time.monotonic() - origin
        stack.sync_scrape_targets()
        if stack.prometheus is not None:
            now_states = stack.firing_alerts()
            for name in sorted(set(now_states) | set(alert_states)):
                if now_states.get(name) != alert_states.get(name):
                    stack.say(f"t={t:6.1f}s alert {name}: {now_states.get(name, 'resolved')}")
            alert_states = now_states
        ready_msgs, unacked = stack.queue_depth()
        status = stack.emailqueue_status()
        try:
            received = smtp.count()
        except OSError:
            received = samples[-1].received if samples else 0
        sample = Sample(t=round(t, 2), published=len(publisher.published), received=received,
                        backlog_ready=ready_msgs, backlog_unacked=unacked, desired=stack.desired_replicas(),
                        pods=sum(1 for p in kubelet.pods() if p.phase != "terminating"), ready=kubelet.ready(),
                        reason=str((status.get("lastDecision") or {}).get("reason", "")))
        samples.append(sample)
        publishing = not publisher.finished.is_set()
        if publishing:
            phase = "surge" if plan.surge_start <= t < plan.surge_end else "base rate"
        else:
            deadline = deadline or time.monotonic() + settle_timeout
            drained = drained or (sample.backlog == 0 and received >= sample.published)
            settled = sample.desired == plan.min_replicas and sample.ready == plan.min_replicas \
                and sample.pods == plan.min_replicas
            phase = "draining" if not drained else "settling" if not settled else "done"
        if on_sample is not None:
            on_sample(sample, phase)
        if not publishing and ((drained and settled) or time.monotonic() > deadline):  # type: ignore[operator]
            break
        stop.wait(max(0.0, 1.0 - (time.monotonic() - origin - t)))
    interrupted = stop.is_set()
    stop.set()
    publisher.join(10)
    receipts = tuple(_deliveries(smtp))
    seen = {job_id for job_id, _ in receipts}
    all_seen = all(job_id in seen for job_id in publisher.published)
    spans: tuple[AlertSpan, ...] | None = None
    dashboard: tuple[Mapping[str, Any], ...] | None = None
    if stack.prometheus is not None:
        time.sleep(2 * stack.prometheus.scrape_seconds)  # the last scrape and rule evaluation
        end = time.time()
        spans = tuple(stack.prometheus.timeline(publisher.started_at, end, origin=publisher.started_at))
        dashboard = tuple(check_dashboard(stack.prometheus, publisher.started_at, end, stack.dashboard_variables()))
    return SurgeRun(plan=plan, started_at=publisher.started_at, published=dict(publisher.published),
                    receipts=receipts, samples=tuple(samples),
                    scale_events=tuple(stack.scale_events(publisher.started_at)),
                    kubelet_events=tuple(kubelet.events), drained=all_seen, settled=settled,
                    publish_errors=publisher.errors, interrupted=interrupted, alert_spans=spans, dashboard=dashboard,
                    annotations=dict(stack.rendered_annotations) if stack.prometheus is not None else None)


# =========================================================================== the second fault (I/O)
def run_smtp_storm(stack: DemoStack, stop: threading.Event | None = None,
                   say: Callable[[str], None] = print) -> dict[str, Any]:
    """The demo's second scripted fault, after the surge: the SMTP server answers 451 to every
    email (a provider in trouble) while mail keeps arriving at the base rate, and one malformed
    job is published. Ends when EmailSMTPErrorRatioHigh fires (or a timeout); then every email
    of the phase must still be delivered (4xx are retried). Returns the report block."""
    from email_worker.publisher import Publisher, PublishError

    from .alerting import SMTP_ERRORS, runbook_section
    from .prometheus import parse_duration

    prom, smtp, plan = stack.prometheus, stack.smtp, stack.plan
    assert prom is not None and smtp is not None
    stop = stop or threading.Event()
    rule = next(r for g in prom.rules["groups"] for r in g["rules"] if r.get("alert") == SMTP_ERRORS)
    hold = parse_duration(str(rule.get("for", "0s")))
    timeout = hold + 60.0
    published: dict[str, float] = {}
    origin_wall = time.time()
    smtp.set_fault(451, "4.3.0 injected storm: try again later", seconds=timeout)
    say(f"fault: SMTP answers 451 to every email until {SMTP_ERRORS} fires (rule for: {rule.get('for')})")
    fired_at: float | None = None
    interval = 1.0 / max(plan.base_rate, 0.5)
    with Publisher(stack.amqp_url, queue=QUEUE, app_id="emailqueue-demo") as publisher:
        publisher.publish_raw(b"{not json", None)  # dead-lettered as invalid: EmailDeadLetterGrowing
        seq = 0
        deadline = time.monotonic() + timeout
        next_check = time.monotonic()
        while not stop.is_set() and fired_at is None and time.monotonic() < deadline:
            job_id = f"{stack.run_id}-storm-{seq:05d}"
            try:
                publisher.publish({"id": job_id, "to": f"storm{seq}@example.org", "from": "Demo <demo@emailqueue.dev>",
                                   "subject": f"storm #{seq}", "text": "sent through an SMTP 4xx storm\n"})
                published[job_id] = time.time()
                seq += 1
            except PublishError:
                pass
            stack.sync_scrape_targets()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 1.0
                if stack.firing_alerts().get(SMTP_ERRORS) == "firing":
                    fired_at = time.time()
            stop.wait(interval)
    ended_at = time.time()
    smtp.clear_faults()
    say("fault: ended; waiting for the retried emails")
    delivered: set[str] = set()
    wait_until = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < wait_until:
        delivered = {job for job, _ in _deliveries(smtp) if job in published}
        if len(delivered) == len(published):
            break
        stack.sync_scrape_targets()
        stop.wait(2)
    time.sleep(2 * prom.scrape_seconds)
    spans = prom.timeline(origin_wall, time.time(), origin=origin_wall)
    span = next((x for x in spans if x.alertname == SMTP_ERRORS), None)
    url = span.runbook_url if span else next(
        (r.get("annotations", {}).get("runbook_url", "") for g in prom.shipped_rules["groups"] for r in g["rules"]
         if r.get("alert") == SMTP_ERRORS), "")
    from .alerting import RUNBOOK

    return {
        "fault": "smtp-4xx-storm", "code": 451, "seconds": round(ended_at - origin_wall, 1),
        "alert": SMTP_ERRORS, "rule_for": rule.get("for"),
        "pending_at": span.as_dict()["pending_at"] if span else None,
        "firing_at": span.as_dict()["firing_at"] if span else None,
        "runbook_url": url, "runbook_section": runbook_section(url, RUNBOOK.read_text()),
        "published": len(published), "delivered": len(delivered), "lost": len(published) - len(delivered),
        "alerts": [x.as_dict() for x in spans],
    }
