"""Broker probe helpers that need no broker: URIs, aggregation, management stats."""
from __future__ import annotations

import json
import urllib.parse

import pytest
import requests
import requests.adapters

from emailqueue_operator.rabbitmq import (
    AmqpEndpoint,
    BrokerError,
    ManagementEndpoint,
    ManagementProbe,
    MetricsUnavailable,
    QueueNotFound,
    _Backoff,
    aggregate,
    combine_counts,
    stats_from_management,
)


@pytest.mark.parametrize("uri, host, port, vhost, user, password", [
    # plain URI, default vhost
    ("amqp://u:p@rabbit:5672/", "rabbit", 5672, "/", "u", "p"),
    # percent-encoded special characters in the password and a named vhost
    ("amqp://mail%2Bbot:p%40ss%2F%3Aw%25rd@rabbit.svc/emails%2Fprod", "rabbit.svc", 5672, "emails/prod",
     "mail+bot", "p@ss/:w%rd"),
    # amqps implies TLS and its default port
    ("amqps://u:p@rabbit", "rabbit", 5671, "/", "u", "p"),
])
def test_uri_parsing(uri, host, port, vhost, user, password):
    ep = AmqpEndpoint.from_uri(uri)
    assert (ep.host, ep.port, ep.vhost, ep.username, ep.password) == (host, port, vhost, user, password)
    assert ep.tls.enabled == uri.startswith("amqps")


def test_password_never_in_repr_or_errors():
    ep = AmqpEndpoint.from_uri("amqp://u:s3cr3t@rabbit/")
    assert "s3cr3t" not in repr(ep) and "s3cr3t" not in ep.display
    with pytest.raises(BrokerError) as exc:
        AmqpEndpoint.from_uri("http://u:s3cr3t@rabbit/")
    assert "s3cr3t" not in str(exc.value)
    with pytest.raises(BrokerError) as exc:
        AmqpEndpoint.from_uri("amqp://u:s3cr3t@rabbit:notaport/")
    assert "s3cr3t" not in str(exc.value)


def test_aggregate():
    assert aggregate([1, 2, None, 6], "sum") == 9
    assert aggregate([1, 2, None, 6], "max") == 6
    assert aggregate([1, 2, None, 6], "avg") == 3
    assert aggregate([None], "sum") is None


def test_stats_from_management_aggregates_regex_matches():
    queues = [
        {"name": "emails-a", "messages_ready": 100, "messages_unacknowledged": 8, "consumers": 2,
         "message_stats": {"publish_details": {"rate": 30.0}, "ack_details": {"rate": 20.0}},
         "head_message_timestamp": 990},
        {"name": "emails-b", "messages_ready": 50, "messages_unacknowledged": 2, "consumers": 1,
         "message_stats": {"publish_details": {"rate": 10.0}}},
    ]
    total = stats_from_management(queues, "sum", now=1000.0)
    assert (total.ready, total.unacked, total.consumers) == (150, 10, 3)
    assert total.publish_rate == 40.0 and total.ack_rate == 20.0
    assert total.oldest_age_seconds == 10.0
    assert total.queues == ("emails-a", "emails-b")
    assert stats_from_management(queues, "max", now=1000.0).ready == 100
    assert stats_from_management(queues, "avg", now=1000.0).ready == 75


def _queue(name, ready, unacked):
    return {"name": name, "messages_ready": ready, "messages_unacknowledged": unacked, "consumers": 1}


@pytest.mark.parametrize(("how", "ready", "total"), [
    ("sum", 35, 60),
    # the fullest single queue holds 30 (25 + 5 and 10 + 20 alike): never 25 + 20 = 45
    ("max", 25, 30),
    # KEDA truncates the average: (25 + 10) // 2 = 17 ready, 60 // 2 = 30 in all
    ("avg", 17, 30),
])
def test_several_queues_are_composed_as_keda_composes_them(how, ready, total):
    stats = stats_from_management([_queue("a", 25, 5), _queue("b", 10, 20)], how, now=0.0)
    assert (stats.ready, stats.ready + stats.unacked) == (ready, total)


def test_average_truncates_to_whole_messages():
    stats = stats_from_management([_queue("a", 1, 0), _queue("b", 2, 0)], "avg", now=0.0)
    assert (stats.ready, stats.unacked, stats.consumers) == (1, 0, 1)  # 3 // 2, as Go's integer division


@pytest.mark.parametrize(("pairs", "how", "expected"), [
    ([], "sum", (0, 0)),
    ([(3, 1)], "max", (3, 1)),
    ([(0, 9), (8, 0)], "max", (8, 1)),  # ready 8 from one queue, total 9 from the other
    ([(4, 1), (3, 1)], "avg", (3, 1)),  # 7 // 2 = 3 ready, 9 // 2 = 4 in all
])
def test_combine_counts(pairs, how, expected):
    assert combine_counts(pairs, how) == expected


def test_combine_counts_rejects_an_unknown_aggregate():
    with pytest.raises(ValueError):
        combine_counts([(1, 1)], "median")


def test_queue_without_traffic_has_zero_rates_not_unknown():
    stats = stats_from_management([{"name": "q", "messages_ready": 0, "messages_unacknowledged": 0}], "sum", now=0.0)
    assert stats.publish_rate == 0.0 and stats.ack_rate == 0.0


@pytest.mark.parametrize("queue, why", [
    # management_agent.disable_metrics_collector = true: name, vhost, arguments, no counts
    ({"name": "q", "state": "running"}, "no messages_ready/messages_unacknowledged"),
    ({"name": "q", "messages_ready": 5}, "no messages_unacknowledged"),
    ({"name": "q", "messages_ready": None, "messages_unacknowledged": 0}, "no messages_ready"),
    ({"name": "q", "messages_ready": "7", "messages_unacknowledged": 0}, "no messages_ready"),
    ({"name": "q", "messages_ready": -1, "messages_unacknowledged": 0}, "no messages_ready"),
    # a queue that is not running reports counts that are not live
    ({"name": "q", "state": "down", "messages_ready": 0, "messages_unacknowledged": 0}, "is down"),
    ({"name": "q", "state": "crashed", "messages_ready": 0, "messages_unacknowledged": 0}, "is crashed"),
    ({"name": "q", "state": "minority", "messages_ready": 3, "messages_unacknowledged": 0}, "is minority"),
])
def test_counts_that_are_not_measurements_are_blind_never_zero(queue, why):
    with pytest.raises(MetricsUnavailable, match=why):
        stats_from_management([queue], "sum", now=0.0)


def test_missing_consumers_is_unknown_not_zero():
    stats = stats_from_management(
        [{"name": "q", "state": "running", "messages_ready": 4, "messages_unacknowledged": 1}], "sum", now=0.0)
    assert stats.consumers is None and stats.ready == 4 and stats.unacked == 1


def test_backoff_spaces_attempts():
    now = [0.0]
    backoff = _Backoff(base=1.0, cap=8.0, clock=lambda: now[0])
    backoff.check("b")  # nothing failed yet
    for expected_wait in (1, 2, 4, 8, 8):
        backoff.failed("ConnectionRefused")
        with pytest.raises(BrokerError, match="next attempt"):
            backoff.check("b")
        now[0] += expected_wait
        backoff.check("b")
    backoff.succeeded()
    backoff.check("b")


def test_queue_totals_without_collector_are_counts_only():
    # /api/queues?disable_stats=true&enable_queue_totals=true on a broker without its collector
    queue = {"name": "q", "state": "running", "messages": 7, "messages_ready": 7, "messages_unacknowledged": 0}
    stats = stats_from_management([queue], "sum", now=0.0, with_rates=False)
    assert (stats.ready, stats.unacked) == (7, 0)
    assert stats.consumers is None and stats.publish_rate is None and stats.ack_rate is None
    assert stats.oldest_age_seconds is None and stats.source == "management-totals"


def test_live_state_of_a_broker_without_collector_is_not_a_dead_queue():
    with pytest.raises(MetricsUnavailable, match="next statistics tick"):
        stats_from_management([{"name": "q", "state": "live"}], "sum", now=0.0)


class _Api(requests.adapters.BaseAdapter):
    """A management API answering from memory: /api/overview and /api/queues/<vhost>."""

    def __init__(self, queues):
        super().__init__()
        self.queues, self.paths = queues, []

    def send(self, request, **kwargs):
        path = urllib.parse.urlsplit(request.url).path
        self.paths.append(path)
        body = {"disable_stats": False} if path.endswith("/api/overview") else self.queues
        resp = requests.Response()
        resp.status_code, resp.request, resp.url = 200, request, request.url
        resp._content = json.dumps(body).encode()
        resp.headers["Content-Type"] = "application/json"
        return resp

    def close(self):
        pass


def _management(queues, url="http://rabbit:15672"):
    api = _Api(queues)
    probe = ManagementProbe(ManagementEndpoint(url, "u", "p"), cache_seconds=0.0)
    probe._session.mount("http://", api)
    return probe, api


def test_management_regex_is_searched_like_rabbitmq_use_regex():
    queues = [_queue("emails-eu", 3, 0), _queue("bulk-EMAILS", 4, 0), _queue("other", 100, 0)]
    probe, _ = _management(queues)
    stats = probe.queue_stats("/", queue_regex="emails")
    assert stats.queues == ("bulk-EMAILS", "emails-eu") and stats.ready == 7
    assert probe.queue_stats("/", queue_regex="^emails").queues == ("emails-eu",)


def test_management_regex_matching_nothing_is_blind_not_zero():
    probe, _ = _management([_queue("other", 0, 0)])
    with pytest.raises(QueueNotFound, match="no queue matches"):
        probe.queue_stats("/", queue_regex="^emails")


def test_management_url_path_prefix_and_vhost_quoting():
    probe, api = _management([_queue("q", 1, 0)], url="http://rabbit:15672/rabbitmq/")
    probe.queue_stats("/", queue="q")
    assert api.paths[-1] == "/rabbitmq/api/queues/%2F"


class _FakeProbe:
    def __init__(self, endpoint):
        self.endpoint, self.closed = endpoint, False

    def close(self):
        self.closed = True


def test_pool_closes_probes_nobody_asks_for_any_more():
    """A rotated password is a new endpoint: the old probe (and its socket) goes once idle."""
    from emailqueue_operator import rabbitmq

    now = [0.0]
    pool = rabbitmq.BrokerPool(idle_seconds=300.0, clock=lambda: now[0])
    old = pool._get("amqp", AmqpEndpoint("h", 5672, "/", "u", "old-pw"), _FakeProbe)
    for _ in range(10):  # polls with the new password only
        now[0] += 60.0
        new = pool._get("amqp", AmqpEndpoint("h", 5672, "/", "u", "new-pw"), _FakeProbe)
    assert old.closed and not new.closed
    assert pool._get("amqp", AmqpEndpoint("h", 5672, "/", "u", "new-pw"), _FakeProbe) is new
    pool.close()
    assert new.closed
