"""The compound run's stack: the closed loop on a three-node cluster, workers behind a network lab.

`CompoundStack` is `ChaosStack` (operator + kubelet + real workers + recording SMTP) with:
- the broker a three-node RabbitMQ cluster (`rabbit_cluster`), the work queue and retry tiers
  quorum queues replicated on all three; publishers, workers and the operator are given every
  node (client-side failover);
- the workers in a network namespace of the test bed's own (`netlab.NetLab`): they reach the
  broker and SMTP only through its gateway, so a path can be partitioned (packets dropped, no
  RST) or slowed while the publishers, the operator and the harness keep their loopback view;
- reads that survive a node down: the queue counts come from whichever node answers.

Faults are plain callables on the stack (`Fault` in harness.py schedules them).
"""
from __future__ import annotations

import contextlib
import time
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from emailqueue_testbed import bed, rabbit, rabbit_cluster, state
from emailqueue_testbed.demo import DEPLOYMENT, EMAILQUEUE, QUEUE, SECRET, Endpoints
from emailqueue_testbed.kubelet import WORKER_COMMAND, ApiDeployment, KubeletConfig, LocalKubelet
from emailqueue_testbed.netlab import NetLab

from .harness import DEAD_QUEUE, ChaosStack, LoadPlan

# Publishers and the harness notice a frozen or partitioned node within ~2 heartbeats.
CLIENT_HEARTBEAT_SECONDS = 10


def cluster_endpoints(kubeconfig: str, cluster: state.Record) -> Endpoints:
    """Node 0 as the demo's single endpoint (vhost creation, CRD); the stack adds the other nodes."""
    node = rabbit_cluster.node_record(cluster, 0)
    facts = node.facts
    return Endpoints(kubeconfig=kubeconfig, amqp_url=rabbit.amqp_url(node), mgmt_url=facts["mgmt_url"],
                     user=facts["user"], password=facts["password"])


class CompoundStack(ChaosStack):
    def __init__(self, load: LoadPlan, endpoints: Endpoints, out_dir: Path, name: str,
                 cluster: state.Record, concurrency: int = 4) -> None:
        super().__init__(load, endpoints, out_dir, name)
        self.cluster = cluster
        self.concurrency = concurrency
        self.lab: NetLab | None = None
        nodes = range(len(cluster.facts["nodes"]))
        self.managements = [rabbit.management(rabbit_cluster.node_record(cluster, i)) for i in nodes]
        self._answering = 0
        self.killed_node = 0

    # -- where things are ------------------------------------------------------------------------
    def node_urls(self) -> list[str]:
        """Every node's AMQP URL on the host's loopback, for this stack's vhost."""
        return [bed.vhost_url(url, self.vhost) for url in rabbit_cluster.amqp_urls(self.cluster)]

    def publisher_url(self) -> str:
        return ", ".join(f"{url}?heartbeat={CLIENT_HEARTBEAT_SECONDS}" for url in self.node_urls())

    def worker_amqp_url(self) -> str:
        """The node list as the workers see it: every node through the lab's gateway."""
        assert self.lab is not None
        facts = self.cluster.facts["nodes"][0]
        credentials = f"{urllib.parse.quote(facts['user'], safe='')}:{urllib.parse.quote(facts['password'], safe='')}"
        vhost = urllib.parse.quote(self.vhost, safe="")
        urls = []
        for index in range(len(self.cluster.facts["nodes"])):
            host, port = self.lab.address(f"amqp-{index}")
            urls.append(f"amqp://{credentials}@{host}:{port}/{vhost}")
        return ", ".join(urls)

    def worker_env(self) -> dict[str, str]:
        env = super().worker_env()
        if self.lab is None:
            return env
        smtp_host, smtp_port = self.lab.address("smtp")
        return {**env, "AMQP_URL": self.worker_amqp_url(), "SMTP_HOST": smtp_host, "SMTP_PORT": str(smtp_port),
                "CONCURRENCY": str(self.concurrency)}

    # -- steps (DemoStack's, cluster- and lab-aware) ------------------------------------------------
    def _create_kube_objects(self) -> None:
        super()._create_kube_objects()
        # The operator is given every node: AMQP for depth and consumers, management for rates.
        mgmt_urls = ", ".join(m.url for m in self.managements)
        self.core.patch_namespaced_secret(SECRET, self.namespace, {"stringData": {
            "uri": ", ".join(self.node_urls()), "url": mgmt_urls}})

    def _start_kubelet(self) -> None:
        assert self.smtp is not None
        routes: dict[str, tuple[str, str, int]] = {"smtp": ("smtp", "127.0.0.1", self.smtp.port)}
        for index, facts in enumerate(self.cluster.facts["nodes"]):
            routes[f"amqp-{index}"] = ("broker", "127.0.0.1", int(facts["amqp_port"]))
        self.lab = NetLab.up(f"chaos-{self.run_id}", routes)
        self._later("remove the network lab", self.lab.down)
        config = KubeletConfig(
            worker_env=self.worker_env(), command=(*self.lab.exec_prefix(), *WORKER_COMMAND),
            probe=self.lab.ready_probe,
            startup_delay_seconds=self.plan.pod_start_delay_seconds, poll_seconds=0.5,
            termination_grace_seconds=15, log_dir=self.out_dir / "pods", pod_prefix=DEPLOYMENT)
        self.kubelet = LocalKubelet(ApiDeployment(self.namespace, DEPLOYMENT, self.endpoints.kubeconfig), config)
        self.kubelet.start()
        self._later("stop the kubelet and its workers", self.kubelet.stop)
        self.kubelet.wait_ready(self.plan.min_replicas, 90)

    # -- reads from whichever node answers ------------------------------------------------------------
    def _queue(self, name: str) -> dict[str, Any] | None:
        for step in range(len(self.managements)):
            index = (self._answering + step) % len(self.managements)
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError, TimeoutError):
                info = self.managements[index].queue(self.vhost, name)
                self._answering = index
                return dict(info)
        return None

    def queue_depth(self) -> tuple[int | None, int | None]:
        info = self._queue(QUEUE)
        if info is None:
            return None, None
        return int(info.get("messages_ready") or 0), int(info.get("messages_unacknowledged") or 0)

    def dead_count(self) -> int | None:
        info = self._queue(DEAD_QUEUE)
        return None if info is None else int(info.get("messages") or 0)

    def leader_index(self) -> int | None:
        """The node holding the work queue's quorum leader (None while no node names one)."""
        info = self._queue(QUEUE) or {}
        leader = info.get("leader")
        return None if not leader else rabbit_cluster.index_of(self.cluster, str(leader))

    # -- faults --------------------------------------------------------------------------------------
    def ctl(self, index: int, *args: str) -> str:
        return rabbit.ctl(rabbit_cluster.node_record(self.cluster, index).facts, *args, timeout=60)

    def disk_alarm(self, index: int = 1) -> str:
        """Raise node `index`'s disk alarm (free space limit far above what the disk has): RabbitMQ
        blocks every publishing connection of the cluster until it clears."""
        self.ctl(index, "set_disk_free_limit", "100000GB")
        return f"node {index}: disk_free_limit 100000GB"

    def clear_disk_alarm(self, index: int = 1) -> str:
        self.ctl(index, "set_disk_free_limit", "50MB")   # the test bed's configured limit
        return f"node {index}: disk_free_limit 50MB"

    def kill_leader(self) -> str:
        index = self.leader_index()
        if index is None:
            index = 0
        rabbit_cluster.kill(self.cluster, index)
        self.killed_node = index
        return f"SIGKILL node {index}"

    def restart_killed_node(self) -> str:
        index = self.killed_node
        self.cluster = rabbit_cluster.start(self.cluster, index)
        return f"node {index} started"

    def set_max_replicas(self, value: int, patience: float = 90.0) -> str:
        """Patch spec.replicas.max as a user would: retried while the apiserver is away (another fault)."""
        deadline = time.monotonic() + patience
        while True:
            try:
                self.custom.patch_namespaced_custom_object(
                    "emailqueue.dev", "v1alpha1", self.namespace, "emailqueues", EMAILQUEUE,
                    {"spec": {"replicas": {"max": value}}}, _request_timeout=10)
                return f"spec.replicas.max = {value}"
            except ApiException as exc:
                if (exc.status is not None and exc.status < 500) or time.monotonic() > deadline:
                    raise   # refused (422: invalid spec) is an answer, not an outage
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(1.0)
