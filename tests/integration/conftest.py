"""Fixtures for running the real operator against the test bed."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emailqueue_testbed.state import free_port

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "deploy" / "crds"


@pytest.fixture(scope="session")
def crds(kube_env) -> None:
    """The EmailQueue CRD, applied from deploy/crds and established."""
    kube_env.kubectl("apply", "-f", str(CRD_DIR))
    kube_env.kubectl("wait", "--for=condition=Established", "crd/emailqueues.emailqueue.dev", "--timeout=60s")


class OperatorProcess:
    def __init__(self, proc: subprocess.Popen, log: Path, metrics_port: int) -> None:
        self.proc, self.log, self.metrics_port = proc, log, metrics_port

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def start_operator(kube_env, crds, tmp_path, request) -> Iterator[Callable[..., OperatorProcess]]:
    """Start `emailqueue-operator run` (a real process) watching the given namespace."""
    started: list[OperatorProcess] = []

    def start(namespace: str, *extra: str) -> OperatorProcess:
        metrics_port = free_port()
        log = tmp_path / f"operator-{len(started)}.log"
        env = kube_env.env()
        with open(log, "wb") as out:  # the child has its own copy of the descriptor
            proc = subprocess.Popen([sys.executable, "-m", "emailqueue_operator", "run", "--namespace", namespace,
                                     "--metrics-port", str(metrics_port), "--health-port", "0", *extra],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        op = OperatorProcess(proc, log, metrics_port)
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for op in started:
            print(f"--- operator log {op.log} ---\n{op.output()[-8000:]}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
