"""A RabbitMQ node of the test bed's own (Debian's rabbitmq-server), in one of the
broker matrix's variants (`VARIANTS`).

Runs `/usr/lib/rabbitmq/bin/rabbitmq-server` directly (the /usr/sbin wrapper
switches to the rabbitmq user, which cannot write a root-owned data dir) with its
own node name, epmd port, AMQP/management/prometheus ports, data dir and an admin
user, so it never touches a system RabbitMQ. Every listener (AMQP, HTTP, epmd, Erlang
distribution) is bound to 127.0.0.1.

The "4.0" variant runs Debian trixie's rabbitmq-server in the root that
testbed/build-rabbitmq4.sh debootstraps: each of its processes (epmd, the server,
rabbitmqctl) starts in a private mount namespace that mounts /proc, a minimal /dev, a
/tmp and the node's data dir into a read-only view of the root, then chroots. The
mounts exist only in that namespace and vanish with its last process; the host's mount
table never sees them. The chroot shares the host's network namespace, so the node is
reached on 127.0.0.1 like the others.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import state

COMPONENT = "rabbitmq"
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
EPMD = Path("/usr/bin/epmd")
# Where a chrooted node sees its data dir (the build script creates the mount point).
ROOT_DATA_DIR = Path("/var/lib/eqtb")
# Erlang distribution (the node's and rabbitmqctl's) listens on loopback only.
_LOOPBACK_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"


@dataclass(frozen=True)
class Variant:
    """One broker of the test bed's matrix."""

    name: str
    """What `up(variant=...)` and the tests call it: "3.10", "3.10-nocollector", "4.0"."""
    component: str
    """The component (state file, data dir, ports) a node of this variant runs as by default."""
    metrics_collector: bool = True
    """False sets `management_agent.disable_metrics_collector = true` (the setup RabbitMQ
    recommends with its Prometheus plugin): the management API still answers, but its queue
    objects carry no message counts or rates; only /metrics/detailed has them."""
    in_root: bool = False
    """True: Debian $RABBITMQ4_SUITE's rabbitmq-server in the root build-rabbitmq4.sh makes;
    False: the host's rabbitmq-server (Debian bookworm's 3.10.8)."""

    def version(self) -> str:
        """The RabbitMQ version the node reports in /api/overview."""
        return state.versions()["RABBITMQ4_DEB_VERSION"] if self.in_root else HOST_VERSION


HOST_VERSION = "3.10.8"
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("3.10", COMPONENT),
    Variant("3.10-nocollector", "rabbitmq-nocollector", metrics_collector=False),
    Variant("4.0", "rabbitmq4", in_root=True),
)}


def rootfs() -> Path:
    """The built root the "4.0" variant runs in (testbed/build-rabbitmq4.sh, cached by version)."""
    pins = state.versions()
    root = state.CACHE_DIR / "rootfs" / f"{pins['RABBITMQ4_SUITE']}-rabbitmq-{pins['RABBITMQ4_DEB_VERSION']}"
    if not (root / ".eqtb-complete").exists():
        raise state.TestbedError(f"{root} is not built: run `make testbed-brokers` (testbed/build-rabbitmq4.sh)")
    return root


# Runs "$@" chrooted into $1 with $2 as its data dir; started by `unshare --mount`, so every
# mount here is private to this process tree. The root itself is seen read-only: nodes share it.
_CHROOT = r"""
set -e
root=$1 data=$2 inner=$3; shift 3
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t tmpfs -o mode=0755,size=256k,nosuid tmpfs "$root/dev"
for dev in null zero full random urandom; do
  : >"$root/dev/$dev"
  mount --bind "/dev/$dev" "$root/dev/$dev"
done
ln -s /proc/self/fd "$root/dev/fd"
mount -t tmpfs -o mode=1777,size=64m,nosuid,nodev tmpfs "$root/tmp"
mount --bind "$data" "$root$inner"
exec chroot "$root" /bin/sh -c 'cd "$0" && exec "$@"' "$inner" "$@"
"""


def _erlang_binary(text: str) -> str:
    """An Erlang binary literal of text's UTF-8 bytes (no quoting rules to get wrong)."""
    return "<<" + ",".join(str(byte) for byte in text.encode()) + ">>"


def _argv(facts: dict[str, Any], program: Path) -> list[str]:
    """argv that runs a RabbitMQ/Erlang program (server, rabbitmqctl, epmd) for this node."""
    if not facts.get("root"):
        return [str(program)]
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _CHROOT, "eqtb-chroot",
            facts["root"], facts["base"], str(ROOT_DATA_DIR), str(program)]


def node_env(facts: dict[str, Any]) -> dict[str, str]:
    """The node's environment; paths are as the node sees them (inside the root for "4.0")."""
    if facts.get("root"):
        base = ROOT_DATA_DIR
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    else:
        base = Path(facts["base"])
        env = dict(os.environ)
    env.update({
        "HOME": str(base / "home"),
        "RABBITMQ_NODENAME": facts["node"],
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_DIST_PORT": str(facts["dist_port"]),
        "ERL_EPMD_PORT": str(facts["epmd_port"]),
        "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": _LOOPBACK_DIST,
        "RABBITMQ_CTL_ERL_ARGS": _LOOPBACK_DIST,
    })
    return env


def ctl(facts: dict[str, Any], *args: str, timeout: float = 60) -> str:
    """Run rabbitmqctl against the test bed node."""
    result = subprocess.run([*_argv(facts, CTL), "-n", facts["node"], *args], env=node_env(facts),
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
        quoted_vhost, quoted_name = urllib.parse.quote(vhost, safe=""), urllib.parse.quote(name, safe="")
        return self.request("GET", f"/api/queues/{quoted_vhost}/{quoted_name}")


def await_startup(facts: dict[str, Any], timeout: float, log: Path, server_pid: int | None = None) -> None:
    """Wait for the node to boot. `rabbitmqctl await_startup` fails at once while the
    Erlang node has not yet registered with epmd, so retry it until the deadline (or until
    the server process, when given, has exited: a node that failed to boot)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ctl(facts, "await_startup", "--timeout", str(max(1, int(deadline - time.monotonic()))),
                timeout=timeout + 10)
            return
        except state.TestbedError as exc:
            if time.monotonic() > deadline or (server_pid is not None and not state.alive(server_pid)):
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


def up(timeout: float = 120.0, component: str = COMPONENT, variant: str = "3.10") -> state.Record:
    """Start the node unless a healthy one of this variant is already running; returns its record.

    `component` names a separate node (own ports and data), e.g. for an outage test that
    must not stop the broker other tests share; `variant` picks the broker (`VARIANTS`).
    """
    kind = VARIANTS[variant]
    record = state.load(component)
    if healthy(record) and record.facts.get("variant", "3.10") == variant:
        return record
    root = rootfs() if kind.in_root else None
    if root is None and not SERVER.exists():
        raise state.TestbedError("rabbitmq-server is not installed: run testbed/install-deps.sh")
    down(component)
    base = state.STATE_DIR / component
    shutil.rmtree(base, ignore_errors=True)
    (base / "home").mkdir(parents=True)
    facts: dict[str, Any] = {
        "base": str(base), "node": f"eqtb-{component}-{os.getpid()}@localhost",
        "variant": variant, "root": str(root) if root else None, "version": kind.version(),
        "amqp_port": state.free_port(), "mgmt_port": state.free_port(), "prom_port": state.free_port(),
        "dist_port": state.free_port(), "epmd_port": state.free_port(),
        # A password with characters that need escaping: the product must cope with them.
        "user": "testbed", "password": "tb-" + secrets.token_hex(6) + "/:@%",
    }
    facts["mgmt_url"] = f"http://127.0.0.1:{facts['mgmt_port']}"
    write_config(base, facts, kind)
    env = node_env(facts)
    logs = state.STATE_DIR / "logs"
    epmd_pid = state.spawn(epmd_argv(facts), logs / f"{component}-epmd.log", env=env)
    state.save(state.Record(component, (epmd_pid,), facts))
    state.wait_until(lambda: state.port_open(facts["epmd_port"]), 15, "epmd", log=logs / f"{component}-epmd.log")
    server_pid = state.spawn(_argv(facts, SERVER), logs / f"{component}.log", env=env, cwd=base)
    record = state.Record(component, (epmd_pid, server_pid), facts)
    state.save(record)
    await_startup(facts, timeout, logs / f"{component}.log", server_pid)
    state.wait_until(lambda: healthy(record), 60, "RabbitMQ management API", log=logs / f"{component}.log")
    return record


def epmd_argv(facts: dict[str, Any]) -> list[str]:
    """argv of the epmd a node (or the nodes of a cluster) registers with, on facts' epmd_port."""
    if facts.get("root"):
        argv = _argv(facts, EPMD)
    else:
        argv = [shutil.which("epmd", path="/usr/lib/erlang/bin:/usr/bin:" + os.environ.get("PATH", "")) or "epmd"]
    return [*argv, "-port", str(facts["epmd_port"])]


def write_config(base: Path, facts: dict[str, Any], kind: Variant, extra: tuple[str, ...] = ()) -> None:
    """enabled_plugins, rabbitmq.conf (+ `extra` lines) and advanced.config of one node."""
    (base / "enabled_plugins").write_text("[rabbitmq_management,rabbitmq_prometheus].\n")
    (base / "rabbitmq.conf").write_text("\n".join([
        f"listeners.tcp.default = 127.0.0.1:{facts['amqp_port']}",
        f"management.tcp.port = {facts['mgmt_port']}",
        "management.tcp.ip = 127.0.0.1",
        f"prometheus.tcp.port = {facts['prom_port']}",
        "prometheus.tcp.ip = 127.0.0.1",
        "loopback_users = none",
        # default_user/default_pass are in advanced.config (below).
        "default_user_tags.administrator = true",
        # Rates in the management API are what the operator reads; sample them often.
        "collect_statistics_interval = 1000",
        "management.rates_mode = basic",
        *([] if kind.metrics_collector else ["management_agent.disable_metrics_collector = true"]),
        "vm_memory_high_watermark.relative = 0.2",
        "disk_free_limit.absolute = 50MB",
        "log.console = false",
        "log.file.level = warning",
        *extra,
        "",
    ]))
    # RabbitMQ 4.0's rabbitmq.conf reads `default_pass = a:b` as a tagged (encrypted) value and
    # the node fails to boot (bad_config_entry_decoder, missing_passphrase) on a password with
    # ':'; advanced.config's Erlang terms take any bytes, on every variant.
    (base / "advanced.config").write_text(
        f"[{{rabbit, [{{default_user, {_erlang_binary(facts['user'])}}}, "
        f"{{default_pass, {_erlang_binary(facts['password'])}}}]}}].\n")


def _mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _root_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:
        return None


def _kill_namespace(namespace: str | None, timeout: float = 10.0) -> None:
    """SIGKILL every process left in a chrooted node's private mount namespace.

    Port programs (memsup, inet_gethost, disk monitor shells) run in sessions of their own,
    so killing the node's process group may miss them; the namespace holds all of them and
    nothing else. It never is the host's namespace (guarded), so no unrelated process dies.
    """
    if namespace is None or namespace == _mount_namespace(os.getpid()):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        members = [int(entry) for entry in os.listdir("/proc")
                   if entry.isdigit() and _mount_namespace(int(entry)) == namespace and state.alive(int(entry))]
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise state.TestbedError(f"processes in mount namespace {namespace} did not exit")


def _stop_pids(record: state.Record, pids: tuple[int, ...]) -> None:
    """Stop process groups (last first) and, for a chrooted node, whatever their namespaces hold."""
    root = record.facts.get("root")
    # Only namespaces of live processes chrooted into this node's root (not a reused pid).
    namespaces = [_mount_namespace(pid) for pid in pids if root and _root_of(pid) == root]
    for pid in reversed(pids):
        state.kill_group(pid)
    for namespace in namespaces:
        _kill_namespace(namespace)


def stop_node(record: state.Record) -> None:
    """Stop only the broker (epmd stays), for outage tests; `start_node` brings it back."""
    _stop_pids(record, record.pids[1:2])


def start_node(record: state.Record, timeout: float = 120.0) -> state.Record:
    facts = dict(record.facts)
    pid = state.spawn(_argv(facts, SERVER), state.STATE_DIR / "logs" / f"{record.component}.log",
                      env=node_env(facts), cwd=facts["base"])
    new = state.Record(record.component, (record.pids[0], pid), facts)
    state.save(new)
    await_startup(facts, timeout, state.STATE_DIR / "logs" / f"{record.component}.log", pid)
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
    _stop_pids(record, record.pids)
    return state.stop(component)
