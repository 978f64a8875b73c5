"""The Prometheus source on the test bed's three-node 3.10 cluster (issue #16).

`/metrics/detailed` on a node reports a quorum queue only while that node holds its leader
(3.10 counts publishes per channel, on the channel's node: that one has the queue's counters
without its gauges). The probe is given all three nodes' plugin URLs; the leader's node is SIGKILLed: the probe is
blind (never a zero, never "not found") until the new leader on a survivor reports the queue,
then reads it there with the right count.
"""
from __future__ import annotations

import time
import uuid

import pika
import pytest

from email_worker.brokers import connection_parameters
from emailqueue_operator.rabbitmq import BrokerError, QueueNotFound
from emailqueue_operator.rabbitmq_prometheus import ClusterBlind, PrometheusClusterProbe, PrometheusEndpoint
from emailqueue_testbed import rabbit, rabbit_cluster, state

from .test_broker_cluster import _leader
from .test_broker_crash import wait_for

pytestmark = pytest.mark.integration

QUEUE, MESSAGES = "emails", 30
READ_AGAIN_WITHIN = 45.0  # seconds after the SIGKILL: election (a few s) + the new leader's stats tick (1 s)


def _reporting(probe: PrometheusClusterProbe, vhost: str) -> list[int]:
    """The nodes (indexes) whose own scrape has the queue's gauges right now."""
    found = []
    for index, node in enumerate(probe.nodes):
        try:
            if (vhost, QUEUE) in node.read(vhost).queues:
                found.append(index)
        except BrokerError:
            continue
    return found


def test_quorum_queue_read_through_the_survivors_after_its_leaders_node_dies(cluster: state.Record) -> None:
    vhost = f"pc-{uuid.uuid4().hex[:8]}"
    rabbit.management(rabbit_cluster.node_record(cluster, 0)).create_vhost(vhost, "testbed")
    urls = rabbit_cluster.amqp_urls(cluster, vhost)
    connection = pika.BlockingConnection(connection_parameters(", ".join(urls)))
    try:
        connection.channel().queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    finally:
        connection.close()
    wait_for(lambda: _leader(cluster, vhost, QUEUE), 30, "the queue's leader")
    queue = _leader(cluster, vhost, QUEUE)
    assert len(queue.get("members") or []) == 3, "the queue is not replicated on all three nodes"
    leader = rabbit_cluster.index_of(cluster, queue["leader"])
    # Published through another node: on 3.10 the counters are per channel, on the channel's node.
    publisher_node = (leader + 1) % 3
    publisher = pika.BlockingConnection(connection_parameters(urls[publisher_node]))
    channel = publisher.channel()
    channel.confirm_delivery()
    for n in range(MESSAGES):
        channel.basic_publish("", QUEUE, f"m{n}".encode(), pika.BasicProperties(delivery_mode=2))

    facts = cluster.facts["nodes"]
    endpoint = PrometheusEndpoint(", ".join(f"http://127.0.0.1:{node['prom_port']}" for node in facts))
    probe = endpoint.open_probe()
    assert isinstance(probe, PrometheusClusterProbe)
    probe.cache_seconds = 0.0
    for node in probe.nodes:
        node.timeout = 2.0  # a dead node's port refuses at once; bounded anyway
    seen: list[str] = []
    try:
        def reads_all() -> bool:
            try:
                return probe.queue_stats(vhost, QUEUE).ready == MESSAGES
            except (QueueNotFound, BrokerError):
                return False  # until the leader's first stats tick
        wait_for(reads_all, 30, f"the probe reading {MESSAGES} ready through the cluster")
        # What 3.10 does: only the leader's node has the queue in /metrics/detailed...
        before = _reporting(probe, vhost)
        assert before == [leader], f"nodes reporting the queue: {before}, leader {leader}"
        # ...and its publish counter is on the publishing channel's node, which has no gauge of it.
        on_channel_node = probe.nodes[publisher_node].read(vhost, unhosted_counters=True)
        assert sum(on_channel_node.unhosted_counters[(vhost, QUEUE)]["publish"].values()) == MESSAGES
        on_leader = probe.nodes[leader].read(vhost).queues[(vhost, QUEUE)]
        assert sum(on_leader.counters["publish"].values()) == 0
        publisher.close()

        rabbit_cluster.kill(cluster, leader)
        killed_at = time.monotonic()
        read_again = None
        while time.monotonic() - killed_at < READ_AGAIN_WITHIN:
            try:
                stats = probe.queue_stats(vhost, QUEUE)
            except ClusterBlind:
                seen.append("blind")  # no survivor reports it yet: blind, and the dead node is named
            except QueueNotFound as exc:
                raise AssertionError(f"not found while a node is down: {exc}") from None
            except BrokerError as exc:
                seen.append(f"error {type(exc).__name__}")
            else:
                seen.append(f"ready {stats.ready}")
                assert stats.ready == MESSAGES and stats.unacked == 0, seen  # never 0, never a partial count
                read_again = time.monotonic() - killed_at
                break
            time.sleep(0.2)
        assert read_again is not None, f"not read through the survivors within {READ_AGAIN_WITHIN}s: {seen[-5:]}"
        after = _reporting(probe, vhost)
        assert after and leader not in after, f"nodes reporting the queue after the kill: {after}"
        print(f"leader node {leader} reported alone before; {read_again:.1f} s after its SIGKILL node(s) {after} "
              f"report it; polls in between: {len(seen) - 1} ({sorted(set(seen[:-1]))})")
    finally:
        if publisher.is_open:
            publisher.close()
        probe.close()
        if not rabbit_cluster.node_healthy(cluster, leader):
            rabbit_cluster.start(cluster, leader)
