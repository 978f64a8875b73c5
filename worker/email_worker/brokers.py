"""Several addresses for one broker (the nodes of a RabbitMQ cluster): client-side failover.

`AMQP_URL` (and every `amqp_url` the worker and the publisher take) may list the cluster's
nodes, separated by commas or whitespace::

    amqp://app:secret@rmq-0.rmq:5672/mail, amqp://app:secret@rmq-1.rmq:5672/mail

A client starts at its own place in the list, so a fleet spreads its connections over the
nodes, and tries the next node when one does not answer: what RabbitMQ's clustering guide calls
client-side load balancing, for clusters without a load balancer in front. Quorum queues are
replicated, so any node serves them. The text is only split where the next URL begins (a
scheme and `://`): a comma inside a password stays part of it.

Pure functions, except `connection_parameters`, which builds pika's parameter objects.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import pika

from email_worker.logs import redact_url

_NEXT_URL = re.compile(r"[\s,]+(?=[a-z][a-z0-9+.-]*://)", re.IGNORECASE)  # where the next URL begins
_SCHEME = re.compile(r"^amqps?://", re.IGNORECASE)


def url_list(text: str) -> tuple[str, ...]:
    """The URLs in `text` (one, or several separated by commas or whitespace), in order, split only
    where the next URL's scheme begins; empty parts dropped. Any scheme: callers check theirs."""
    parts = (part.strip().rstrip(",").strip() for part in _NEXT_URL.split(text.strip()))
    return tuple(part for part in parts if part)


def split_urls(text: str) -> tuple[str, ...]:
    """The broker URLs in `text`, in order; ValueError when there is none or one is not AMQP."""
    urls = url_list(text)
    if not urls:
        raise ValueError("no broker URL given")
    for url in urls:
        if not _SCHEME.match(url):
            raise ValueError(f"not an AMQP URL (amqp:// or amqps://): {redact_url(url)}")
    return urls


def rotated(urls: Sequence[str], start: int) -> tuple[str, ...]:
    """`urls` beginning at index `start` (modulo their number), the others after it in order."""
    if not urls:
        return ()
    k = start % len(urls)
    return (*urls[k:], *urls[:k])


def display(text: str) -> str:
    """The URLs with passwords masked, for logs and errors."""
    try:
        return ", ".join(redact_url(url) for url in split_urls(text))
    except ValueError:
        return redact_url(text)


def connection_parameters(text: str, start: int = 0,
                          configure: Callable[[pika.URLParameters], Any] | None = None) -> list[pika.URLParameters]:
    """pika parameters for every URL in `text`, beginning at `start`; pika's BlockingConnection
    tries them in order. `configure` sets what every node shares (heartbeat, timeouts, name).
    ValueError for a malformed list or URL (pika's own message, password masked)."""
    parameters = []
    for url in rotated(split_urls(text), start):
        try:
            params = pika.URLParameters(url)
        except Exception as exc:  # pika raises ValueError, TypeError, KeyError... for a bad URL
            raise ValueError(f"invalid AMQP URL {redact_url(url)}: {type(exc).__name__}") from None
        if configure is not None:
            configure(params)
        parameters.append(params)
    return parameters
