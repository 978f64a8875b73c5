"""Fixtures for the chaos suite: where the test bed answers, on the shared or a private broker.

The shared RabbitMQ and apiserver serve every engineer's tests; a fault that stops the
broker runs on `private_rabbitmq` (tests/conftest.py). Each run gets its own namespace,
vhost and recording SMTP server from `ChaosStack`, so nothing here disturbs other tests.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emailqueue_testbed.demo import Endpoints

from .harness import ChaosStack, LoadPlan


def _endpoints(kube_env, broker) -> Endpoints:
    user, password = broker.mgmt_auth
    return Endpoints(kubeconfig=kube_env.kubeconfig, amqp_url=broker.amqp_url(), mgmt_url=broker.mgmt_url,
                     user=user, password=password)


@pytest.fixture
def shared_endpoints(kube_env, rabbitmq) -> Endpoints:
    return _endpoints(kube_env, rabbitmq)


@pytest.fixture
def chaos_stack(tmp_path: Path) -> Iterator[Callable[[LoadPlan, Endpoints, str], ChaosStack]]:
    """Open a `ChaosStack` (closed at the end of the test, newest first)."""
    opened: list[ChaosStack] = []

    def open_stack(load: LoadPlan, endpoints: Endpoints, name: str) -> ChaosStack:
        stack = ChaosStack(load, endpoints, tmp_path / name, name)
        opened.append(stack)
        stack.open()
        return stack

    yield open_stack
    for stack in reversed(opened):
        stack.close()
