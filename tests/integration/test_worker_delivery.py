"""The email worker as a real process against real RabbitMQ and a recording SMTP server.

Each test gets its own vhost and its own SMTP recorder process (private ports, so fault
injection here never disturbs other suites sharing the test bed), starts
`email-worker run` as a subprocess, and checks what users rely on: every job delivered
with the right headers, bad input parked in the dead queue with a reason, temporary
failures retried, permanent ones dead-lettered, and nothing lost when the worker is
stopped (SIGTERM) or killed (SIGKILL) mid-load.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from email_worker.publisher import Publisher
from email_worker.routing import RetryPolicy, parse_tiers
from email_worker.topology import Topology
from emailqueue_testbed import state
from emailqueue_testbed.smtp import SmtpControl

from ..exposition import sample_values

pytestmark = pytest.mark.integration

DOMAIN = "mail.test.example"
TIERS = "1s,2s"


# -- fixtures and helpers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def recorder() -> Iterator[SmtpControl]:
    port, control_port = state.free_port(), state.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "emailqueue_testbed.smtp", "--port", str(port),
                             "--control-port", str(control_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    control = SmtpControl("127.0.0.1", port, control_port)
    deadline = time.monotonic() + 20
    while True:
        try:
            control.count()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("recording SMTP server did not start") from None
            time.sleep(0.1)
    yield control
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def sink(recorder: SmtpControl) -> SmtpControl:
    recorder.clear()
    return recorder


class WorkerProcess:
    def __init__(self, amqp_url: str, smtp: SmtpControl, log_path: Path, *extra: str,
                 concurrency: int = 4, grace: float = 10) -> None:
        self.metrics_port = state.free_port()
        self.log_path = log_path
        argv = [sys.executable, "-m", "email_worker.cli", "run", "--amqp-url", amqp_url,
                "--smtp-host", smtp.host, "--smtp-port", str(smtp.port), "--retry-tiers", TIERS,
                "--concurrency", str(concurrency), "--metrics-host", "127.0.0.1",
                "--metrics-port", str(self.metrics_port), "--grace-seconds", str(grace),
                "--message-id-domain", DOMAIN, *extra]
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed by stop())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "SMTP_"))}
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 30) -> None:
        wait_until(lambda: self.probe("/readyz") == 200, timeout, f"worker ready (log: {self.log_path})")

    def probe(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The sum of the `name` series whose labels include `labels`, as the worker serves them."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(sample_values(text, name, labels))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code, time.monotonic() - started

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                lines.append({"message": raw, "unstructured": True})
        return lines


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(amqp_url: str, smtp: SmtpControl, *extra: str, **kwargs: Any) -> WorkerProcess:
        worker = WorkerProcess(amqp_url, smtp, tmp_path / f"worker-{len(workers)}.log", *extra, **kwargs)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait(timeout=10)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def topology(max_retries: int = 8) -> Topology:
    return Topology(retry=RetryPolicy(tiers=parse_tiers(TIERS), max_retries=max_retries))


def job(n: int, **fields: Any) -> dict[str, Any]:
    document = {"id": f"job-{n:05d}", "to": f"user{n}@example.com", "from": "App <app@example.com>",
                "subject": f"Message {n}", "text": f"Hello number {n}"}
    document.update(fields)
    return document


def delivered_ids(sink: SmtpControl) -> list[str]:
    """Job ids from Message-IDs (<id@domain>) of everything the server accepted, in order."""
    return [m["message_id"].strip("<>").split("@")[0] for m in sink.messages()]


def wait_delivered(sink: SmtpControl, ids: set[str], timeout: float) -> Counter[str]:
    wait_until(lambda: ids <= set(delivered_ids(sink)), timeout, f"{len(ids)} deliveries")
    return Counter(delivered_ids(sink))


def queue_depth(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def drain_queue(amqp_url: str, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    messages = []
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((properties, body))
    finally:
        connection.close()


def report_duplicates(label: str, counts: Counter[str]) -> int:
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    print(f"\n[{label}] delivered {len(counts)} distinct jobs, {duplicates} duplicate deliveries "
          f"({sorted(k for k, n in counts.items() if n > 1)[:10]})")
    return duplicates


# -- tests --------------------------------------------------------------------------------------

def test_every_published_job_is_delivered_once_with_its_headers(vhost: str, sink: SmtpControl,
                                                                 start_worker: Callable[..., WorkerProcess]) -> None:
    with Publisher(vhost, declare_topology=topology()) as publisher:
        ids = publisher.publish_many(
            job(n, cc="copy@example.com", bcc=["hidden@example.com"], headers={"X-Campaign": "it"})
            for n in range(40))
    worker = start_worker(vhost, sink)
    worker.wait_ready()

    counts = wait_delivered(sink, set(ids), timeout=60)
    assert report_duplicates("plain", counts) == 0
    for message in sink.messages():
        job_id = message["message_id"].strip("<>").split("@")[0]
        n = int(job_id.split("-")[1])
        assert message["message_id"] == f"<{job_id}@{DOMAIN}>"
        assert message["mail_from"] == "app@example.com"
        assert sorted(message["rcpt_tos"]) == sorted([f"user{n}@example.com", "copy@example.com",
                                                      "hidden@example.com"])
        assert f"Subject: Message {n}" in message["data"] and "X-Campaign: it" in message["data"]
        assert "hidden@example.com" not in message["data"]  # Bcc is envelope-only
    wait_until(lambda: worker.metric("emailworker_emails_sent_total") == 40, 10, "sent metric")
    assert worker.metric("emailworker_time_in_queue_seconds_count") == 40
    assert queue_depth(vhost, "emails") == 0

    code, seconds = worker.stop()
    assert code == 0 and seconds < 10


def test_malformed_jobs_go_to_the_dead_queue_with_a_reason_and_good_ones_still_flow(
        vhost: str, sink: SmtpControl, start_worker: Callable[..., WorkerProcess]) -> None:
    bad = {
        "not-json": b"this is not json",
        "missing-to": json.dumps({"id": "bad-missing-to", "from": "a@example.com", "text": "x"}).encode(),
        "crlf-subject": json.dumps(job(9001, subject="Hi\r\nBcc: victim@example.com")).encode(),
        "huge": json.dumps(job(9002, text="x" * (20 * 1024 * 1024))).encode(),
        "bad-address": json.dumps(job(9003, to="not an address")).encode(),
    }
    expected_reason = {"not-json": "not JSON", "missing-to": "missing field: to", "crlf-subject": "CR/LF",
                       "huge": "too large", "bad-address": "invalid address"}
    good_ids = []
    with Publisher(vhost, declare_topology=topology()) as publisher:
        for n, (name, body) in enumerate(bad.items()):
            good_ids.append(publisher.publish(job(n)))
            publisher.publish_raw(body, pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                                             message_id=name))
        good_ids.append(publisher.publish(job(99)))
    worker = start_worker(vhost, sink)
    worker.wait_ready()

    counts = wait_delivered(sink, set(good_ids), timeout=60)
    assert set(counts) == set(good_ids)
    wait_until(lambda: queue_depth(vhost, "emails.dead") == len(bad), 30, "dead letters")
    dead = {props.message_id: (props, body) for props, body in drain_queue(vhost, "emails.dead")}
    assert set(dead) == set(bad)
    for name, (props, body) in dead.items():
        assert props.headers["x-death-reason"] == "invalid"
        assert expected_reason[name] in props.headers["x-death-detail"], props.headers
        assert body == bad[name]  # parked intact, so it can be fixed and replayed
        assert props.delivery_mode == 2
    assert worker.metric("emailworker_emails_dead_lettered_total", {"reason": "invalid"}) == len(bad)
    assert not any("Hello number" in json.dumps(line) for line in worker.log_lines())  # no bodies in logs


def test_temporary_smtp_failures_are_retried_until_delivered(vhost: str, sink: SmtpControl,
                                                              start_worker: Callable[..., WorkerProcess]) -> None:
    sink.set_fault(451, "4.3.0 try again later", seconds=3)
    with Publisher(vhost, declare_topology=topology(max_retries=20)) as publisher:
        ids = publisher.publish_many(job(n) for n in range(10))
    worker = start_worker(vhost, sink, "--max-retries", "20")
    worker.wait_ready()

    counts = wait_delivered(sink, set(ids), timeout=60)
    report_duplicates("4xx retries", counts)
    assert set(counts) == set(ids)
    assert worker.metric("emailworker_emails_retried_total") >= 10
    assert worker.metric("emailworker_emails_failed_total", {"class": "temporary"}) >= 10
    assert queue_depth(vhost, "emails.dead") == 0


def test_permanent_failures_and_exhausted_retries_are_dead_lettered(
        vhost: str, sink: SmtpControl, start_worker: Callable[..., WorkerProcess]) -> None:
    sink.set_fault(550, "5.1.1 no such user", recipients=["nobody@example.com"])
    sink.set_fault(451, "4.7.1 greylisted forever", recipients=["slow@example.com"])
    with Publisher(vhost, declare_topology=topology(max_retries=2)) as publisher:
        good = publisher.publish_many(job(n) for n in range(5))
        publisher.publish(job(500, id="rejected-1", to="nobody@example.com"))
        publisher.publish(job(501, id="exhausted-1", to="slow@example.com"))
    worker = start_worker(vhost, sink, "--max-retries", "2")
    worker.wait_ready()

    wait_delivered(sink, set(good), timeout=60)
    wait_until(lambda: queue_depth(vhost, "emails.dead") == 2, 30, "two dead letters")
    dead = {props.message_id: props.headers for props, _ in drain_queue(vhost, "emails.dead")}
    assert dead["rejected-1"]["x-death-reason"] == "rejected" and "550" in dead["rejected-1"]["x-death-detail"]
    assert dead["exhausted-1"]["x-death-reason"] == "exhausted"
    assert dead["exhausted-1"]["x-attempts"] == 3
    assert "rejected-1" not in delivered_ids(sink) and "exhausted-1" not in delivered_ids(sink)
    assert worker.metric("emailworker_emails_failed_total", {"class": "permanent"}) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopping_or_killing_the_worker_mid_load_loses_nothing(
        sig: int, vhost: str, sink: SmtpControl, start_worker: Callable[..., WorkerProcess]) -> None:
    total = 400
    sink.set_delay(0.02)  # keep sends in flight when the signal lands
    with Publisher(vhost, declare_topology=topology()) as publisher:
        ids = publisher.publish_many(job(n) for n in range(total))
    first = start_worker(vhost, sink, concurrency=8, grace=10)
    first.wait_ready()
    wait_until(lambda: sink.count() >= 60, 60, "first deliveries")

    code, seconds = first.stop(sig)
    if sig == signal.SIGTERM:
        assert code == 0, first.log_path.read_text()[-2000:]
        assert seconds < 10  # within the grace period
        stopped = [line for line in first.log_lines() if line.get("message") == "worker stopped"]
        assert stopped, "graceful stop not logged"
    delivered_before = sink.count()
    assert delivered_before < total, "load finished before the signal; the test proves nothing"

    second = start_worker(vhost, sink, concurrency=8)
    second.wait_ready()
    counts = wait_delivered(sink, set(ids), timeout=120)
    duplicates = report_duplicates(signal.Signals(sig).name, counts)
    assert set(counts) == set(ids)
    if sig == signal.SIGTERM:
        assert duplicates == 0  # in-flight sends were finished and acked, not redone
    else:
        assert duplicates <= 8  # at most the sends in flight at the kill (prefetch = concurrency)
    second.stop()
    assert queue_depth(vhost, "emails") == 0


def test_broker_down_at_start_is_reported_and_retried_not_a_crash(
        sink: SmtpControl, start_worker: Callable[..., WorkerProcess]) -> None:
    closed_port = state.free_port()
    worker = start_worker(f"amqp://user:s3cr%2Ft@127.0.0.1:{closed_port}/%2F", sink)
    wait_until(lambda: sum("cannot connect to broker" in str(line.get("message")) for line in worker.log_lines()) >= 2,
               30, "two logged connection attempts")
    assert worker.proc.poll() is None  # still trying, not crash-looping
    assert worker.probe("/healthz") == 200 and worker.probe("/readyz") == 503
    text = worker.log_path.read_text()
    assert "s3cr" not in text and "user:***@" in text
    code, seconds = worker.stop()
    assert code == 0 and seconds < 5


def test_a_dropped_broker_connection_is_re_established_and_nothing_is_lost(
        rabbitmq: Any, vhost: str, sink: SmtpControl, start_worker: Callable[..., WorkerProcess]) -> None:
    total = 300
    sink.set_delay(0.02)
    with Publisher(vhost, declare_topology=topology()):
        pass
    worker = start_worker(vhost, sink, concurrency=4)
    worker.wait_ready()
    mgmt = rabbitmq.management()
    vhost_name = urllib.parse.unquote(urllib.parse.urlsplit(vhost).path[1:])
    path = f"/api/vhosts/{urllib.parse.quote(vhost_name, safe='')}/connections"
    # The management API lists connections a few seconds late: find it before the load starts.
    wait_until(lambda: bool(mgmt.request("GET", path)), 30, "the worker's connection in the management API")
    connections = mgmt.request("GET", path)

    with Publisher(vhost) as publisher:
        ids = publisher.publish_many(job(n) for n in range(total))
    wait_until(lambda: sink.count() >= 40, 60, "first deliveries")
    # Like a broker restart or a network cut, but only for this worker's connection.
    for connection in connections:
        mgmt.request("DELETE", f"/api/connections/{urllib.parse.quote(connection['name'], safe='')}")
    assert sink.count() < total, "load finished before the connection was dropped; the test proves nothing"

    counts = wait_delivered(sink, set(ids), timeout=120)
    report_duplicates("connection dropped", counts)
    assert worker.proc.poll() is None
    assert any(line.get("message") == "broker connection lost; reconnecting" for line in worker.log_lines())
    wait_until(lambda: worker.probe("/readyz") == 200, 30, "ready again")
    assert worker.stop()[0] == 0


def test_an_smtp_outage_delays_mail_but_loses_none(vhost: str, start_worker: Callable[..., WorkerProcess],
                                                   tmp_path: Path) -> None:
    port, control_port = state.free_port(), state.free_port()
    later = SmtpControl("127.0.0.1", port, control_port)  # nothing listens there yet
    with Publisher(vhost, declare_topology=topology(max_retries=30)) as publisher:
        ids = publisher.publish_many(job(n) for n in range(20))
    worker = start_worker(vhost, later, "--max-retries", "30", "--circuit-initial-seconds", "0.5",
                          "--circuit-max-seconds", "2")
    # Refused connections are sender-side: the circuit opens, consumption pauses, readiness flips,
    # and no job spends a retry on them.
    wait_until(lambda: worker.probe("/healthz") == 200 and worker.metric("emailworker_smtp_circuit_open") == 1,
               30, "the SMTP circuit to open while SMTP is down")
    assert worker.probe("/readyz") == 503
    wait_until(lambda: worker.metric("emailworker_emails_failed_total", {"class": "sender"}) >= 3, 30,
               "failed probes while SMTP is down")
    assert worker.metric("emailworker_emails_retried_total") == 0

    proc = subprocess.Popen([sys.executable, "-m", "emailqueue_testbed.smtp", "--port", str(port),
                             "--control-port", str(control_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(later), 20, "SMTP server start")
        counts = wait_delivered(later, set(ids), timeout=120)
        report_duplicates("smtp outage", counts)
        assert set(counts) == set(ids)
        assert queue_depth(vhost, "emails.dead") == 0
        wait_until(lambda: worker.probe("/readyz") == 200, 10, "readiness once SMTP answers")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _answers(control: SmtpControl) -> bool:
    try:
        control.count()
        return True
    except OSError:
        return False


_RCPT_SERVER = r"""
import json, sys, time, email
from aiosmtpd.controller import Controller
port, record = int(sys.argv[1]), sys.argv[2]
refusals = {}
class Handler:
    async def handle_RCPT(self, server, session, envelope, address, options):
        if address.startswith("busy"):
            refusals[address] = refusals.get(address, 0) + 1
            if refusals[address] <= 2:
                return "450 4.2.1 mailbox busy, try later"
        if address.startswith("gone"):
            return "550 5.1.1 mailbox does not exist"
        envelope.rcpt_tos.append(address)
        return "250 OK"
    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content)
        with open(record, "a") as out:
            out.write(json.dumps({"message_id": message["Message-ID"], "rcpt_tos": envelope.rcpt_tos}) + "\n")
        return "250 OK"
Controller(Handler(), hostname="127.0.0.1", port=port).start()
print("ready", flush=True)
time.sleep(3600)
"""


def test_recipients_refused_one_by_one_are_retried_or_parked_alone(
        vhost: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path) -> None:
    port, record = state.free_port(), tmp_path / "deliveries.jsonl"
    server = subprocess.Popen([sys.executable, "-c", _RCPT_SERVER, str(port), str(record)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        with Publisher(vhost, declare_topology=topology()) as publisher:
            publisher.publish(job(1, id="partial-1", to=["ok@example.com", "busy@example.com"],
                                  cc="gone@example.com"))
        worker = start_worker(vhost, SmtpControl("127.0.0.1", port, 0))
        worker.wait_ready()

        def deliveries() -> list[dict[str, Any]]:
            return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []

        wait_until(lambda: any("busy@example.com" in d["rcpt_tos"] for d in deliveries()), 60, "busy delivery")
        wait_until(lambda: queue_depth(vhost, "emails.dead") == 1, 30, "the refused recipient parked")
        received = deliveries()
        # Each recipient got the email exactly once, all with the same Message-ID.
        assert sorted(r for d in received for r in d["rcpt_tos"]) == ["busy@example.com", "ok@example.com"]
        assert {d["message_id"] for d in received} == {f"<partial-1@{DOMAIN}>"}
        [(props, _)] = drain_queue(vhost, "emails.dead")
        assert props.headers["x-envelope-recipients"] == ["gone@example.com"]
        assert props.headers["x-death-reason"] == "rejected" and "550" in props.headers["x-death-detail"]
        assert worker.metric("emailworker_emails_retried_total") == 2
    finally:
        server.terminate()
        server.wait(timeout=10)
