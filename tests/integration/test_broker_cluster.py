"""A three-node RabbitMQ cluster: the quorum queue's leader SIGKILLed under load (issue #16).

The workers and the publisher are given the three nodes as one list (client-side failover);
the work queue is a quorum queue replicated on all three. The node holding its leader is
SIGKILLed while mail flows, and started again later: a new leader is elected on a surviving
node, the clients that were connected to the dead node reconnect to another one, the
publisher retries what was not confirmed (same id), and every accepted email is delivered.
Duplicates are possible (a confirm or an ack the crash cut off) and are counted.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from email_worker.brokers import connection_parameters
from email_worker.publisher import Publisher, PublishError
from email_worker.smtp import SmtpConfig
from email_worker.topology import declare
from email_worker.worker import Worker, WorkerConfig
from emailqueue_operator.rabbitmq import AmqpEndpoint, AmqpProbe, BrokerError, ManagementEndpoint, ManagementProbe
from emailqueue_testbed import rabbit, rabbit_cluster, state
from tests.integration.support import smtp_relay

from .test_broker_crash import DOMAIN, TOPOLOGY, Mailbox, job_id, wait_for

pytestmark = pytest.mark.integration

EMAILS = 600
RATE = 40.0   # emails/s published


@pytest.fixture
def relay() -> Iterator[tuple[Mailbox, int]]:
    handler = Mailbox(delay=0.01)
    with smtp_relay(handler) as port:
        yield handler, port


def _leader(cluster: state.Record, vhost: str, queue: str) -> dict[str, Any]:
    """The queue as a running node's management API shows it once it names a leader ({} until then)."""
    for index in range(len(cluster.facts["nodes"])):
        if not rabbit_cluster.node_healthy(cluster, index):
            continue
        try:
            info = rabbit.management(rabbit_cluster.node_record(cluster, index)).queue(vhost, queue)
        except OSError:  # 404 until the node's first statistics tick knows the queue; a node going down
            continue
        if info.get("leader"):
            return info
    return {}


def _reads(probe: ManagementProbe | AmqpProbe, vhost: str) -> bool:
    try:
        if isinstance(probe, AmqpProbe):
            probe.queue_depth(TOPOLOGY.work_queue)
        else:
            probe.queue_stats(vhost, TOPOLOGY.work_queue)
    except BrokerError:
        return False  # blind (a node down, counts not yet there): never a zero
    return True


class _Load(threading.Thread):
    """Publishes EMAILS at RATE through the node list; an unconfirmed publish is retried (same id)."""

    def __init__(self, urls: str) -> None:
        super().__init__(name="cluster-publisher", daemon=True)
        self.urls, self.accepted, self.errors = urls, [], 0
        self.stop = threading.Event()

    def run(self) -> None:
        publisher = Publisher(self.urls, queue=TOPOLOGY.work_queue)
        origin, n = time.monotonic(), 0
        try:
            while n < EMAILS and not self.stop.is_set():
                if n >= (time.monotonic() - origin) * RATE:
                    time.sleep(0.005)
                    continue
                try:
                    publisher.publish({"id": f"cl-{n:04d}", "to": f"ok{n}@example.com", "from": "app@example.com",
                                       "subject": "cluster", "text": "hello"})
                except PublishError:
                    self.errors += 1
                    publisher.close()
                    self.stop.wait(0.2)
                    continue
                self.accepted.append(f"cl-{n:04d}")
                n += 1
        finally:
            publisher.close()


def test_quorum_leader_sigkilled_under_load_loses_nothing(cluster: state.Record,
                                                         relay: tuple[Mailbox, int]) -> None:
    smtp, port = relay
    vhost = f"cl-{uuid.uuid4().hex[:8]}"
    rabbit.management(rabbit_cluster.node_record(cluster, 0)).create_vhost(vhost, "testbed")
    urls = ", ".join(rabbit_cluster.amqp_urls(cluster, vhost))
    connection = pika.BlockingConnection(connection_parameters(urls))
    try:
        declare(connection.channel(), TOPOLOGY)
    finally:
        connection.close()
    wait_for(lambda: _leader(cluster, vhost, TOPOLOGY.work_queue), 30, "the work queue's leader")
    queue = _leader(cluster, vhost, TOPOLOGY.work_queue)
    names = sorted(f["node"] for f in cluster.facts["nodes"])
    assert sorted(queue.get("members") or []) == names, "the work queue is not replicated on all three nodes"
    leader = rabbit_cluster.index_of(cluster, queue["leader"])

    workers = [Worker(WorkerConfig(
        amqp_url=urls, topology=TOPOLOGY, concurrency=2, metrics_host="127.0.0.1", metrics_port=0,
        heartbeat_seconds=5, smtp=SmtpConfig(host="127.0.0.1", port=port, timeout=5, message_id_domain=DOMAIN)))
        for _ in range(2)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    # The operator's management probe, given the nodes with the one to be killed first.
    facts = cluster.facts["nodes"]
    order = [leader, *(i for i in range(len(facts)) if i != leader)]
    probe = ManagementProbe(ManagementEndpoint(", ".join(facts[i]["mgmt_url"] for i in order), facts[0]["user"],
                                               facts[0]["password"]), cache_seconds=0)
    amqp_probe = AmqpProbe(AmqpEndpoint.from_uri(", ".join(rabbit_cluster.amqp_urls(cluster, vhost)[i] for i in order)))
    load = _Load(urls)
    load.start()
    killed_at = None
    seen_after_kill = None
    try:
        wait_for(lambda: len(load.accepted) >= EMAILS // 4 and len(smtp.accepted) >= 20, 60, "mail flowing")
        wait_for(lambda: _reads(probe, vhost) and _reads(amqp_probe, vhost), 30, "the operator's probes reading")
        rabbit_cluster.kill(cluster, leader)
        killed_at, kill_time = len(load.accepted), time.monotonic()
        # Through a surviving node, once the new leader's counts reach its statistics (blind until then).
        wait_for(lambda: _reads(probe, vhost), 30, "the management probe reading the queue through a survivor")
        seen_after_kill = time.monotonic() - kill_time
        wait_for(lambda: _reads(amqp_probe, vhost), 30, "the AMQP probe reading the queue through a survivor")
        wait_for(lambda: _leader(cluster, vhost, TOPOLOGY.work_queue).get("leader") != queue["leader"], 60,
                 "a new leader on a surviving node")
        cluster = rabbit_cluster.start(cluster, leader)
        load.join(120)
        assert not load.is_alive(), "the publisher did not finish"

        def delivered() -> set[str]:
            with smtp.lock:
                return {job_id(m) for m in smtp.accepted}
        wait_for(lambda: delivered() >= set(load.accepted), 120, "every accepted email delivered")
    finally:
        load.stop.set()
        for worker in workers:
            worker.stop()
        for thread in threads:
            thread.join(30)
        probe.close()
        amqp_probe.close()
        if not rabbit_cluster.node_healthy(cluster, leader):
            rabbit_cluster.start(cluster, leader)

    counts = Counter(job_id(m) for m in smtp.accepted)
    lost = sorted(set(load.accepted) - set(counts))
    duplicates = sum(counts.values()) - len(counts)
    shown = (f"leader node {leader} killed after {killed_at} accepted; the operator's probe read the queue again "
             f"{seen_after_kill if seen_after_kill is None else round(seen_after_kill, 1)} s after; "
             f"accepted {len(load.accepted)}, "
             f"publish errors {load.errors}, delivered {len(counts)}, duplicates {duplicates}, lost {lost[:10]}")
    print(shown)  # the figures, with -s
    assert killed_at is not None and killed_at < EMAILS, shown
    assert seen_after_kill is not None, shown
    assert len(load.accepted) == EMAILS and not lost, shown
    assert duplicates <= 20, shown
