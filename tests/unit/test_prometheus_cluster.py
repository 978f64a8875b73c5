"""The Prometheus source over a cluster's nodes, without a broker (issue #16).

`/metrics/detailed` on a node reports a queue only while its leader is on that node, so the
probe scrapes every node and merges: a queue is read where it is reported, a node that did not
answer makes a missing queue blind (never QueueNotFound, never zero), a queue two nodes report
while its leader moves is taken once, and counters are compared per node so a leader move
never gives a negative or a giant rate.
"""
from __future__ import annotations

import pytest
import requests

from emailqueue_operator.poller import prometheus_endpoint
from emailqueue_operator.rabbitmq import BrokerAuthError, BrokerError, BrokerPool, QueueNotFound
from emailqueue_operator.rabbitmq_prometheus import (
    PER_CHANNEL_COUNTERS,
    PER_QUEUE_COUNTERS,
    ClusterBlind,
    ClusterCounterAccumulator,
    CounterAccumulator,
    PrometheusClusterProbe,
    PrometheusEndpoint,
    PrometheusProbe,
    Scrape,
    cluster_stats,
    merge_gauges,
    parse_scrape,
)
from emailqueue_operator.spec import parse_spec

from .test_poller_endpoints import Secrets
from .test_rabbitmq_prometheus import SECRET, _Static

A, B, C = "rabbit-a:15692", "rabbit-b:15692", "rabbit-c:15692"
ACKED = "rabbitmq_detailed_queue_messages_acked_total"


def _node(queues: dict[str, tuple[float, float, float]] | None = None, acked: dict[str, float] | None = None,
          vhost: str = "v") -> str:
    """A 4.x node's /metrics/detailed: the gauges of the queues it leads, per-queue counters."""
    queues = queues or {}
    lines = []
    for name, index in (("rabbitmq_detailed_queue_messages_ready", 0), ("rabbitmq_detailed_queue_messages_unacked", 1),
                        ("rabbitmq_detailed_queue_consumers", 2)):
        lines.append(f"# TYPE {name} gauge")
        lines += [f'{name}{{vhost="{vhost}",queue="{q}"}} {g[index]}' for q, g in queues.items()]
    for source in PER_QUEUE_COUNTERS.values():
        for sample in source.samples:
            lines.append(f"# TYPE {sample} counter")
    lines += [f'{ACKED}{{vhost="{vhost}",queue="{q}"}} {value}' for q, value in (acked or {}).items()]
    return "\n".join(lines) + "\n"


def _scrape(queues: dict[str, tuple[float, float, float]] | None = None, acked: dict[str, float] | None = None
            ) -> Scrape:
    return parse_scrape(_node(queues, acked), unhosted_counters=True)


def _stats(scrapes, failures=None, accumulator=None, queue="emails", regex=None, now=0.0, window=10.0):
    return cluster_stats(scrapes, failures or {}, accumulator or ClusterCounterAccumulator(), "v",
                         None if regex else queue, regex, "sum", now, window)


def _down(node: str) -> BrokerError:
    return BrokerError(f"Prometheus endpoint {node} unreachable (ConnectTimeout)")


# --- gauges: where the queue is reported ----------------------------------------------

def test_leader_on_a_then_on_b_reads_the_queue_both_times():
    before = {A: _scrape({"emails": (10, 2, 3)}), B: _scrape(), C: _scrape()}
    after = {A: _scrape(), B: _scrape({"emails": (12, 1, 3)}), C: _scrape()}
    assert (_stats(before).ready, _stats(before).unacked) == (10, 2)
    assert (_stats(after).ready, _stats(after).unacked, _stats(after).consumers) == (12, 1, 3)


def test_node_down_and_the_queue_on_a_survivor_is_read():
    # the leader's node died; a survivor was elected and reports the queue
    stats = _stats({B: _scrape({"emails": (40, 0, 2)}), C: _scrape()}, {A: _down(A)})
    assert stats.ready == 40 and stats.source == "prometheus"


def test_node_down_and_the_queue_nowhere_else_is_blind_not_not_found():
    # before the new leader is elected (or a classic queue on the dead node): it may exist
    with pytest.raises(ClusterBlind) as exc:
        _stats({B: _scrape(), C: _scrape({"other": (1, 0, 0)})}, {A: _down(A)})
    assert not isinstance(exc.value, QueueNotFound)
    assert isinstance(exc.value, BrokerError) and exc.value.reason == "NodesUnreachable"
    assert A in str(exc.value) and "not answering" in str(exc.value)


def test_absent_on_every_node_that_all_answered_is_not_found():
    with pytest.raises(QueueNotFound, match="queue 'emails' not found in vhost 'v'"):
        _stats({A: _scrape(), B: _scrape({"other": (1, 0, 0)}), C: _scrape()})


def test_no_node_answering_is_a_broker_error_and_keeps_a_shared_class():
    with pytest.raises(BrokerError, match="no node of the cluster answered") as exc:
        _stats({}, {A: _down(A), B: _down(B)})
    assert A in str(exc.value) and B in str(exc.value)
    with pytest.raises(BrokerAuthError):  # every node refused the credentials: an auth problem, said so
        _stats({}, {A: BrokerAuthError("a: HTTP 401"), B: BrokerAuthError("b: HTTP 401")})


@pytest.mark.parametrize(("reports", "taken"), [
    # leader moving mid-round: both nodes report it; the higher backlog is taken, never the sum
    ({A: (5, 0, 1), B: (7, 1, 1)}, (B, 7, 1)),
    ({A: (9, 1, 1), B: (7, 1, 1)}, (A, 9, 1)),
    # a tie: the first node in the Secret's list, so repeated rounds agree
    ({B: (7, 1, 1), A: (7, 1, 1)}, (B, 7, 1)),
    # a node with a gauge missing loses to one with all three, even with fewer messages
    ({A: (50, None, 1), B: (7, 1, 1)}, (B, 7, 1)),
])
def test_a_queue_reported_twice_is_taken_once(reports, taken):
    def text(gauges):
        ready, unacked, consumers = gauges
        lines = [f'rabbitmq_detailed_queue_messages_ready{{vhost="v",queue="emails"}} {ready}',
                 f'rabbitmq_detailed_queue_consumers{{vhost="v",queue="emails"}} {consumers}']
        if unacked is not None:
            lines.append(f'rabbitmq_detailed_queue_messages_unacked{{vhost="v",queue="emails"}} {unacked}')
        return "\n".join(lines) + "\n"

    scrapes = {node: parse_scrape(text(gauges)) for node, gauges in reports.items()}
    node, metrics = merge_gauges(scrapes)[("v", "emails")]
    assert (node, metrics.ready, metrics.unacked) == taken


def test_regex_sums_distinct_queues_each_once():
    # emails-1 on A, emails-2 on B, emails-1 also (still) on C mid-move: 10 + 4, not 10 + 4 + 9
    scrapes = {A: _scrape({"emails-1": (10, 0, 1)}), B: _scrape({"emails-2": (4, 0, 1)}),
               C: _scrape({"emails-1": (9, 0, 1)})}
    stats = _stats(scrapes, regex="emails-.*")
    assert stats.ready == 14 and sorted(stats.queues) == ["emails-1", "emails-2"]


def test_regex_matching_nothing_with_a_node_down_is_blind():
    with pytest.raises(ClusterBlind, match=r"no queue matches 'emails-\.\*'"):
        _stats({B: _scrape()}, {A: _down(A)}, regex="emails-.*")


# --- counters: per node, so a leader move is reset-safe ---------------------------------

def _rounds(accumulator, rounds):
    for t, scrapes in rounds:
        accumulator.observe(t, scrapes)


def test_leader_move_gives_neither_a_negative_nor_a_giant_rate():
    # 10 acks/s on A; the leader moves to B, whose counter holds history of its own (5000: it led
    # the queue before); then 10 acks/s on B. Per node, B's first report is a baseline.
    rounds = [(0, {A: _scrape({"emails": (1, 0, 1)}, {"emails": 1000}), B: _scrape()}),
              (10, {A: _scrape({"emails": (1, 0, 1)}, {"emails": 1100}), B: _scrape()}),
              (20, {A: _scrape(), B: _scrape({"emails": (1, 0, 1)}, {"emails": 5000})}),
              (30, {A: _scrape(), B: _scrape({"emails": (1, 0, 1)}, {"emails": 5100})})]
    per_node = ClusterCounterAccumulator()
    rates = []
    for t, scrapes in rounds:
        per_node.observe(t, scrapes)
        rates.append(per_node.rate("v", "emails", "ack", t, 10))
    assert rates == [None, 10.0, 0.0, 10.0]  # the move's window undercounts once, never overcounts

    # The same rounds merged into one series (what a load-balanced URL amounts to): a giant rate.
    merged = CounterAccumulator()
    for t, scrapes in rounds:
        reporting = [s for s in scrapes.values() if s.queues]
        merged.observe(t, Scrape(queues=dict(reporting[0].queues), counter_families=reporting[0].counter_families))
    assert merged.rate("v", "emails", "ack", 20, 10) == 390.0


def test_leader_move_to_a_fresh_counter_is_not_negative():
    # B's counter starts near 0 on the move: a single merged series would read 1100 → 30 as a
    # reset; per node it is a baseline, and the rate never goes below 0.
    acc = ClusterCounterAccumulator()
    _rounds(acc, [(0, {A: _scrape({"emails": (1, 0, 1)}, {"emails": 1000})}),
                  (10, {A: _scrape({"emails": (1, 0, 1)}, {"emails": 1100})}),
                  (20, {B: _scrape({"emails": (1, 0, 1)}, {"emails": 30})}),
                  (30, {B: _scrape({"emails": (1, 0, 1)}, {"emails": 130})})])
    samples = acc.samples("v", "emails", "ack")
    assert [total for _, total in samples] == [0, 100, 100, 200]  # monotonic
    assert acc.rate("v", "emails", "ack", 30, 10) == 10.0


def test_duplicate_report_mid_move_counts_each_node_against_itself():
    # A and B both report the queue for a round; each node's series is compared with its own
    acc = ClusterCounterAccumulator()
    _rounds(acc, [(0, {A: _scrape({"emails": (1, 0, 1)}, {"emails": 100}), B: _scrape()}),
                  (10, {A: _scrape({"emails": (1, 0, 1)}, {"emails": 150}),
                        B: _scrape({"emails": (1, 0, 1)}, {"emails": 40})}),
                  (20, {A: _scrape(), B: _scrape({"emails": (1, 0, 1)}, {"emails": 90})})])
    assert [total for _, total in acc.samples("v", "emails", "ack")] == [0, 50, 100]


def test_a_node_back_from_an_outage_is_a_baseline_not_a_spike():
    # A misses a round; its counter grew meanwhile: that growth is not put into one interval
    acc = ClusterCounterAccumulator()
    _rounds(acc, [(0, {A: _scrape({"emails": (1, 0, 1)}, {"emails": 100}), B: _scrape({"x": (0, 0, 0)})}),
                  (10, {B: _scrape({"x": (0, 0, 0)})}),
                  (20, {A: _scrape({"emails": (1, 0, 1)}, {"emails": 900}), B: _scrape({"x": (0, 0, 0)})}),
                  (30, {A: _scrape({"emails": (1, 0, 1)}, {"emails": 1000}), B: _scrape({"x": (0, 0, 0)})})])
    assert acc.rate("v", "emails", "ack", 20, 10) is None  # the track restarted: unknown, not 80/s
    assert acc.rate("v", "emails", "ack", 30, 10) == 10.0


CHANNEL_310 = """\
# TYPE rabbitmq_detailed_queue_messages_ready gauge
# TYPE rabbitmq_detailed_queue_messages_unacked gauge
# TYPE rabbitmq_detailed_queue_consumers gauge
# TYPE rabbitmq_detailed_channel_get_ack_total counter
# TYPE rabbitmq_detailed_channel_get_total counter
# TYPE rabbitmq_detailed_channel_messages_delivered_ack_total counter
# TYPE rabbitmq_detailed_channel_messages_delivered_total counter
# TYPE rabbitmq_detailed_channel_messages_acked_total counter
# TYPE rabbitmq_detailed_queue_messages_published_total counter
rabbitmq_detailed_queue_messages_published_total{{channel="<0.9.0>",queue_vhost="v",queue="emails",exchange_vhost="v",exchange=""}} {published}
"""  # noqa: E501


def test_310_channel_counters_on_a_node_without_the_queue_count():
    # 3.10 counts per channel, on the channel's node: a publisher connected to C publishes into
    # the queue A leads. C reports no gauge of it, and its counters still make the rate.
    leader = _node({"emails": (5, 0, 1)}).replace("queue_exchange_messages_published_total",
                                                   "queue_messages_published_total_unused")
    acc = ClusterCounterAccumulator()
    for t, published in ((0, 100), (10, 300)):
        scrapes = {A: parse_scrape(leader, unhosted_counters=True),
                   C: parse_scrape(CHANNEL_310.format(published=published), unhosted_counters=True)}
        assert scrapes[C].counter_families["publish"] == PER_CHANNEL_COUNTERS["publish"].family
        acc.observe(t, scrapes)
    assert _stats(scrapes, accumulator=acc, now=10).publish_rate == 20.0
    # without asking, a single node's parse keeps ignoring them (unchanged single-URL behaviour)
    assert parse_scrape(CHANNEL_310.format(published=1)).unhosted_counters == {}


# --- the endpoint and the probe -------------------------------------------------------

def test_a_list_of_urls_is_a_cluster_and_one_url_stays_a_single_probe():
    listed = PrometheusEndpoint("http://rabbit-a:15692, http://rabbit-b:15692/\nhttp://rabbit-c:15692", "op", SECRET)
    assert listed.display == f"{A},{B},{C}"
    assert [node.url for node in listed.nodes] == ["http://rabbit-a:15692", "http://rabbit-b:15692",
                                                   "http://rabbit-c:15692"]
    assert all(node.password == SECRET and node.username == "op" for node in listed.nodes)
    probe = listed.open_probe()
    assert isinstance(probe, PrometheusClusterProbe) and len(probe.nodes) == 3
    probe.close()
    assert isinstance(PrometheusEndpoint("http://rabbit-a:15692").open_probe(), PrometheusProbe)
    # the same node twice is one node
    assert isinstance(PrometheusEndpoint("http://rabbit-a:15692,http://rabbit-a:15692/").open_probe(),
                      PrometheusProbe)


@pytest.mark.parametrize("url", [f"http://rabbit-a:15692, http://op:{SECRET}@rabbit-b:15692",
                                 "http://rabbit-a:15692, amqp://rabbit-b:5672"])
def test_a_bad_url_in_the_list_is_refused_without_echoing_it(url):
    with pytest.raises(BrokerError) as exc:
        PrometheusEndpoint(url)
    assert SECRET not in str(exc.value)


def _cluster(bodies: dict[str, _Static], now: list[float]) -> PrometheusClusterProbe:
    endpoint = PrometheusEndpoint(",".join(f"http://{node}" for node in bodies), "op", SECRET)
    probe = PrometheusClusterProbe(endpoint, clock=lambda: now[0])
    for node, adapter in zip(probe.nodes, bodies.values(), strict=True):
        node._session.mount("http://", adapter)
    return probe


def test_probe_reads_through_survivors_and_backs_off_the_dead_node_alone():
    now = [0.0]
    dead = _Static(200, "", error=requests.ConnectTimeout("http://op:secret@rabbit-a"))
    live_b, live_c = _Static(200, _node({"emails": (8, 1, 2)})), _Static(200, _node())
    probe = _cluster({A: dead, B: live_b, C: live_c}, now)
    stats = probe.queue_stats("v", "emails")
    assert (stats.ready, stats.unacked, stats.consumers) == (8, 1, 2)
    assert probe.queue_stats("v", "emails").ready == 8 and len(live_b.sent) == 1  # one round per cache period
    now[0] = 1.2  # its 1 s backoff is over: asked again, fails again, now 2 s
    probe.queue_stats("v", "emails")
    now[0] = 2.5  # inside the dead node's backoff: only the live nodes are asked
    assert probe.queue_stats("v", "emails").ready == 8
    assert (len(dead.sent), len(live_b.sent), len(live_c.sent)) == (2, 3, 3)
    assert all(SECRET not in str(sent.url) for sent in dead.sent)
    probe.close()


def test_probe_blind_when_the_queue_is_on_no_answering_node():
    now = [0.0]
    probe = _cluster({A: _Static(200, "", error=requests.ConnectionError("refused")),
                      B: _Static(200, _node()), C: _Static(503, "busy")}, now)
    with pytest.raises(ClusterBlind) as exc:
        probe.queue_stats("v", "emails")
    assert A in str(exc.value) and C in str(exc.value) and SECRET not in str(exc.value)
    probe.close()


def test_probe_rates_across_a_leader_move():
    now = [0.0]
    a, b = _Static(200, _node({"emails": (3, 0, 1)}, {"emails": 100})), _Static(200, _node())
    probe = _cluster({A: a, B: b}, now)
    rates = []
    for t, on_a, on_b in ((0, 100, None), (10, 200, None), (20, None, 7000), (30, None, 7100)):
        now[0] = t
        a.body = _node({"emails": (3, 0, 1)}, {"emails": on_a}) if on_a is not None else _node()
        b.body = _node({"emails": (3, 0, 1)}, {"emails": on_b}) if on_b is not None else _node()
        rates.append(probe.queue_stats("v", "emails", window_seconds=10).ack_rate)
    assert rates == [None, 10.0, 0.0, 10.0]
    probe.close()


def test_the_secrets_node_list_gives_the_pool_a_cluster_probe():
    # The Secret's value as a user writes it (comma and newline separated, trailing slash)
    spec = parse_spec({"scaleTargetRef": {"name": "w"},
                       "broker": {"queue": "q", "amqpSecretRef": {"name": "rmq", "uriKey": "uri"},
                                  "prometheusSecretRef": {"name": "rmq", "urlKey": "prometheus-url"}}})
    secrets = Secrets({"rmq": {"uri": "amqp://u:p@rabbit/",
                               "prometheus-url": "http://rmq-0.rmq:15692,\nhttp://rmq-1.rmq:15692/ http://rmq-2.rmq:15692\n"}})
    endpoint = prometheus_endpoint(spec, "ns", secrets)
    pool = BrokerPool()
    probe = pool.prometheus(endpoint)
    assert isinstance(probe, PrometheusClusterProbe)
    assert [node.endpoint.display for node in probe.nodes] == ["rmq-0.rmq:15692", "rmq-1.rmq:15692", "rmq-2.rmq:15692"]
    assert pool.prometheus(prometheus_endpoint(spec, "ns", secrets)) is probe
    pool.close()
