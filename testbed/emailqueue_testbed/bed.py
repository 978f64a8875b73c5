"""The whole test bed: start/stop every component and write `.testbed/env`."""
from __future__ import annotations

import shlex
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import cluster, kube, netlab, prometheus, rabbit, rabbit_cluster, smtp_proc, state

COMPONENTS = ("kube", "rabbitmq", "smtp")
_UP = {"kube": kube.up, "rabbitmq": rabbit.up, "smtp": smtp_proc.up}
_DOWN = {"kube": kube.down, "rabbitmq": rabbit.down, "smtp": smtp_proc.down}
TOOLS = ("kubectl", "helm", "promtool", "prometheus", "kube-apiserver", "etcd")


@dataclass(frozen=True)
class Env:
    """What a test or a newcomer's shell needs to reach the test bed (None: not running)."""

    kubeconfig: str | None
    amqp_url: str | None
    rabbitmq_mgmt_url: str | None
    rabbitmq_user: str | None
    rabbitmq_password: str | None
    smtp_host: str | None
    smtp_port: int | None
    smtp_control_port: int | None
    bin_dir: str
    rabbitmq_prometheus_url: str | None = None

    def exports(self) -> dict[str, str]:
        pairs = {
            "KUBECONFIG": self.kubeconfig, "AMQP_URL": self.amqp_url,
            "RABBITMQ_MGMT_URL": self.rabbitmq_mgmt_url, "RABBITMQ_USER": self.rabbitmq_user,
            "RABBITMQ_PASSWORD": self.rabbitmq_password, "SMTP_HOST": self.smtp_host,
            "SMTP_PORT": self.smtp_port, "SMTP_CONTROL_PORT": self.smtp_control_port,
            "TESTBED_BIN": self.bin_dir, "RABBITMQ_PROMETHEUS_URL": self.rabbitmq_prometheus_url,
        }
        return {key: str(value) for key, value in pairs.items() if value is not None}


def link_tools() -> Path:
    """`.testbed/bin` holds the pinned tools under their plain names (kubectl, helm, ...)."""
    bin_dir = state.STATE_DIR / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        try:
            target = state.binary(tool)
        except state.TestbedError:
            continue
        link = bin_dir / tool
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return bin_dir


def up(components: tuple[str, ...] = COMPONENTS) -> Env | None:
    """Start the components (in parallel), reuse healthy running ones, write `.testbed/env`."""
    state.STATE_DIR.mkdir(parents=True, exist_ok=True)
    link_tools()
    with ThreadPoolExecutor(len(components)) as pool:
        futures = {name: pool.submit(_UP[name]) for name in components}
        errors = []
        for name, future in futures.items():
            try:
                future.result()
            except Exception as exc:  # report every component's failure at once
                errors.append(f"{name}: {exc}")
    if errors:
        raise state.TestbedError("test bed did not start:\n" + "\n".join(errors))
    return write_env()


def current() -> Env | None:
    """The running test bed's Env (components not running are None), or None when none runs."""
    kube_rec, rmq, smtp = (state.load(name) for name in COMPONENTS)
    if kube_rec is None and rmq is None and smtp is None:
        return None
    return Env(
        kubeconfig=kube_rec.facts["kubeconfig"] if kube_rec else None,
        amqp_url=rabbit.amqp_url(rmq) if rmq else None,
        rabbitmq_mgmt_url=rmq.facts["mgmt_url"] if rmq else None,
        rabbitmq_user=rmq.facts["user"] if rmq else None,
        rabbitmq_password=rmq.facts["password"] if rmq else None,
        smtp_host="127.0.0.1" if smtp else None, smtp_port=smtp.facts["port"] if smtp else None,
        smtp_control_port=smtp.facts["control_port"] if smtp else None, bin_dir=str(state.STATE_DIR / "bin"),
        rabbitmq_prometheus_url=f"http://127.0.0.1:{rmq.facts['prom_port']}" if rmq and "prom_port" in rmq.facts
        else None)


def write_env() -> Env | None:
    env = current()
    path = state.STATE_DIR / "env"
    if env is None:
        path.unlink(missing_ok=True)
        return None
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.exports().items()]
    lines.append(f'export PATH={shlex.quote(env.bin_dir)}:"$PATH"')
    path.write_text("# written by `make testbed-up`; source it: . .testbed/env\n" + "\n".join(lines) + "\n")
    return env


def down(components: tuple[str, ...] = COMPONENTS) -> list[str]:
    stopped = [name for name in components if _DOWN[name]()]
    if "rabbitmq" in components:
        # The broker matrix's other nodes (started by tests) go with the shared broker.
        stopped += [v.component for v in rabbit.VARIANTS.values()
                    if v.component != rabbit.COMPONENT and rabbit.down(v.component)]
        # And what outage tests start: private nodes (one per test session) and the cluster,
        # also when a killed run left them behind.
        if rabbit_cluster.down():
            stopped.append(rabbit_cluster.COMPONENT)
        for path in sorted(state.STATE_DIR.glob("rabbitmq-private-*.json")):
            if rabbit.down(path.stem):
                stopped.append(path.stem)
    if set(components) == set(COMPONENTS):  # the whole test bed: what runs left behind goes too
        stopped += prometheus.down_all()
        stopped += netlab.down_all()  # network-namespace labs (their gateways forward to broker and SMTP)
        # The real single-node cluster (make cluster-up) this checkout started, pods and all.
        if state.load(cluster.COMPONENT) is not None and cluster.down():
            stopped.append(cluster.COMPONENT)
    (state.STATE_DIR / "env").unlink(missing_ok=True)
    return stopped


def status() -> dict[str, bool]:
    checks = {"kube": kube.healthy, "rabbitmq": rabbit.healthy, "smtp": smtp_proc.healthy}
    return {name: checks[name](state.load(name)) for name in COMPONENTS}


def vhost_url(amqp_url: str, vhost: str) -> str:
    parts = urllib.parse.urlsplit(amqp_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, safe="")))


__all__ = ["Env", "up", "down", "status", "current", "write_env", "vhost_url"]
