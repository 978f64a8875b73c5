"""A RabbitMQ node of the test bed's own (Debian's rabbitmq-server).

Runs `/usr/lib/rabbitmq/bin/rabbitmq-server` directly (the /usr/sbin wrapper
switches to the rabbitmq user, which cannot write a root-owned data dir) with its
own node name, epmd port, AMQP/management/prometheus ports, data dir and an admin
user, so it never touches a system RabbitMQ.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from . import state

COMPONENT = "rabbitmq"
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")


def node_env(facts: dict[str, Any]) -> dict[str, str]:
    base = Path(facts["base"])
    env = dict(os.environ)
    env.update({
        "HOME": str(base / "home"),
        "RABBITMQ_NODENAME": facts["node"],
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_DIST_PORT": str(facts["dist_port"]),
        "ERL_EPMD_PORT": str(facts["epmd_port"]),
        "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
    })
    return env


def ctl(facts: dict[str, Any], *args: str, timeout: float = 60) -> str:
    """Run rabbitmqctl against the test bed node."""
    result = subprocess.run([str(CTL), "-n", facts["node"], *args], env=node_env(facts),
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        raise state.TestbedError(f"rabbitmqctl {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


class Management:
    """Tiny client for the management HTTP API (vhosts, permissions, queues)."""

    def __init__(self, url: str, user: str, password: str) -> None:
        self.url = url.rstrip("/")
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": self._auth, "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def overview_ok(self) -> bool:
        try:
            return bool(self.request("GET", "/api/overview"))
        except (OSError, urllib.error.URLError):
            return False

    def create_vhost(self, vhost: str, user: str) -> None:
        quoted = urllib.parse.quote(vhost, safe="")
        self.request("PUT", f"/api/vhosts/{quoted}", {})
        self.request("PUT", f"/api/permissions/{quoted}/{urllib.parse.quote(user, safe='')}",
                     {"configure": ".*", "write": ".*", "read": ".*"})

    def delete_vhost(self, vhost: str) -> None:
        try:
            self.request("DELETE", f"/api/vhosts/{urllib.parse.quote(vhost, safe='')}")
        except urllib.error.HTTPError as err:
            if err.code != 404:
                raise

    def queue(self, vhost: str, name: str) -> dict[str, Any]:
        return self.request("GET", f"/api/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(name, safe='')}")


def await_startup(facts: dict[str, Any], timeout: float, log: Path) -> None:
    """Wait for the node to boot. `rabbitmqctl await_startup` fails at once while the
    Erlang node has not yet registered with epmd, so retry it until the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ctl(facts, "await_startup", "--timeout", str(max(1, int(deadline - time.monotonic()))),
                timeout=timeout + 10)
            return
        except state.TestbedError as exc:
            if time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else ""
                raise state.TestbedError(f"{exc}\n--- {log} ---\n{tail}") from None
            time.sleep(1)


def management(record: state.Record) -> Management:
    facts = record.facts
    return Management(facts["mgmt_url"], facts["user"], facts["password"])


def amqp_url(record: state.Record, vhost: str = "/") -> str:
    facts = record.facts
    return (f"amqp://{facts['user']}:{urllib.parse.quote(facts['password'], safe='')}@127.0.0.1:"
            f"{facts['amqp_port']}/{urllib.parse.quote(vhost, safe='')}")


def healthy(record: state.Record | None) -> bool:
    if record is None or not all(state.alive(p) for p in record.pids):
        return False
    return management(record).overview_ok() and state.port_open(record.facts["amqp_port"])


def up(timeout: float = 120.0, component: str = COMPONENT) -> state.Record:
    """Start the node unless a healthy one is already running; returns its record.

    `component` names a separate node (own ports and data), e.g. for an outage test that
    must not stop the broker other tests share.
    """
    record = state.load(component)
    if healthy(record):
        return record
    if not SERVER.exists():
        raise state.TestbedError("rabbitmq-server is not installed: run testbed/install-deps.sh")
    down(component)
    base = state.STATE_DIR / component
    shutil.rmtree(base, ignore_errors=True)
    (base / "home").mkdir(parents=True)
    facts: dict[str, Any] = {
        "base": str(base), "node": f"eqtb-{component}-{os.getpid()}@localhost",
        "amqp_port": state.free_port(), "mgmt_port": state.free_port(), "prom_port": state.free_port(),
        "dist_port": state.free_port(), "epmd_port": state.free_port(),
        # A password with characters that need escaping: the product must cope with them.
        "user": "testbed", "password": "tb-" + secrets.token_hex(6) + "/:@%",
    }
    facts["mgmt_url"] = f"http://127.0.0.1:{facts['mgmt_port']}"
    (base / "enabled_plugins").write_text("[rabbitmq_management,rabbitmq_prometheus].\n")
    (base / "rabbitmq.conf").write_text("\n".join([
        f"listeners.tcp.default = 127.0.0.1:{facts['amqp_port']}",
        f"management.tcp.port = {facts['mgmt_port']}",
        "management.tcp.ip = 127.0.0.1",
        f"prometheus.tcp.port = {facts['prom_port']}",
        "prometheus.tcp.ip = 127.0.0.1",
        "loopback_users = none",
        f"default_user = {facts['user']}",
        f"default_pass = {facts['password']}",
        "default_user_tags.administrator = true",
        # Rates in the management API are what the operator reads; sample them often.
        "collect_statistics_interval = 1000",
        "management.rates_mode = basic",
        "vm_memory_high_watermark.relative = 0.2",
        "disk_free_limit.absolute = 50MB",
        "log.console = false",
        "log.file.level = warning",
        "",
    ]))
    env = node_env(facts)
    logs = state.STATE_DIR / "logs"
    epmd = shutil.which("epmd", path="/usr/lib/erlang/bin:/usr/bin:" + os.environ.get("PATH", "")) or "epmd"
    epmd_pid = state.spawn([epmd, "-port", str(facts["epmd_port"])], logs / f"{component}-epmd.log", env=env)
    state.save(state.Record(component, (epmd_pid,), facts))
    state.wait_until(lambda: state.port_open(facts["epmd_port"]), 15, "epmd", log=logs / f"{component}-epmd.log")
    server_pid = state.spawn([SERVER], logs / f"{component}.log", env=env, cwd=base)
    record = state.Record(component, (epmd_pid, server_pid), facts)
    state.save(record)
    await_startup(facts, timeout, logs / f"{component}.log")
    state.wait_until(lambda: healthy(record), 60, "RabbitMQ management API", log=logs / f"{component}.log")
    return record


def stop_node(record: state.Record) -> None:
    """Stop only the broker (epmd stays), for outage tests; `start_node` brings it back."""
    state.kill_group(record.pids[1])


def start_node(record: state.Record, timeout: float = 120.0) -> state.Record:
    facts = dict(record.facts)
    pid = state.spawn([SERVER], state.STATE_DIR / "logs" / f"{record.component}.log", env=node_env(facts),
                      cwd=facts["base"])
    new = state.Record(record.component, (record.pids[0], pid), facts)
    state.save(new)
    await_startup(facts, timeout, state.STATE_DIR / "logs" / f"{record.component}.log")
    state.wait_until(lambda: healthy(new), 60, "RabbitMQ management API")
    return new


def down(component: str = COMPONENT) -> bool:
    record = state.load(component)
    if record is None:
        return False
    try:
        if len(record.pids) > 1 and state.alive(record.pids[1]):
            ctl(record.facts, "stop", timeout=30)
    except (state.TestbedError, subprocess.TimeoutExpired):
        pass
    return state.stop(component)
