"""Queue names and the idempotent declaration of the worker's RabbitMQ topology.

    publisher ──► "" ──► {prefix}                 quorum work queue, x-delivery-limit,
                             │  (DLX on poison)        dead-letters to {prefix}.dlx/{prefix}.dead
    worker ── 4xx ─► {prefix}.retry.v2.{10s,..}   quorum TTL queues, dead-letter back to {prefix}
    worker ── 5xx/invalid/exhausted ─► {prefix}.dead

Every broker-side hop is at least once: the work queue and the retry tiers are quorum
queues with `x-dead-letter-strategy: at-least-once` (RabbitMQ ≥ 3.10), which keeps a
dead letter in the source queue until the target queue has confirmed it; the strategy
needs `x-overflow: reject-publish` (with drop-head RabbitMQ silently falls back to
at-most-once), so a full queue nacks the publisher instead of dropping its oldest email.

One direct exchange `{prefix}.dlx` routes dead letters: routing key `{prefix}` back to the
work queue (expired retries), `{prefix}.dead` to the dead queue (delivery limit exceeded).
The worker publishes retries and dead letters straight to the queues (default exchange).

v0.1 declared the work queue without the strategy and the retry tiers as classic queues
named `{prefix}.retry.{tier}`. Queue arguments cannot change in place (406
PRECONDITION_FAILED), so `declare` recognises that topology (it redeclares the queue with
the v0.1 arguments: an exact match) and returns it as `Declared.legacy_work_queue` for the
worker to report and keep consuming; the retry tiers have new names, and v0.1's classic
tiers drain by their own TTL into the work queue and are deleted once empty. Any other
mismatch raises `TopologyError` naming the queue instead of silently using old arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions

from email_worker.routing import RetryPolicy, RetryTier

DEFAULT_PREFIX = "emails"
DEFAULT_DELIVERY_LIMIT = 10


class TopologyError(RuntimeError):
    """The broker refused a declaration (usually: the queue exists with other arguments)."""


@dataclass(frozen=True)
class Topology:
    prefix: str = DEFAULT_PREFIX
    """Work queue name; the other names derive from it."""
    retry: RetryPolicy = RetryPolicy()
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    """Crash redeliveries before the broker dead-letters a poison message (drains do not count)."""

    @property
    def work_queue(self) -> str:
        return self.prefix

    @property
    def dead_queue(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    def retry_queue(self, tier: RetryTier) -> str:
        # "v2": v0.1 used {prefix}.retry.{tier} for classic queues, which cannot become quorum in place.
        return f"{self.prefix}.retry.v2.{tier.name}"

    def legacy_retry_queue(self, tier: RetryTier) -> str:
        """The classic retry tier v0.1 declared for this tier (drained, then deleted)."""
        return f"{self.prefix}.retry.{tier.name}"

    @property
    def retry_queues(self) -> tuple[str, ...]:
        return tuple(self.retry_queue(tier) for tier in self.retry.tiers)

    def work_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-routing-key": self.dead_queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def legacy_work_queue_arguments(self) -> dict[str, Any]:
        """What v0.1 declared: the same queue with at-most-once dead-lettering."""
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-routing-key": self.dead_queue,
        }

    def legacy_retry_queue_arguments(self, tier: RetryTier) -> dict[str, Any]:
        """What v0.1 declared for a retry tier: a classic TTL queue (at-most-once expiry hop)."""
        return {
            "x-message-ttl": tier.ttl_ms,
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-routing-key": self.work_queue,
        }

    def retry_queue_arguments(self, tier: RetryTier) -> dict[str, Any]:
        # Queue-level TTL (one per queue) so messages expire in order, head first.
        return {
            "x-queue-type": "quorum",
            "x-message-ttl": tier.ttl_ms,
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-routing-key": self.work_queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }


@dataclass(frozen=True)
class Declared:
    """What `declare` found: the topology is current unless `legacy_work_queue`."""

    legacy_work_queue: bool = False
    """The work queue still has v0.1's arguments (at-most-once dead-lettering); it is consumed anyway."""
    legacy_retry_queues: dict[str, int] = field(default_factory=dict)
    """v0.1 classic retry tiers still holding messages (name → count); they drain by TTL."""
    deleted_legacy_queues: tuple[str, ...] = ()
    """v0.1 classic retry tiers found empty and deleted."""


def declare(channel: Any, topology: Topology) -> Declared:
    """Declare exchange, queues and bindings on a pika BlockingChannel (idempotent).

    Works on channels of its own (a 406 or 404 closes the channel it happens on), so the
    caller's channel stays open. Returns what was found of v0.1's topology.
    """
    state = {"channel": channel.connection.channel()}

    def run(what: str, step: Any) -> None:
        try:
            step(state["channel"])
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise TopologyError(
                f"cannot declare {what}: {exc.reply_code} {exc.reply_text} "
                "(an existing queue with different arguments must be deleted or renamed first)"
            ) from None

    def fresh() -> Any:
        state["channel"] = state["channel"].connection.channel()
        return state["channel"]

    run(f"exchange {topology.dead_letter_exchange}", lambda ch: ch.exchange_declare(
        topology.dead_letter_exchange, exchange_type="direct", durable=True))
    run(f"queue {topology.dead_queue}", lambda ch: ch.queue_declare(
        topology.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}))
    legacy = False
    try:
        state["channel"].queue_declare(topology.work_queue, durable=True, arguments=topology.work_queue_arguments())
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise TopologyError(f"cannot declare queue {topology.work_queue}: {exc.reply_code} {exc.reply_text}") \
                from None
        fresh()
        try:
            state["channel"].queue_declare(topology.work_queue, durable=True,
                                           arguments=topology.legacy_work_queue_arguments())
        except pika.exceptions.ChannelClosedByBroker as again:
            raise TopologyError(
                f"cannot declare queue {topology.work_queue}: {again.reply_code} {again.reply_text} "
                "(neither this version's nor v0.1's arguments match the existing queue: delete or rename it, "
                "see docs/message-contract.md#migrating-from-v01)") from None
        legacy = True
    for tier in topology.retry.tiers:
        run(f"queue {topology.retry_queue(tier)}", lambda ch, tier=tier: ch.queue_declare(
            topology.retry_queue(tier), durable=True, arguments=topology.retry_queue_arguments(tier)))
    run(f"binding {topology.dead_queue}", lambda ch: ch.queue_bind(
        topology.dead_queue, topology.dead_letter_exchange, routing_key=topology.dead_queue))
    run(f"binding {topology.work_queue}", lambda ch: ch.queue_bind(
        topology.work_queue, topology.dead_letter_exchange, routing_key=topology.work_queue))
    draining, deleted = _retire_legacy_tiers(state, fresh, topology)
    if state["channel"].is_open:
        state["channel"].close()
    return Declared(legacy_work_queue=legacy, legacy_retry_queues=draining, deleted_legacy_queues=deleted)


def _retire_legacy_tiers(state: dict[str, Any], fresh: Any,
                         topology: Topology) -> tuple[dict[str, int], tuple[str, ...]]:
    """Delete v0.1's classic retry tiers once empty; report the ones still draining.

    They keep their TTL → DLX → work queue route, so their messages come back on their
    own. `if_empty` makes the delete atomic: a message published meanwhile keeps it alive.
    """
    draining: dict[str, int] = {}
    deleted: list[str] = []
    for tier in topology.retry.tiers:
        name = topology.legacy_retry_queue(tier)
        try:
            count = state["channel"].queue_declare(name, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:  # 404: not there (the usual case)
            fresh()
            continue
        try:
            # Only v0.1's classic tier (exactly its arguments) is ours to delete; a quorum queue
            # would also refuse `if_empty` by closing the whole connection (540).
            state["channel"].queue_declare(name, durable=True, arguments=topology.legacy_retry_queue_arguments(tier))
        except pika.exceptions.ChannelClosedByBroker:  # 406: someone else's queue of that name
            fresh()
            continue
        if count:
            draining[name] = count
            continue
        try:
            state["channel"].queue_delete(name, if_empty=True)
            deleted.append(name)
        except pika.exceptions.ChannelClosedByBroker:  # 406: a message arrived meanwhile
            fresh()
            draining[name] = 1
    return draining, tuple(deleted)


def move_messages(channel: Any, source: str, target: str, limit: int | None = None) -> int:
    """Move messages from `source` to `target` (both queues), at least once; returns the count.

    Each message is published to `target` with confirms and mandatory before it is acked
    in `source`, so a crash in between leaves a duplicate, never a gap. Properties and
    headers are kept (the broker's `x-delivery-count` is dropped: the copy starts afresh).
    Used to migrate v0.1's work queue and to replay dead letters.
    """
    channel = channel.connection.channel()  # our own confirm-mode channel; a 404 closes only it
    channel.confirm_delivery()
    try:
        channel.queue_declare(target, passive=True)  # a missing target is an error, not a silent drop
        channel.queue_declare(source, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise TopologyError(f"cannot move from {source} to {target}: {exc.reply_code} {exc.reply_text}") from None
    moved = 0
    while limit is None or moved < limit:
        method, properties, body = channel.basic_get(source, auto_ack=False)
        if method is None:
            break
        if properties.headers:
            properties.headers.pop("x-delivery-count", None)
        try:
            channel.basic_publish("", target, body, properties, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            channel.basic_nack(method.delivery_tag, requeue=True)
            raise TopologyError(f"cannot move to {target}: broker refused the message ({type(exc).__name__}); "
                                f"{moved} moved so far, the rest is still in {source}") from None
        channel.basic_ack(method.delivery_tag)
        moved += 1
    channel.close()
    return moved
