"""Queue names and the idempotent declaration of the worker's RabbitMQ topology.

    publisher ──► "" ──► {prefix}                 quorum work queue, x-delivery-limit,
                             │  (DLX on poison)        dead-letters to {prefix}.dlx/{prefix}.dead
    worker ── 4xx ─► {prefix}.retry.{10s,60s,..}  TTL queues, dead-letter back to {prefix}
    worker ── 5xx/invalid/exhausted ─► {prefix}.dead

One direct exchange `{prefix}.dlx` routes dead letters: routing key `{prefix}` back to the
work queue (expired retries), `{prefix}.dead` to the dead queue (delivery limit exceeded).
The worker publishes retries and dead letters straight to the queues (default exchange).
Declaring twice with the same settings is a no-op; different settings raise `TopologyError`
naming the queue instead of silently using the old arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
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
    """Redeliveries (crashes, requeues) before the broker dead-letters a poison message."""

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
        }

    def retry_queue_arguments(self, tier: RetryTier) -> dict[str, Any]:
        # Queue-level TTL (one per queue) so messages expire in order, head first.
        return {
            "x-message-ttl": tier.ttl_ms,
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-routing-key": self.work_queue,
        }


def declare(channel: Any, topology: Topology) -> None:
    """Declare exchange, queues and bindings on a pika BlockingChannel (idempotent)."""
    steps: list[tuple[str, Any]] = [
        (f"exchange {topology.dead_letter_exchange}", lambda: channel.exchange_declare(
            topology.dead_letter_exchange, exchange_type="direct", durable=True)),
        (f"queue {topology.dead_queue}", lambda: channel.queue_declare(
            topology.dead_queue, durable=True, arguments={"x-queue-type": "quorum"})),
        (f"queue {topology.work_queue}", lambda: channel.queue_declare(
            topology.work_queue, durable=True, arguments=topology.work_queue_arguments())),
    ]
    for tier in topology.retry.tiers:
        steps.append((f"queue {topology.retry_queue(tier)}", lambda tier=tier: channel.queue_declare(
            topology.retry_queue(tier), durable=True, arguments=topology.retry_queue_arguments(tier))))
    steps += [
        (f"binding {topology.dead_queue}", lambda: channel.queue_bind(
            topology.dead_queue, topology.dead_letter_exchange, routing_key=topology.dead_queue)),
        (f"binding {topology.work_queue}", lambda: channel.queue_bind(
            topology.work_queue, topology.dead_letter_exchange, routing_key=topology.work_queue)),
    ]
    for what, step in steps:
        try:
            step()
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise TopologyError(
                f"cannot declare {what}: {exc.reply_code} {exc.reply_text} "
                "(an existing queue with different arguments must be deleted or renamed first)"
            ) from None
