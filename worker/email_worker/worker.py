"""The consume → send → settle loop: at-least-once delivery from RabbitMQ to SMTP.

Threads: the main thread owns the pika BlockingConnection and does every channel
operation (pika is not thread-safe). `concurrency` sender threads each own one SMTP
connection; they take deliveries from a local queue and hand results back with
`connection.add_callback_threadsafe`, so acks and publishes run on the main thread.

Settling rules: ack only after the server's 250. A temporary failure is published to the
next retry tier (with confirms) and THEN acked; a permanent failure, an invalid body or
exhausted retries go to the dead queue with the reason in `x-death-reason`, then ack.
If that publish fails the original is nacked back to the queue, so nothing is dropped.

Drains do not spend the poison budget. On quorum queues (3.10, 4.0) every requeue counts
towards `x-delivery-limit`, so a delivery the worker gives back unsent (stop, circuit
pause) is *handed back*: a fresh copy is published to the work queue with confirms, then
the original is acked; the copy starts with a delivery count of 0. On stop (SIGTERM) the
worker withholds acks for a moment so the broker has nothing more in flight, cancels the
consumer, and lets the sender threads finish everything already prefetched within
`grace_seconds`; what has not started by then is handed back, and only a send still in
progress at the deadline is nacked (it was attempted: that one counts); during a drain a
send is not begun when 1.5 x the smoothed send time would end after the deadline.

Sender-side SMTP failures (MAIL FROM 5xx, AUTH, TLS, HELO, connect) open a circuit
breaker (`circuit.py`): the job is handed back, consumption pauses (consumer cancelled,
not ready, `emailworker_smtp_circuit_open` 1) and resumes after a doubling delay; nothing
is dead-lettered for them.

A resource alarm (RabbitMQ low on disk or memory) blocks the connection at the worker's
first publish (a retry, dead-letter or hand-back copy): `emailworker_broker_blocked` is 1
and the worker logs the broker's reason until `connection.unblocked`. The copy's delivery
stays unacked meanwhile; if the broker keeps the connection blocked for
`blocked_connection_timeout`, pika drops it and the broker redelivers the original (the
unconfirmed copy may still be enqueued when the alarm clears: a duplicate, never a loss).

A lost broker connection is re-established with capped exponential backoff;
deliveries of the dead connection are redelivered by the broker (duplicates are possible,
recognisable by Message-ID, and are the price of never losing mail).
"""
from __future__ import annotations

import functools
import logging
import os
import queue
import random
import socket
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions
import pika.spec

from email_worker import brokers
from email_worker.backoff import backoff_delay
from email_worker.circuit import CircuitBreaker
from email_worker.logs import redact_text
from email_worker.message import (
    ATTEMPTS_HEADER,
    DEFAULT_OPTIONS,
    ENVELOPE_HEADER,
    EmailJob,
    InvalidMessage,
    ParseOptions,
    parse_message,
)
from email_worker.metrics import Health, WorkerMetrics, serve_http
from email_worker.publisher import watch_blocked
from email_worker.ratelimit import TokenBucket
from email_worker.routing import DEAD_INVALID, Route, route_failure
from email_worker.smtp import SmtpConfig, SmtpSender
from email_worker.topology import Topology, TopologyError, declare

log = logging.getLogger("email_worker.worker")

DEATH_REASON_HEADER = "x-death-reason"
DEATH_DETAIL_HEADER = "x-death-detail"
LAST_ERROR_HEADER = "x-last-error"
SENDER_FAILURES_HEADER = "x-sender-failures"
"""Sender-side failures this job has met (they cost it no attempt); informational."""

# Errors that mean "this connection is gone": reconnect, the broker redelivers unacked work.
_CONNECTION_ERRORS = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.ConnectionWrongStateError,
    pika.exceptions.ChannelWrongStateError,
    OSError,
)


@dataclass(frozen=True)
class WorkerConfig:
    amqp_url: str
    smtp: SmtpConfig = SmtpConfig()
    topology: Topology = Topology()
    concurrency: int = 4
    """Sender threads and SMTP connections."""
    prefetch: int | None = None
    """Unacked deliveries held; None = concurrency, so a new replica gets work at once instead
    of finding it parked on busy ones."""
    rate_limit: float = 0.0
    """Emails per second for this worker; 0 = unlimited."""
    rate_burst: float = 1.0
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9102
    """None disables the HTTP endpoint; 0 picks a free port (logged at start-up)."""
    grace_seconds: float = 25.0
    """On stop: time allowed for in-progress sends before the rest is requeued (< pod grace period)."""
    heartbeat_seconds: int = 30
    blocked_connection_timeout: float = 120.0
    """Give up on a connection the broker keeps blocked (memory/disk alarm) this long, then reconnect."""
    broker_backoff_max: float = 10.0
    """Longest wait between reconnect attempts (0.5 s doubling, jittered). 30 s left workers idle up to
    half a minute after a broker restart; RabbitMQ's own clients retry every 5 s."""
    parse: ParseOptions = DEFAULT_OPTIONS
    declare_topology: bool = True
    circuit_initial_seconds: float = 5.0
    """Consumption pause after a sender-side SMTP failure; doubles per failed probe."""
    circuit_max_seconds: float = 60.0
    settle_hold_seconds: float = 0.2
    """Before cancelling the consumer, acks are withheld this long so deliveries the broker
    already sent arrive and are kept (pika rejects, i.e. requeues and counts, any that
    arrive after the cancel)."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.prefetch is not None and self.prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        if self.grace_seconds < 0:
            raise ValueError("grace_seconds must be >= 0")
        if self.rate_limit < 0:
            raise ValueError("rate_limit must be >= 0")
        if not 0 < self.circuit_initial_seconds <= self.circuit_max_seconds:
            raise ValueError("circuit delays need 0 < initial <= max")

    def __repr__(self) -> str:
        return f"WorkerConfig(amqp_url={brokers.display(self.amqp_url)!r}, smtp={self.smtp!r}, ...)"


@dataclass
class _Delivery:
    connection: Any
    generation: int
    delivery_tag: int
    properties: pika.spec.BasicProperties
    body: bytes
    job: EmailJob
    started: bool = False
    """Set by the sender thread (under Worker._start_lock) just before the SMTP transaction."""


@dataclass(frozen=True)
class _Sent:
    seconds: float
    refused: dict[str, tuple[int, str]]
    """Recipients the server refused while accepting the email for the others."""


@dataclass(frozen=True)
class _Failed:
    error: BaseException


@dataclass(frozen=True)
class _NotStarted:
    """Not attempted (drain deadline, circuit open): handed back to the work queue uncounted."""


_Outcome = _Sent | _Failed | _NotStarted


@dataclass
class _Counters:
    """Plain totals kept beside Prometheus so `run()` can log a summary at exit."""

    sent: int = 0
    retried: int = 0
    dead: int = 0
    requeued: int = 0


class Worker:
    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or WorkerMetrics(tiers=tuple(t.name for t in config.topology.retry.tiers))
        self.health = Health(liveness_timeout=max(60.0, 4 * config.heartbeat_seconds))
        self.counters = _Counters()
        self._first_node = random.randrange(1 << 16)  # where this worker starts in a list of broker nodes
        self.metrics_port: int | None = None
        self._stop = threading.Event()
        self._abort = threading.Event()    # drain deadline passed: senders start nothing more
        self._paused = threading.Event()   # circuit open: senders hand deliveries back
        self._start_lock = threading.Lock()
        self._circuit = CircuitBreaker(config.circuit_initial_seconds, config.circuit_max_seconds)
        self._holding: list[tuple[int, bool]] | None = None  # settlements withheld around a cancel
        self._consumer_tag: str | None = None  # main thread only
        self._send_estimate = 0.0              # smoothed SMTP transaction time (under _start_lock)
        self._drain_deadline: float | None = None
        self._jobs: queue.Queue[_Delivery | None] = queue.Queue()
        self._bucket = TokenBucket(config.rate_limit, max(1.0, config.rate_burst))
        self._bucket_lock = threading.Lock()
        self._generation = 0
        self._channel: Any = None
        self._in_flight: dict[int, _Delivery] = {}   # main thread only
        self._senders: list[threading.Thread] = []
        self._http: Any = None
        self._blocked_reason: str | None = None  # the broker's, while it blocks this connection

    # -- public -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Request a graceful stop; safe from signal handlers and other threads.

        The grace period starts now (the pod's termination grace period starts at SIGTERM),
        and from now on senders begin no send that could outlast it."""
        if not self._stop.is_set():
            self._drain_deadline = time.monotonic() + self.config.grace_seconds
        self._stop.set()

    @property
    def circuit(self) -> CircuitBreaker:
        return self._circuit

    def run(self) -> int:
        """Consume until stop(); returns the process exit code."""
        cfg = self.config
        if cfg.metrics_port is not None:
            try:
                self._http = serve_http(self.metrics, self.health, cfg.metrics_host, cfg.metrics_port)
            except OSError as exc:
                log.error("cannot serve metrics (use METRICS_PORT=0 for any free port, -1 to disable)",
                          extra={"fields": {"address": f"{cfg.metrics_host}:{cfg.metrics_port}",
                                            "error": exc.strerror or str(exc)}})
                return 2
            self.metrics_port = self._http.server_port
        log.info("worker starting", extra={"fields": {
            "broker": brokers.display(cfg.amqp_url), "queue": cfg.topology.work_queue,
            "smtp": f"{cfg.smtp.host}:{cfg.smtp.port}", "smtp_tls": cfg.smtp.tls,
            "concurrency": cfg.concurrency, "rate_limit": cfg.rate_limit, "metrics_port": self.metrics_port,
            "retry_tiers": [t.name for t in cfg.topology.retry.tiers], "pid": os.getpid()}})
        for index in range(cfg.concurrency):
            thread = threading.Thread(target=self._sender_loop, name=f"sender-{index}", daemon=True)
            thread.start()
            self._senders.append(thread)
        exit_code = 0
        failures = 0
        try:
            while not self._stop.is_set():
                # Liveness is about this process, not the broker: reconnecting is alive.
                self.health.tick()
                connection = self._connect(failures)
                if connection is None:
                    failures += 1
                    continue
                failures = 0
                try:
                    self._consume(connection)
                except TopologyError as exc:
                    log.error("topology declaration failed", extra={"fields": {"reason": str(exc)}})
                    _close_quietly(connection)
                    exit_code = 2
                    break
                except _CONNECTION_ERRORS as exc:
                    self._connection_lost(connection, exc)
                    failures += 1
                    self._stop.wait(self._backoff(failures))
        finally:
            self.health.ready = False
            self._abort.set()
            self.metrics.broker_connected.set(0)
            for _ in self._senders:
                self._jobs.put(None)
            # Senders stuck in a slow SMTP command are daemons: wait briefly, not per thread.
            join_deadline = time.monotonic() + 5
            for thread in self._senders:
                thread.join(timeout=max(0.0, join_deadline - time.monotonic()))
            if self._http is not None:
                self._http.shutdown()
        log.info("worker stopped", extra={"fields": {
            "sent": self.counters.sent, "retried": self.counters.retried, "dead_lettered": self.counters.dead,
            "requeued": self.counters.requeued}})
        return exit_code

    # -- broker side (main thread) -----------------------------------------------------------

    def _connect(self, failures: int) -> Any | None:
        cfg = self.config
        # Named so `rabbitmqctl list_connections` / the management UI show which pod holds what.
        pod = os.environ.get("POD_NAME") or socket.gethostname()

        def configure(params: pika.URLParameters) -> None:
            params.heartbeat = cfg.heartbeat_seconds
            params.blocked_connection_timeout = cfg.blocked_connection_timeout
            params.connection_attempts = 1
            params.socket_timeout = 10
            params.client_properties = {"connection_name": f"email-worker {pod} pid {os.getpid()}"}

        try:
            # Several nodes: each worker starts at its own node, and after a failure at the next one.
            nodes = brokers.connection_parameters(cfg.amqp_url, self._first_node + failures, configure)
        except ValueError as exc:  # a malformed URL is not going to heal: say so, keep retrying slowly
            log.error("invalid AMQP URL", extra={"fields": {"error": redact_text(str(exc))}})
            self._stop.wait(self._backoff(failures + 1))
            return None
        try:
            return pika.BlockingConnection(nodes)
        except (pika.exceptions.AMQPError, OSError) as exc:
            delay = self._backoff(failures + 1)
            log.error("cannot connect to broker; retrying", extra={"fields": {
                "broker": brokers.display(cfg.amqp_url), "error": _describe(exc), "retry_in_seconds": round(delay, 2),
                "attempt": failures + 1}})
            self._stop.wait(delay)
            return None

    def _backoff(self, failures: int) -> float:
        # Jitter so a fleet restarting together does not hammer the broker in lockstep.
        cap = self.config.broker_backoff_max
        return backoff_delay(failures, base=min(0.5, cap), cap=cap, jitter=0.2)

    def _consume(self, connection: Any) -> None:
        cfg = self.config
        self._generation += 1
        self._in_flight.clear()
        self._broker_unblocked(connection_ended=True)  # a new connection is blocked only once it publishes
        watch_blocked(connection, self._broker_blocked, self._broker_unblocked)
        channel = connection.channel()
        channel.confirm_delivery()
        if cfg.declare_topology:
            self._report_topology(declare(channel, cfg.topology))
        prefetch = cfg.prefetch or cfg.concurrency
        channel.basic_qos(prefetch_count=prefetch)
        self._channel = channel
        self._consumer_tag = None
        self._holding = None
        self.metrics.broker_connected.set(1)
        while not self._stop.is_set():
            now = time.monotonic()
            state = self._circuit.state(now)
            if self._consumer_tag is None and state != "open":
                self._paused.clear()
                self._consumer_tag = channel.basic_consume(cfg.topology.work_queue, self._on_message)
                log.info("consuming", extra={"fields": {"queue": cfg.topology.work_queue, "prefetch": prefetch,
                                                        "circuit": state}})
            elif self._consumer_tag is not None and state == "open":
                self._cancel_consumer(connection, channel)
                log.warning("SMTP circuit open: consumption paused", extra={"fields": {
                    "retry_in_seconds": round(self._circuit.retry_in(now), 2), "trips": self._circuit.trips}})
            elif self._holding is not None:
                self._flush_held(channel)  # the circuit closed again before the cancel: settle now
            self._set_readiness(self._consumer_tag is not None)
            connection.process_data_events(time_limit=0.5 if self._consumer_tag else min(0.5, max(
                0.01, self._circuit.retry_in(time.monotonic()))))
            self.health.tick()
            if self._consumer_tag is not None and self._consumer_tag not in channel.consumer_tags:
                raise pika.exceptions.ChannelWrongStateError("consumer cancelled by the broker (queue deleted?)")
        self._drain(connection, channel)

    def _broker_blocked(self, reason: str) -> None:
        """connection.blocked (runs inside pika's I/O: sets state, logs, calls no pika)."""
        if self._blocked_reason is None:
            log.warning("broker blocks publishing (resource alarm): retry and dead-letter copies wait, "
                        "their deliveries stay unacked", extra={"fields": {
                            "reason": reason, "broker": brokers.display(self.config.amqp_url),
                            "blocked_connection_timeout_seconds": self.config.blocked_connection_timeout}})
        self._blocked_reason = reason
        self.metrics.broker_blocked.set(1)

    def _broker_unblocked(self, connection_ended: bool = False) -> None:
        """connection.unblocked, or the blocked connection is gone (nothing is known of the next)."""
        if self._blocked_reason is not None and not connection_ended:
            log.info("broker accepts publishes again", extra={"fields": {"reason": self._blocked_reason}})
        self._blocked_reason = None
        self.metrics.broker_blocked.set(0)

    def _set_readiness(self, consuming: bool) -> None:
        circuit_open = self._circuit.opened_at is not None
        self.metrics.circuit_open.set(1 if circuit_open else 0)
        self.health.ready = consuming and not circuit_open
        self.health.reason = "smtp circuit open" if circuit_open else "not consuming"

    def _report_topology(self, declared: Any) -> None:
        self.metrics.legacy_topology.set(1 if declared.legacy_work_queue else 0)
        topology = self.config.topology
        if declared.legacy_work_queue:
            log.error("work queue has v0.1 arguments: dead-lettering stays at-most-once until it is migrated; "
                      "consuming it anyway", extra={"fields": {
                          "queue": topology.work_queue, "missing": ["x-dead-letter-strategy=at-least-once",
                                                                    "x-overflow=reject-publish"],
                          "see": "docs/message-contract.md#migrating-from-v01"}})
        for name, count in declared.legacy_retry_queues.items():
            log.info("v0.1 retry tier still draining into the work queue", extra={"fields": {
                "queue": name, "messages": count}})
        for name in declared.deleted_legacy_queues:
            log.info("deleted empty v0.1 retry tier", extra={"fields": {"queue": name}})

    def _cancel_consumer(self, connection: Any, channel: Any) -> None:
        """Stop deliveries without requeueing any: withhold settlements (so the broker gets no
        new credit), take in what it already sent, cancel, then settle what was withheld."""
        if self._consumer_tag is None:
            return
        if self._holding is None:
            self._holding = []
        try:
            connection.process_data_events(time_limit=self.config.settle_hold_seconds)
            channel.basic_cancel(self._consumer_tag)
            self._consumer_tag = None
        finally:
            self._flush_held(channel)

    def _flush_held(self, channel: Any) -> None:
        held, self._holding = self._holding or [], None
        for tag, ack in held:
            if ack:
                channel.basic_ack(tag)
            else:
                channel.basic_nack(tag, requeue=True)

    def _drain(self, connection: Any, channel: Any) -> None:
        """Graceful stop: no new deliveries, finish what is held, hand back the rest, close."""
        self.health.ready = False
        self.health.reason = "stopping"
        log.info("stopping: draining in-flight sends", extra={"fields": {
            "in_flight": len(self._in_flight), "grace_seconds": self.config.grace_seconds}})
        self._cancel_consumer(connection, channel)
        deadline = self._drain_deadline or time.monotonic() + self.config.grace_seconds
        while self._in_flight and time.monotonic() < deadline:
            connection.process_data_events(time_limit=min(0.2, max(0.0, deadline - time.monotonic())))
        with self._start_lock:
            self._abort.set()  # from here on no sender starts a transaction
        connection.process_data_events(time_limit=0)  # settle results that arrived meanwhile
        for delivery in list(self._in_flight.values()):
            if delivery.started:
                # Still sending after the grace period: return it (counted: it was attempted);
                # a late 250 makes it a duplicate, not a loss.
                self._nack(delivery, "grace period over")
            else:
                self._hand_back(delivery, "stopping")
        self._generation += 1  # late results from sender threads must not touch the closed channel
        self.metrics.broker_connected.set(0)
        _close_quietly(connection)

    def _connection_lost(self, connection: Any, exc: BaseException) -> None:
        self.health.ready = False
        self.metrics.broker_connected.set(0)
        lost = len(self._in_flight)
        self._generation += 1
        self._in_flight.clear()
        self.metrics.in_flight.set(0)
        # Queued-but-unstarted deliveries die with the channel; the broker redelivers them.
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._jobs.put(None)
                break
        if isinstance(exc, pika.exceptions.ConnectionBlockedTimeout):
            log.warning("broker kept the connection blocked too long; reconnecting (unacked deliveries are "
                        "redelivered)", extra={"fields": {
                            "reason": self._blocked_reason, "unsettled": lost,
                            "blocked_connection_timeout_seconds": self.config.blocked_connection_timeout}})
        else:
            log.warning("broker connection lost; reconnecting", extra={"fields": {
                "error": _describe(exc), "unsettled": lost}})
        self._broker_unblocked(connection_ended=True)
        _close_quietly(connection)

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        try:
            job = parse_message(body, properties, self.config.parse)
        except InvalidMessage as exc:
            self.metrics.failed.labels("invalid").inc()
            fields = {"delivery_tag": method.delivery_tag, "reason": exc.reason,
                      "message_id": getattr(properties, "message_id", None)}
            log.warning("invalid message; dead-lettering", extra={"fields": fields})
            delivery = _Delivery(channel.connection, self._generation, method.delivery_tag, properties, body,
                                 job=None)  # type: ignore[arg-type]
            self._in_flight[method.delivery_tag] = delivery
            if self._dead_letter(delivery, DEAD_INVALID, exc.reason):
                self._ack(delivery)
            else:
                self._nack(delivery, "publish failed")
            return
        delivery = _Delivery(channel.connection, self._generation, method.delivery_tag, properties, body, job)
        self._in_flight[method.delivery_tag] = delivery
        self.metrics.in_flight.set(len(self._in_flight))
        self._jobs.put(delivery)

    def _settle(self, delivery: _Delivery, outcome: _Outcome) -> None:
        """Runs on the connection thread (via add_callback_threadsafe)."""
        if delivery.generation != self._generation or delivery.delivery_tag not in self._in_flight:
            return  # channel gone since: the broker has requeued it
        job = delivery.job
        if isinstance(outcome, _NotStarted):
            if self._consumer_tag is not None and self._holding is None:
                # Stopping or paused: withhold acks so the broker sends nothing more to hand back
                # until the consume loop cancels the consumer (at most one loop turn away).
                self._holding = []
            self._hand_back(delivery, "circuit open" if self._paused.is_set() else "stopping")
            return
        if isinstance(outcome, _Sent):
            self._circuit_closed()
            if outcome.refused and not self._park_refused(delivery, outcome.refused):
                self._nack(delivery, "publish failed")
                return
            self._ack(delivery)
            self.counters.sent += 1
            self.metrics.sent.inc()
            self.metrics.send_duration.observe(outcome.seconds)
            waited = _time_in_queue(job)
            if waited is not None:
                self.metrics.time_in_queue.observe(waited)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("sent", extra={"fields": {"job_id": job.id, "attempts": job.attempts,
                                                    "seconds": round(outcome.seconds, 4)}})
            return
        route = route_failure(job.attempts, outcome.error, self.config.topology.retry)
        if route.action == "requeue":
            self._circuit_failure(delivery, route)
            return
        if route.failure.failure_class == "permanent":
            self._circuit_closed()  # MAIL FROM passed: the relay works, this email is the problem
        if self._route(delivery, route):
            self._ack(delivery)
        else:
            self._nack(delivery, "publish failed")

    def _circuit_failure(self, delivery: _Delivery, route: Route) -> None:
        """A sender-side failure: open (or keep open) the circuit and hand the job back uncounted."""
        now = time.monotonic()
        before = self._circuit
        self._circuit = self._circuit.failure(now)
        self._paused.set()
        if self._consumer_tag is not None and self._holding is None:
            self._holding = []  # no new credit for the broker until the consume loop cancels
        self.metrics.failed.labels("sender").inc()
        self._set_readiness(consuming=False)
        if self._circuit is not before:
            self.metrics.circuit_trips.inc()
            log.error("sender-side SMTP failure: pausing consumption, dead-lettering nothing", extra={"fields": {
                "job_id": delivery.job.id, "error": redact_text(route.failure.detail), "code": route.failure.code,
                "pause_seconds": round(self._circuit.delay, 2), "trips": self._circuit.trips}})
        headers = dict(delivery.properties.headers or {})
        headers[SENDER_FAILURES_HEADER] = _int(headers.get(SENDER_FAILURES_HEADER)) + 1
        headers[LAST_ERROR_HEADER] = redact_text(route.failure.detail)
        self._hand_back(delivery, "sender-side failure", headers)

    def _circuit_closed(self) -> None:
        if self._circuit.opened_at is not None:
            log.info("SMTP circuit closed: the relay accepts mail again", extra={"fields": {
                "trips": self._circuit.trips}})
        self._circuit = self._circuit.success()
        self._paused.clear()

    def _route(self, delivery: _Delivery, route: Route, only: list[str] | None = None) -> bool:
        """Publish the retry or dead-letter copy a route calls for; True once the broker has it."""
        job = delivery.job
        self.metrics.failed.labels(route.failure.failure_class).inc()
        fields = {"job_id": job.id, "attempts": route.attempts, "class": route.failure.failure_class,
                  "code": route.failure.code, "error": redact_text(route.failure.detail),
                  "recipients": len(only) if only else len(job.envelope_recipients)}
        if route.action == "retry":
            assert route.tier is not None
            log.info("send failed; retrying later", extra={"fields": {**fields, "tier": route.tier.name}})
            return self._retry(delivery, route, only)
        assert route.dead_reason is not None
        log.warning("send failed; dead-lettering", extra={"fields": {**fields, "reason": route.dead_reason}})
        return self._dead_letter(delivery, route.dead_reason, route.failure.detail, route.attempts, only)

    def _park_refused(self, delivery: _Delivery, refused: dict[str, tuple[int, str]]) -> bool:
        """The server took the email but refused some recipients: retry or park copies for those only."""
        temporary = sorted(a for a, (code, _) in refused.items() if not 500 <= code < 600)
        permanent = sorted(a for a, (code, _) in refused.items() if 500 <= code < 600)
        for group in (temporary, permanent):
            if not group:
                continue
            code = min(refused[a][0] for a in group)
            detail = f"{code} {refused[group[0]][1]} ({len(group)} of {len(delivery.job.envelope_recipients)} " \
                     "recipients refused)"
            route = route_failure(delivery.job.attempts, code, self.config.topology.retry)
            route = replace(route, failure=replace(route.failure, detail=" ".join(detail.split())))
            if not self._route(delivery, route, only=group):
                return False
        return True

    def _retry(self, delivery: _Delivery, route: Route, only: list[str] | None = None) -> bool:
        assert route.tier is not None
        headers = dict(delivery.properties.headers or {})
        headers[ATTEMPTS_HEADER] = route.attempts
        headers[LAST_ERROR_HEADER] = redact_text(route.failure.detail)
        if only:
            headers[ENVELOPE_HEADER] = list(only)
        if not self._publish_copy(delivery, self.config.topology.retry_queue(route.tier), headers):
            return False
        self.counters.retried += 1
        self.metrics.retried.labels(route.tier.name).inc()
        return True

    def _dead_letter(self, delivery: _Delivery, reason: str, detail: str, attempts: int | None = None,
                     only: list[str] | None = None) -> bool:
        headers = dict(delivery.properties.headers or {})
        headers[DEATH_REASON_HEADER] = reason
        headers[DEATH_DETAIL_HEADER] = redact_text(detail)
        headers["x-dead-lettered-at"] = datetime.now(UTC).isoformat(timespec="seconds")
        headers["x-original-queue"] = self.config.topology.work_queue
        if attempts is not None:
            headers[ATTEMPTS_HEADER] = attempts
        if only:
            headers[ENVELOPE_HEADER] = list(only)
        if not self._publish_copy(delivery, self.config.topology.dead_queue, headers):
            return False
        self.counters.dead += 1
        self.metrics.dead_lettered.labels(reason).inc()
        return True

    def _publish_copy(self, delivery: _Delivery, queue_name: str, headers: dict[str, Any]) -> bool:
        original = delivery.properties
        properties = pika.BasicProperties(
            content_type=original.content_type, content_encoding=original.content_encoding,
            headers=headers, delivery_mode=pika.DeliveryMode.Persistent, priority=original.priority,
            correlation_id=original.correlation_id, reply_to=original.reply_to, message_id=original.message_id,
            timestamp=original.timestamp, type=original.type, app_id=original.app_id)
        try:
            # Confirm mode: returns after the broker has the copy; raises if unroutable or nacked.
            self._channel.basic_publish("", queue_name, delivery.body, properties, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            log.error("could not publish to %s; returning the job to the work queue", queue_name,
                      extra={"fields": {"error": type(exc).__name__, "delivery_tag": delivery.delivery_tag}})
            return False
        return True

    def _hand_back(self, delivery: _Delivery, why: str, headers: dict[str, Any] | None = None) -> None:
        """Return an unsent delivery without spending its delivery-limit budget: publish a fresh
        copy to the work queue (confirmed), then ack. If the broker refuses the copy, nack it
        back instead (counted, but never lost)."""
        if headers is None:
            headers = dict(delivery.properties.headers or {})
        headers.pop("x-delivery-count", None)  # the broker's count; the copy starts afresh
        if not self._publish_copy(delivery, self.config.topology.work_queue, headers):
            self._nack(delivery, f"{why}; hand-back publish failed")
            return
        self._ack(delivery)
        self.counters.requeued += 1
        self.metrics.drain_requeued.inc()
        log.debug("handed back", extra={"fields": {"delivery_tag": delivery.delivery_tag, "why": why}})

    def _ack(self, delivery: _Delivery) -> None:
        self._in_flight.pop(delivery.delivery_tag, None)
        self.metrics.in_flight.set(len(self._in_flight))
        if self._holding is not None:
            self._holding.append((delivery.delivery_tag, True))
        else:
            self._channel.basic_ack(delivery.delivery_tag)

    def _nack(self, delivery: _Delivery, why: str) -> None:
        self._in_flight.pop(delivery.delivery_tag, None)
        self.metrics.in_flight.set(len(self._in_flight))
        if self._holding is not None:
            self._holding.append((delivery.delivery_tag, False))
        else:
            self._channel.basic_nack(delivery.delivery_tag, requeue=True)
        self.counters.requeued += 1
        self.metrics.requeued.inc()
        log.debug("requeued", extra={"fields": {"delivery_tag": delivery.delivery_tag, "why": why}})

    # -- SMTP side (sender threads) ----------------------------------------------------------

    def _sender_loop(self) -> None:
        sender = SmtpSender(self.config.smtp, on_connect=self.metrics.smtp_reconnects.inc)
        try:
            while True:
                delivery = self._jobs.get()
                if delivery is None:
                    return
                outcome = self._send_one(sender, delivery)
                try:
                    delivery.connection.add_callback_threadsafe(functools.partial(self._settle, delivery, outcome))
                except _CONNECTION_ERRORS:
                    pass  # connection closed meanwhile: the broker redelivers this job
        finally:
            sender.close()

    def _send_one(self, sender: SmtpSender, delivery: _Delivery) -> _Outcome:
        if self._paused.is_set():
            return _NotStarted()
        wait = sender.ready_in()
        if wait > 0:
            log.warning("SMTP unavailable; backing off", extra={"fields": {"retry_in_seconds": round(wait, 2)}})
            if self._abort.wait(wait):
                return _NotStarted()
        with self._bucket_lock:
            self._bucket, wait = self._bucket.reserve(time.monotonic())
        if wait > 0 and self._abort.wait(wait):
            return _NotStarted()
        with self._start_lock:
            if self._abort.is_set() or self._paused.is_set() or delivery.generation != self._generation:
                return _NotStarted()
            deadline = self._drain_deadline
            if deadline is not None and time.monotonic() + 1.5 * self._send_estimate > deadline:
                return _NotStarted()  # draining: a send that could outlast the grace period is not begun
            delivery.started = True
        started = time.monotonic()
        try:
            refused = sender.send(delivery.job)
        except Exception as exc:  # classified by routing; nothing escapes the thread
            return _Failed(exc)
        seconds = time.monotonic() - started
        with self._start_lock:  # updated here, so this thread's next start already sees it
            self._send_estimate = seconds if not self._send_estimate else 0.8 * self._send_estimate + 0.2 * seconds
        return _Sent(seconds, refused)


def _time_in_queue(job: EmailJob) -> float | None:
    if job.enqueued_at is not None:
        start = job.enqueued_at
    elif job.created_at is not None:
        start = job.created_at.timestamp()
    else:
        return None
    return max(0.0, time.time() - start)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _describe(exc: BaseException) -> str:
    text = redact_text(str(exc)) or repr(exc)
    return f"{type(exc).__name__}: {text}"


def _close_quietly(connection: Any) -> None:
    try:
        if connection.is_open:
            connection.close()
    except _CONNECTION_ERRORS:
        pass
