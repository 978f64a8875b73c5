"""Test bed fixtures: real kube-apiserver + etcd, RabbitMQ and a recording SMTP server.

Session fixtures start a component when it is not already running (and stop it at
the end only if this session started it, so `make testbed-up` plus repeated pytest
runs stay fast). Function fixtures hand each test its own namespace, vhost or a
cleared SMTP recorder so tests never see each other's objects.
"""
from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

from emailqueue_testbed import kube, rabbit, rabbit_cluster, smtp_proc, state
from emailqueue_testbed.bed import link_tools, vhost_url
from emailqueue_testbed.smtp import SmtpControl

REPO = Path(__file__).resolve().parents[1]


def _component(request: pytest.FixtureRequest, module) -> state.Record:
    """Start (or reuse) a component for the session; stop it at the end if we started it."""
    started = not module.healthy(state.load(module.COMPONENT))
    record = module.up()
    if started and not os.environ.get("EQ_TESTBED_KEEP"):
        request.addfinalizer(module.down)
    return record


# --- Kubernetes -------------------------------------------------------------------

@dataclass(frozen=True)
class Kube:
    """The test bed's apiserver: kubeconfig, pinned kubectl, and a runner for it."""

    kubeconfig: str
    kubectl_path: str
    server: str

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = self.kubeconfig
        env["PATH"] = str(Path(self.kubectl_path).parent) + os.pathsep + env.get("PATH", "")
        return env

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                context: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [self.kubectl_path, *(["--context", context] if context else []), *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, env=self.env(), timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def api_client(self):
        """A kubernetes.client.ApiClient for the admin identity."""
        from kubernetes import config

        return config.new_client_from_config(config_file=self.kubeconfig, context="testbed")


@pytest.fixture(scope="session")
def kube_env(request: pytest.FixtureRequest) -> Kube:
    record = _component(request, kube)
    link_tools()
    return Kube(kubeconfig=record.facts["kubeconfig"], kubectl_path=str(state.binary("kubectl")),
                server=record.facts["server"])


@pytest.fixture
def namespace(kube_env: Kube) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube_env.kubectl("create", "namespace", name)
    yield name
    kube_env.kubectl("delete", "namespace", name, "--wait=false", check=False)


# --- RabbitMQ ---------------------------------------------------------------------

@dataclass
class RabbitMQ:
    record: state.Record

    @property
    def mgmt_url(self) -> str:
        return self.record.facts["mgmt_url"]

    @property
    def mgmt_auth(self) -> tuple[str, str]:
        return self.record.facts["user"], self.record.facts["password"]

    @property
    def amqp_port(self) -> int:
        return self.record.facts["amqp_port"]

    @property
    def variant(self) -> str:
        """Which broker of the matrix this is (`rabbit.VARIANTS`): "3.10", "3.10-nocollector", "4.0"."""
        return self.record.facts.get("variant", "3.10")

    @property
    def version(self) -> str:
        """The RabbitMQ version the node reports (3.10.8, 4.0.5)."""
        return self.record.facts.get("version", rabbit.HOST_VERSION)

    @property
    def prom_url(self) -> str:
        """The Prometheus plugin's base URL (/metrics, /metrics/detailed, /metrics/per-object)."""
        return f"http://127.0.0.1:{self.record.facts['prom_port']}"

    def amqp_url(self, vhost: str = "/") -> str:
        return rabbit.amqp_url(self.record, vhost)

    def management(self) -> rabbit.Management:
        return rabbit.management(self.record)

    def stop_broker(self) -> None:
        """Stop the broker process (an outage); `start_broker` brings it back, same ports."""
        rabbit.stop_node(self.record)

    def start_broker(self) -> None:
        self.record = rabbit.start_node(self.record)


@pytest.fixture(scope="session")
def rabbitmq(request: pytest.FixtureRequest) -> RabbitMQ:
    return RabbitMQ(_component(request, rabbit))


@pytest.fixture(scope="session")
def _private_node() -> Iterator[RabbitMQ]:
    component = f"rabbitmq-private-{os.getpid()}"
    broker = RabbitMQ(rabbit.up(component=component))
    yield broker
    rabbit.down(component)


@pytest.fixture
def private_rabbitmq(_private_node: RabbitMQ) -> RabbitMQ:
    """A RabbitMQ node apart from the shared one, for outage tests that stop, kill and start it
    (stopping the shared node would break every other test running against it). One node serves
    every such test of the session (a node costs ~35 s to start and stop); a test that left it
    down gets it started again before the next one."""
    if not rabbit.healthy(_private_node.record):
        _private_node.start_broker()
    return _private_node


@pytest.fixture(scope="session")
def _cluster_session() -> Iterator[None]:
    yield
    rabbit_cluster.down()


@pytest.fixture
def cluster(_cluster_session: None) -> state.Record:
    """The three-node RabbitMQ cluster, started once per session (~40 s: its nodes join one after
    the other) and stopped at its end; a test that left it unhealthy (a node killed and not
    restarted) gets a fresh one."""
    return rabbit_cluster.up()


@pytest.fixture
def vhost(rabbitmq: RabbitMQ) -> Iterator[str]:
    """An isolated vhost per test; yields its AMQP URL (admin user, full permissions)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    mgmt = rabbitmq.management()
    mgmt.create_vhost(name, rabbitmq.mgmt_auth[0])
    yield vhost_url(rabbitmq.amqp_url(), name)
    try:
        mgmt.delete_vhost(name)
    except OSError:
        pass  # the broker may be down after an outage test; the node is throwaway


# --- The broker matrix: the same RabbitMQ dataclass for every variant -------------

def _broker(request: pytest.FixtureRequest, variant: str) -> state.Record:
    """Start (or reuse) a broker of the matrix for the session; stop it at the end if we started it."""
    component = rabbit.VARIANTS[variant].component
    record = state.load(component)
    started = not (rabbit.healthy(record) and record.facts.get("variant", "3.10") == variant)
    record = rabbit.up(component=component, variant=variant)
    if started and not os.environ.get("EQ_TESTBED_KEEP"):
        request.addfinalizer(lambda: rabbit.down(component))
    return record


@pytest.fixture(scope="session")
def rabbitmq_nocollector(request: pytest.FixtureRequest) -> RabbitMQ:
    """RabbitMQ 3.10.8 with `management_agent.disable_metrics_collector = true`: the management
    API lists queues without counts or rates; the Prometheus endpoint has them."""
    return RabbitMQ(_broker(request, "3.10-nocollector"))


@pytest.fixture(scope="session")
def rabbitmq4(request: pytest.FixtureRequest) -> RabbitMQ:
    """RabbitMQ 4.0.x (Debian trixie, Erlang 27), chrooted in the root `make testbed-brokers` builds."""
    return RabbitMQ(_broker(request, "4.0"))


BROKERS = {"3.10": "rabbitmq", "3.10-nocollector": "rabbitmq_nocollector", "4.0": "rabbitmq4"}


@pytest.fixture(scope="session", params=list(BROKERS))
def any_broker(request: pytest.FixtureRequest) -> RabbitMQ:
    """Each broker of the matrix in turn (tests using it run once per variant)."""
    return request.getfixturevalue(BROKERS[request.param])


class BrokerVhost(NamedTuple):
    broker: RabbitMQ
    name: str
    amqp_url: str


@pytest.fixture
def broker_vhost(any_broker: RabbitMQ) -> Iterator[BrokerVhost]:
    """An isolated vhost per test on each broker of the matrix: (broker, vhost name, its AMQP URL)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    mgmt = any_broker.management()
    mgmt.create_vhost(name, any_broker.mgmt_auth[0])
    yield BrokerVhost(any_broker, name, any_broker.amqp_url(name))
    try:
        mgmt.delete_vhost(name)
    except OSError:
        pass


# --- SMTP -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smtp_server(request: pytest.FixtureRequest) -> SmtpControl:
    return smtp_proc.control(_component(request, smtp_proc))


@pytest.fixture
def smtp(smtp_server: SmtpControl) -> SmtpControl:
    """The recording SMTP server, cleared of messages, faults and delays."""
    smtp_server.clear()
    yield smtp_server
    smtp_server.clear()


def run(argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, **kwargs)
