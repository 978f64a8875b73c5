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
"""
from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Iterable, Mapping
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


class PublishError(RuntimeError):
    """The broker did not take the message (unroutable, nacked, or unreachable)."""


class QueueFullError(PublishError):
    """The broker nacked the message every time (reject-publish: queue at its length limit)."""


class Publisher:
    def __init__(self, amqp_url: str, queue: str = DEFAULT_PREFIX, *, validate: bool = True,
                 parse_options: ParseOptions = DEFAULT_OPTIONS, declare_topology: Topology | None = None,
                 app_id: str = "email-worker-publisher", nack_retries: int = 3, nack_backoff: float = 0.2) -> None:
        """`queue` is the work queue (the topology prefix). `declare_topology` declares it first."""
        if nack_retries < 0 or nack_backoff < 0:
            raise ValueError("nack_retries and nack_backoff must be >= 0")
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
        if self._channel is None or not self._channel.is_open:
            self.close()
            try:
                # Several nodes: start at a random one, the others tried in turn if it does not answer.
                nodes = brokers.connection_parameters(self.amqp_url, random.randrange(1 << 16))
                self._connection = pika.BlockingConnection(nodes)
            except ValueError as exc:
                raise PublishError(str(exc)) from None
            except (pika.exceptions.AMQPError, OSError) as exc:
                raise PublishError(f"cannot connect to {brokers.display(self.amqp_url)}: "
                                   f"{type(exc).__name__} {redact_text(str(exc))}") from None
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
            if self._topology is not None:
                declare(self._channel, self._topology)
        return self._channel

    def _publish_confirmed(self, body: bytes, properties: pika.BasicProperties) -> None:
        attempt, nacks = 1, 0
        while True:
            channel = self._open()
            try:
                channel.basic_publish("", self.queue, body, properties, mandatory=True)
                return
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
