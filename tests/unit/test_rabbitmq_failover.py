"""The operator's management probe over a cluster's nodes (issue #16): the next node answers."""
from __future__ import annotations

from typing import Any, ClassVar

import pytest
import requests

from emailqueue_operator.rabbitmq import BrokerError, ManagementEndpoint, ManagementProbe, http_urls

NODES = "http://rmq-0:15672, http://rmq-1:15672/\nhttps://rmq-2:15671"


def test_http_urls_and_display() -> None:
    assert http_urls(NODES) == ("http://rmq-0:15672", "http://rmq-1:15672", "https://rmq-2:15671")
    assert http_urls("http://one:15672/") == ("http://one:15672",)
    endpoint = ManagementEndpoint(NODES, "u", "p")
    assert endpoint.display == "rmq-0:15672,rmq-1:15672,rmq-2:15671"


class _Answer:
    status_code = 200
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, body: Any) -> None:
        self._body = body

    def json(self) -> Any:
        return self._body


def _probe(down: set[str]) -> tuple[ManagementProbe, list[str]]:
    asked: list[str] = []
    probe = ManagementProbe(ManagementEndpoint(NODES, "u", "p"))

    def get(url: str, **_: Any) -> _Answer:
        asked.append(url)
        if any(url.startswith(node) for node in down):
            raise requests.ConnectionError("connection refused")
        if url.endswith("/api/overview"):
            return _Answer({"disable_stats": False})
        return _Answer([{"name": "emails", "state": "running", "messages_ready": 7, "messages_unacknowledged": 1,
                         "consumers": 2}])

    probe._session.get = get  # type: ignore[method-assign]
    return probe, asked


def test_a_node_down_is_skipped_and_the_one_that_answered_is_asked_first() -> None:
    probe, asked = _probe(down={"http://rmq-0:15672"})
    stats = probe.queue_stats("/", "emails")
    assert (stats.ready, stats.unacked) == (7, 1)
    assert [u.split("/api")[0] for u in asked] == ["http://rmq-0:15672", "http://rmq-1:15672", "http://rmq-1:15672"]
    asked.clear()
    probe._cache.clear()
    probe.queue_stats("/", "emails")
    assert all(u.startswith("http://rmq-1:15672") for u in asked)  # no second try of the dead node


def test_every_node_down_is_blind_not_empty() -> None:
    probe, _ = _probe(down={"http://rmq-0:15672", "http://rmq-1:15672", "https://rmq-2:15671"})
    with pytest.raises(BrokerError, match="unreachable"):
        probe.queue_stats("/", "emails")


def test_an_amqp_uri_list_is_one_endpoint_over_the_nodes() -> None:
    from emailqueue_operator.rabbitmq import AmqpEndpoint, AmqpProbe

    endpoint = AmqpEndpoint.from_uri("amqp://app:s%2Cx@rmq-0/mail, amqp://app:s%2Cx@rmq-1:5673/mail")
    assert endpoint.nodes == (("rmq-0", 5672), ("rmq-1", 5673))
    assert (endpoint.username, endpoint.password, endpoint.vhost) == ("app", "s,x", "mail")
    assert endpoint.display == "rmq-0:5672,rmq-1:5673/mail" and "s,x" not in repr(endpoint)
    probe = AmqpProbe(endpoint)
    assert [(p.host, p.port) for p in probe._parameters()] == [("rmq-0", 5672), ("rmq-1", 5673)]
    probe._failed_connects = 1  # after a failed attempt the next begins at the next node
    assert [p.host for p in probe._parameters()] == ["rmq-1", "rmq-0"]
    with pytest.raises(BrokerError):
        AmqpEndpoint.from_uri("amqp://h0/v, http://h1:15672/")
