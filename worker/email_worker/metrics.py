"""Prometheus metrics (own registry) and the /metrics, /healthz, /readyz HTTP endpoint.

Label sets are small and fixed: failure class, retry tier name, dead-letter reason.
Liveness (/healthz) means the consume loop is still turning; readiness (/readyz) means
connected to the broker and consuming (not while the SMTP circuit is open).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from email_worker.routing import DEAD_REASONS

FAILURE_CLASSES = ("temporary", "permanent", "sender", "invalid")
_SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_QUEUE_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, tiers: tuple[str, ...] = ()) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sent = Counter("emailworker_emails_sent", "Emails accepted by the SMTP server (250).", registry=r)
        self.failed = Counter("emailworker_emails_failed", "Failed send attempts and rejected messages by class.",
                              ["class"], registry=r)
        self.retried = Counter("emailworker_emails_retried", "Jobs published to a retry tier.", ["tier"], registry=r)
        self.dead_lettered = Counter("emailworker_emails_dead_lettered", "Jobs published to the dead queue.",
                                     ["reason"], registry=r)
        self.requeued = Counter("emailworker_emails_requeued",
                                "Deliveries returned to the queue unsent (shutdown, lost connection).", registry=r)
        self.send_duration = Histogram("emailworker_send_duration_seconds", "SMTP transaction time per email.",
                                       buckets=_SEND_BUCKETS, registry=r)
        self.time_in_queue = Histogram("emailworker_time_in_queue_seconds",
                                       "Enqueue (timestamp/created_at) to SMTP 250.", buckets=_QUEUE_BUCKETS,
                                       registry=r)
        self.in_flight = Gauge("emailworker_in_flight", "Deliveries held by this worker, not yet settled.",
                               registry=r)
        self.broker_connected = Gauge("emailworker_broker_connected", "1 while connected and consuming.", registry=r)
        self.smtp_reconnects = Counter("emailworker_smtp_connects", "SMTP connections opened.", registry=r)
        self.circuit_open = Gauge("emailworker_smtp_circuit_open",
                                  "1 while sender-side SMTP failures (MAIL FROM 5xx, AUTH, TLS, HELO, connect) "
                                  "keep consumption paused.", registry=r)
        self.circuit_trips = Counter("emailworker_smtp_circuit_trips",
                                     "Times the SMTP circuit opened (or re-opened after a failed probe).", registry=r)
        self.drain_requeued = Counter("emailworker_emails_drain_requeued",
                                      "Unsent deliveries handed back on a drain or circuit pause as fresh copies "
                                      "(not counted against the delivery limit).", registry=r)
        self.broker_blocked = Gauge("emailworker_broker_blocked",
                                    "1 while the broker blocks this worker's connection (RabbitMQ disk or memory "
                                    "alarm): retry, dead-letter and hand-back copies wait, their deliveries stay "
                                    "unacked. The reason is in the worker's log.", registry=r)
        self.legacy_topology = Gauge("emailworker_legacy_topology",
                                     "1 while the work queue still has v0.1's arguments (at-most-once "
                                     "dead-lettering): see docs/message-contract.md#migrating-from-v01.", registry=r)
        # Pre-create label children so dashboards see zeros instead of missing series.
        for cls in FAILURE_CLASSES:
            self.failed.labels(cls)
        for reason in DEAD_REASONS:
            self.dead_lettered.labels(reason)
        for tier in tiers:
            self.retried.labels(tier)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Health:
    """Shared between the consume loop (writer) and the HTTP handler (reader)."""

    liveness_timeout: float = 60.0
    ready: bool = False
    reason: str = "not consuming"
    """Why not ready, for the /readyz body."""
    last_tick: float = field(default_factory=time.monotonic)

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last_tick < self.liveness_timeout


def serve_http(metrics: WorkerMetrics, health: Health, host: str, port: int) -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; port 0 picks a free port (see server.server_port)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # probes every few seconds would flood the logs
            pass

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = health.alive()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"consume loop stalled\n")
            elif path == "/readyz":
                ok = health.ready
                self._reply(200 if ok else 503, b"ready\n" if ok else health.reason.encode() + b"\n")
            else:
                self._reply(404, b"not found\n")

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
