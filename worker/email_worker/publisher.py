"""Publishing email jobs: the library call applications use to enqueue mail.

`Publisher.publish(job)` validates the job against the message contract (so a producer
learns about a bad job at once, not from the dead queue), fills in `id` and `created_at`
when missing, and publishes it persistent (delivery_mode 2) with `message_id`,
`timestamp` and content type set, in confirm mode: it returns only after the broker has
the message, and raises `PublishError` otherwise. One connection per Publisher (not
thread-safe; one per thread). A dropped connection is re-opened once per publish.

A nack is never silent: the work queue is declared with `x-overflow: reject-publish`, so
a full queue (a `max-length` policy) or a broker that cannot store the message answers
with a nack. The publisher retries a nack `nack_retries` times with a doubling pause
(`nack_backoff` first), then raises `PublishError` (`QueueFullError` subclass), so the
application knows the email was not enqueued.

A resource alarm (RabbitMQ low on disk or memory) blocks publishers: the broker answers
the first publish with `connection.blocked` and reads nothing more from the connection
until `connection.unblocked`. `Publisher.blocked` then holds the broker's reason ("low on
disk"), and a publish waits at most `blocked_timeout` seconds (pika's
`blocked_connection_timeout`) for the alarm to clear before raising `BrokerBlockedError`.
While blocked, no email is sent: a probe (an unroutable publish the broker drops) waits
for the alarm instead, so a publish that gives up leaves nothing behind. Only the publish
that meets a fresh alarm has already sent its email; if that one times out it is
unconfirmed (`BrokerBlockedError.sent`): the broker holds it unread and enqueues it if the
alarm clears, so publishing it again may duplicate it (same message_id), never lose it.
"""
from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import pika
import pika.exceptions

from email_worker import brokers
from email_worker.logs import redact_text
from email_worker.message import DEFAULT_OPTIONS, ParseOptions, parse_message
from email_worker.topology import DEFAULT_PREFIX, Topology, declare

log = logging.getLogger("email_worker.publisher")
CONTENT_TYPE = "application/json"
BLOCKED_PROBE_KEY = "email-worker.publisher.blocked-probe"
"""Routing key of the probe sent while blocked: no queue has this name, so the broker drops it."""


class PublishError(RuntimeError):
    """The broker did not take the message (unroutable, nacked, or unreachable)."""


class QueueFullError(PublishError):
    """The broker nacked the message every time (reject-publish: queue at its length limit)."""


class BrokerBlockedError(PublishError):
    """RabbitMQ blocked publishing (a disk or memory alarm) longer than `blocked_timeout`.

    `sent` is False when the email never left the publisher (the usual case: it was not
    enqueued). It is True only for the publish that met a fresh alarm: that email is
    unconfirmed and the broker may still enqueue it when the alarm clears."""

    def __init__(self, message: str, *, reason: str, sent: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.sent = sent


def watch_blocked(connection: Any, on_blocked: Callable[[str], None], on_unblocked: Callable[[], None]) -> None:
    """Call `on_blocked(reason)` / `on_unblocked()` as soon as `connection.blocked` /
    `connection.unblocked` arrive on a pika BlockingConnection.

    BlockingConnection's own add_on_connection_blocked_callback queues the callback for
    the next process_data_events, which never runs while basic_publish waits for the
    confirm the alarm withholds: the moment it matters. So the callbacks go on the
    connection pika drives underneath (same method, same frames), which calls them during
    any I/O. They run inside pika's I/O loop: they must not call pika."""
    impl = connection._impl  # pika.SelectConnection under the BlockingConnection (pika 1.x)
    impl.add_on_connection_blocked_callback(
        lambda _connection, frame: on_blocked(redact_text(str(frame.method.reason or "")) or "unknown"))
    impl.add_on_connection_unblocked_callback(lambda _connection, _frame: on_unblocked())


class Publisher:
    def __init__(self, amqp_url: str, queue: str = DEFAULT_PREFIX, *, validate: bool = True,
                 parse_options: ParseOptions = DEFAULT_OPTIONS, declare_topology: Topology | None = None,
                 app_id: str = "email-worker-publisher", nack_retries: int = 3, nack_backoff: float = 0.2,
                 blocked_timeout: float = 30.0) -> None:
        """`queue` is the work queue (the topology prefix). `declare_topology` declares it first.

        `blocked_timeout`: how long a publish waits for a resource alarm to clear before
        raising `BrokerBlockedError` (seconds, > 0). Long enough to ride out a brief alarm,
        short enough that a request thread does not hang: an alarm lasts until an operator
        frees disk or memory."""
        if nack_retries < 0 or nack_backoff < 0:
            raise ValueError("nack_retries and nack_backoff must be >= 0")
        if not blocked_timeout > 0:
            raise ValueError("blocked_timeout must be > 0")
        self.blocked_timeout = float(blocked_timeout)
        self.nack_retries = nack_retries
        self.nack_backoff = nack_backoff
        self.amqp_url = amqp_url
        self.queue = queue
        self.validate = validate
        self.parse_options = parse_options
        self.app_id = app_id
        self._topology = declare_topology
        self._connection: Any = None
        self._channel: Any = None
        self._blocked: str | None = None

    @property
    def blocked(self) -> str | None:
        """None, or the reason the broker gave for blocking publishers ("low on disk").

        Set from `connection.blocked`, cleared by `connection.unblocked` or by a confirm
        (proof the broker reads again); it outlives a connection pika dropped while blocked."""
        return self._blocked

    def __repr__(self) -> str:
        return f"Publisher({brokers.display(self.amqp_url)!r}, queue={self.queue!r})"

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def publish(self, job: Mapping[str, Any]) -> str:
        """Enqueue one job (a dict following the message contract); returns its id."""
        body, properties, job_id = self._prepare(job)
        self._publish_confirmed(body, properties)
        return job_id

    def publish_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Enqueue jobs in order; stops at the first failure (earlier ones stay published)."""
        return [self.publish(job) for job in jobs]

    def publish_raw(self, body: bytes, properties: pika.BasicProperties | None = None) -> None:
        """Publish bytes as they are, unvalidated (tests, replaying dead letters)."""
        self._publish_confirmed(body, properties or pika.BasicProperties(delivery_mode=2))

    def close(self) -> None:
        if self._connection is not None:
            connection, self._connection, self._channel = self._connection, None, None
            try:
                if connection.is_open:
                    connection.close()
            except (pika.exceptions.AMQPError, OSError):
                pass

    # -- internals ---------------------------------------------------------------------------

    def _prepare(self, job: Mapping[str, Any]) -> tuple[bytes, pika.BasicProperties, str]:
        document = dict(job)
        document.setdefault("id", uuid.uuid4().hex)
        document.setdefault("created_at", datetime.now(UTC).isoformat(timespec="milliseconds"))
        body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=pika.DeliveryMode.Persistent,
            message_id=str(document["id"]), timestamp=int(time.time()), app_id=self.app_id)
        if self.validate:
            parse_message(body, properties, self.parse_options)  # raises InvalidMessage
        return body, properties, str(document["id"])

    def _open(self) -> Any:
        if self._blocked is not None and self._channel is not None and self._channel.is_open:
            try:
                self._connection.process_data_events(time_limit=0)  # fires pika's blocked timer if due
            except (pika.exceptions.AMQPError, OSError):
                self.close()
        if self._channel is None or not self._channel.is_open:
            self.close()

            def configure(params: pika.URLParameters) -> None:
                # pika drops a connection blocked this long: a publish waiting on it raises
                # ConnectionBlockedTimeout instead of hanging until the alarm clears.
                params.blocked_connection_timeout = self.blocked_timeout

            try:
                # Several nodes: start at a random one, the others tried in turn if it does not answer.
                nodes = brokers.connection_parameters(self.amqp_url, random.randrange(1 << 16), configure)
                self._connection = pika.BlockingConnection(nodes)
            except ValueError as exc:
                raise PublishError(str(exc)) from None
            except (pika.exceptions.AMQPError, OSError) as exc:
                raise PublishError(f"cannot connect to {brokers.display(self.amqp_url)}: "
                                   f"{type(exc).__name__} {redact_text(str(exc))}") from None
            watch_blocked(self._connection, self._on_blocked, self._on_unblocked)
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
            if self._topology is not None:
                declare(self._channel, self._topology)
        return self._channel

    def _on_blocked(self, reason: str) -> None:
        if self._blocked is None:
            log.warning("broker blocks publishing (resource alarm): publishes wait for it to clear, then fail",
                        extra={"fields": {"reason": reason, "broker": brokers.display(self.amqp_url),
                                          "blocked_timeout_seconds": self.blocked_timeout}})
        self._blocked = reason

    def _on_unblocked(self) -> None:
        if self._blocked is not None:
            log.info("broker accepts publishes again", extra={"fields": {
                "reason": self._blocked, "broker": brokers.display(self.amqp_url)}})
        self._blocked = None

    def _await_unblocked(self, channel: Any) -> None:
        """Known blocked: send a probe the broker drops instead of the email. Its confirm means
        the broker reads this connection again; pika's blocked_connection_timeout bounds the wait
        (ConnectionBlockedTimeout, with nothing of the email sent)."""
        # Not empty: RabbitMQ blocks a connection after reading a content header, so an empty
        # body would complete (and be confirmed) before the block; a body waits for the alarm.
        channel.basic_publish("", BLOCKED_PROBE_KEY, b"probe", pika.BasicProperties(app_id=self.app_id))
        self._on_unblocked()

    def _blocked_error(self, sent: bool) -> BrokerBlockedError:
        reason = self._blocked or "unknown"
        if sent:
            outcome = ("the email was NOT confirmed, so it is not known to be enqueued: the broker holds it "
                       "unread and may enqueue it when the alarm clears (publishing it again may duplicate it, "
                       "same message_id)")
        else:
            outcome = "the email was NOT enqueued (nothing was sent); publish it again once the alarm clears"
        return BrokerBlockedError(
            f"broker {brokers.display(self.amqp_url)} blocks publishing ({reason}) and did not unblock within "
            f"{self.blocked_timeout:g}s: {outcome}", reason=reason, sent=sent)

    def _publish_confirmed(self, body: bytes, properties: pika.BasicProperties) -> None:
        attempt, nacks = 1, 0
        while True:
            channel = self._open()
            try:
                if self._blocked is not None:
                    try:
                        self._await_unblocked(channel)
                    except pika.exceptions.ConnectionBlockedTimeout:
                        self.close()
                        raise self._blocked_error(sent=False) from None
                channel.basic_publish("", self.queue, body, properties, mandatory=True)
                self._on_unblocked()  # a confirm: the broker reads this connection
                return
            except pika.exceptions.ConnectionBlockedTimeout:
                # The alarm began with this publish: the email is on the wire, unconfirmed.
                self._on_blocked(self._blocked or "unknown")
                self.close()
                raise self._blocked_error(sent=True) from None
            except pika.exceptions.UnroutableError:
                raise PublishError(f"queue {self.queue!r} does not exist (run `email-worker declare`)") from None
            except pika.exceptions.NackError:
                nacks += 1
                if nacks > self.nack_retries:
                    raise QueueFullError(
                        f"broker refused the message {nacks} times (nack): queue {self.queue!r} is full "
                        "(x-overflow reject-publish) or cannot store it; it was NOT enqueued") from None
                delay = self.nack_backoff * 2 ** (nacks - 1)
                log.warning("broker nacked the message; retrying", extra={"fields": {
                    "queue": self.queue, "nacks": nacks, "retry_in_seconds": delay}})
                self._connection.sleep(delay)
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError,
                    pika.exceptions.ConnectionWrongStateError, OSError) as exc:
                self.close()
                if attempt == 2:
                    raise PublishError(f"publish failed: {type(exc).__name__} {redact_text(str(exc))}") from None
                attempt += 1
                log.warning("publisher connection lost; reconnecting once")
