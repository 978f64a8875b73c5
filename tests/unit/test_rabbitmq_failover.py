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
