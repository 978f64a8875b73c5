"""Worker throughput against one SMTP sink, beside bare smtplib loops, in one run.

    python bench/worker_throughput.py --amqp-url amqp://... [-n 2000] [--smtp-delay 0.02] [--out out/worker.json]

Starts one recording SMTP sink process (the test bed's server, bodies not kept), then
measures four senders on the same sink, N emails each:
  bare1    one smtplib connection, reused, sequential
  bare8    8 threads, one reused connection each
  worker1  `email-worker run --concurrency 1` draining N pre-published jobs
  worker8  `email-worker run --concurrency 8` likewise (default prefetch = concurrency)
  worker8_prefetch16  the same with --prefetch 16: shows what the broker round trip between
           an ack and the next delivery costs (prefetch = concurrency keeps work spread over
           replicas; a deeper prefetch hides that round trip)
and reports emails/s plus worker8/bare1 (goal >= 2: concurrency pays) and worker8/bare8
(goal >= 0.8: consume + ack + bookkeeping cost little next to SMTP). `--smtp-delay` makes
the sink wait before answering DATA, like a real provider (tens to hundreds of ms); with
0 the figures measure the sink's CPU more than the worker. The AMQP URL comes from
--amqp-url, $AMQP_URL or .testbed/env; queues use a unique prefix and are deleted after.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika

from email_worker.message import build_email, parse_message
from email_worker.publisher import Publisher
from email_worker.routing import RetryPolicy, RetryTier
from email_worker.topology import Topology

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def amqp_url_from_env(explicit: str | None) -> str:
    """--amqp-url, else $AMQP_URL, else the running test bed's broker (its state file)."""
    if explicit:
        return explicit
    if os.environ.get("AMQP_URL"):
        return os.environ["AMQP_URL"]
    try:
        from emailqueue_testbed import rabbit, state

        record = state.load(rabbit.COMPONENT)
        if rabbit.healthy(record):
            assert record is not None
            return rabbit.amqp_url(record)
    except (ImportError, OSError):
        pass
    sys.exit("no AMQP URL: pass --amqp-url, set AMQP_URL, or run `make testbed-up`")


class Sink:
    """The recording SMTP server in its own process, so it does not share our GIL."""

    def __init__(self) -> None:
        self.port, self.control_port = free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emailqueue_testbed.smtp", "--port", str(self.port),
             "--control-port", str(self.control_port), "--no-bodies"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.clear()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError("SMTP sink did not start") from exc
                time.sleep(0.1)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.control_port}{path}", data=data, method=method)
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def count(self) -> int:
        return self._call("GET", "/count")["count"]

    def clear(self, delay: float = 0.0) -> None:
        self._call("POST", "/clear", {})
        if delay:
            self._call("POST", "/delay", {"seconds": delay})

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def sample_job(n: int) -> dict[str, Any]:
    return {"id": f"bench-{n:06d}", "to": f"user{n}@example.com", "from": "Bench <bench@example.com>",
            "subject": f"Benchmark message {n}", "text": "Hello,\n\nthis is a benchmark email.\n" * 20}


def bare_loop(sink: Sink, n: int, connections: int) -> float:
    """emails/s for `connections` threads, each sending its share over one reused connection."""
    messages = []
    for i in range(n):
        job = parse_message(json.dumps(sample_job(i)).encode(), None)
        messages.append((job, build_email(job, message_id_domain="bench.local", date=datetime.now(UTC))))
    shares = [messages[i::connections] for i in range(connections)]
    errors: list[BaseException] = []

    def send(share: list[Any]) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", sink.port, timeout=30) as smtp:
                for job, message in share:
                    smtp.send_message(message, from_addr=job.envelope_sender, to_addrs=list(job.envelope_recipients))
        except BaseException as exc:  # surfaced below: a failing baseline must not look fast
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(share,)) for share in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"bare loop failed: {errors[0]!r}")
    return n / elapsed


def worker_run(sink: Sink, amqp_url: str, n: int, concurrency: int, log_dir: Path,
               extra: tuple[str, ...] = ()) -> float:
    """emails/s for a worker process draining n pre-published jobs (first to last delivery at the sink)."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    topology = Topology(prefix=prefix, retry=RetryPolicy(tiers=(RetryTier(1),), max_retries=3))
    with Publisher(amqp_url, queue=prefix, declare_topology=topology) as publisher:
        publisher.publish_many(sample_job(i) for i in range(n))
    metrics_port = free_port()
    log_path = log_dir / f"worker{concurrency}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_", "SMTP_"))}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "email_worker.cli", "--log-level", "warning", "run", "--amqp-url", amqp_url,
             "--queue", prefix, "--retry-tiers", "1s", "--smtp-port", str(sink.port),
             "--concurrency", str(concurrency), "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
             *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        first = last = None
        deadline = time.monotonic() + max(120.0, n / 5)
        while True:
            count = sink.count()
            now = time.perf_counter()
            if count > 0 and first is None:
                first, first_count = now, count
            if count >= n:
                last = now
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"worker delivered {count}/{n}; see {log_path}")
            time.sleep(0.01)
        assert first is not None
        return (n - first_count) / max(last - first, 1e-9)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        delete_topology(amqp_url, topology)


def delete_topology(amqp_url: str, topology: Topology) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for queue in (topology.work_queue, *topology.retry_queues, topology.dead_queue):
            channel.queue_delete(queue)
        channel.exchange_delete(topology.dead_letter_exchange)
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", default=None)
    parser.add_argument("-n", "--messages", type=int, default=2000)
    parser.add_argument("--smtp-delay", type=float, default=0.02, help="sink delay before answering DATA, s")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    amqp_url = amqp_url_from_env(args.amqp_url)
    n = args.messages

    sink = Sink()
    results: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="worker-bench-") as tmp:
            for name, run in (
                ("bare1", lambda: bare_loop(sink, n, 1)),
                ("bare8", lambda: bare_loop(sink, n, 8)),
                ("worker1", lambda: worker_run(sink, amqp_url, n, 1, Path(tmp))),
                ("worker8", lambda: worker_run(sink, amqp_url, n, 8, Path(tmp))),
                ("worker8_prefetch16", lambda: worker_run(sink, amqp_url, n, 8, Path(tmp), ("--prefetch", "16"))),
            ):
                sink.clear(delay=args.smtp_delay)
                results[name] = run()
                print(f"{name:18s} {results[name]:9.1f} emails/s", flush=True)
    finally:
        sink.stop()

    ratios = {"worker8/bare1": results["worker8"] / results["bare1"],
              "worker8/bare8": results["worker8"] / results["bare8"],
              "worker1/bare1": results["worker1"] / results["bare1"],
              "worker8_prefetch16/bare8": results["worker8_prefetch16"] / results["bare8"]}
    goals = {"worker8/bare1": 2.0, "worker8/bare8": 0.8}
    report = {
        "benchmark": "worker_throughput", "messages": n, "smtp_delay_seconds": args.smtp_delay,
        "emails_per_second": {k: round(v, 1) for k, v in results.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "goals": {k: {"min": v, "met": ratios[k] >= v} for k, v in goals.items()},
        "cpus": os.cpu_count(), "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for key, value in report["ratios"].items():
        goal = goals.get(key)
        verdict = "" if goal is None else f"  (goal >= {goal}: {'met' if value >= goal else 'NOT met'})"
        print(f"{key:24s} {value:6.2f}{verdict}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
