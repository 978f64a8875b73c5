"""A network-namespace lab for fault injection between workers and broker/SMTP (issue 16).

`NetLab.up(name, routes)` builds two network namespaces and a gateway between them:

- **clients** (W): where worker processes run (`lab.exec_prefix()` puts a command there).
  W sees only its loopback and one veth per *path* ("broker", "smtp", ...): it cannot
  reach the host's loopback, so a worker talks to the broker or SMTP only through the lab;
- **gateway** (G): the other end of every veth, each path on its own /30 in 10.213.<k>.0;
- a **gateway process** (`python -m emailqueue_testbed.netlab gateway --config JSON`) in
  the host namespace whose listening sockets were made inside G (setns on one thread, then
  back): it accepts on G's address of a route's path and forwards to the route's upstream
  on the host loopback (the shared RabbitMQ, the recording SMTP server).

Faults, per path:

- `partition(path)` — a real partition: G's veth of that path goes down, so the kernel
  drops every packet on the path in both directions, silently. No RST, no ICMP error (the
  neighbours are static entries, so no failed ARP turns into "No route to host"): an
  established connection's recv just hangs, a new connect times out. `heal(path)` brings
  the link back; TCP retransmissions resume and new connections work.
- `set_latency(path, seconds, jitter)` — every chunk the gateway forwards on that path is
  held `seconds ± jitter` before it is written on, in both directions, in order. This is
  done in user space because this kernel has no `netem` qdisc (nor iptables/nft).
- `reset(path)` — the gateway aborts every connection on the path (RST to both ends).

Safety: traffic stays on loopback or inside the lab's namespaces. Nothing is added to the
host namespace (no links, addresses, routes, qdiscs, sysctls, firewall rules, no `ip netns
add` mounts): each namespace is held by an `unshare --net sleep infinity` process recorded
in `.testbed/netlab-<name>.json`, and every `ip` command runs through nsenter after checking
that the target namespace is not the host's. `down()` (and `down_all()`, which `bed.down()`
calls for labs a killed run left behind) kills the gateway, any process still inside the
lab's namespaces and the holders; the namespaces and their veths vanish with them.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import http.client
import json
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import state

log = logging.getLogger("emailqueue_testbed.netlab")

COMPONENT_PREFIX = "netlab-"
CLONE_NEWNET = 0x40000000
SUBNET = "10.213"
"""Path k (1-based) gets 10.213.k.0/30: W side .1, G side .2 (they exist only inside the lab)."""
READY_PATH = "/readyz"
"""What the kubelet's readiness probe GETs (kubelet._ready)."""


class NetLabError(state.TestbedError):
    """The lab could not be built, driven or cleaned up."""


# --------------------------------------------------------------------------- pure plan
@dataclass(frozen=True)
class PathLink:
    """One path's veth pair: W side `client_if`/`client_ip`, G side `gateway_if`/`gateway_ip`."""

    name: str
    index: int
    client_if: str
    gateway_if: str
    client_ip: str
    gateway_ip: str


@dataclass(frozen=True)
class Route:
    """A route: W connects to (path's gateway_ip, listen_port); the gateway forwards to upstream."""

    label: str
    path: str
    listen_port: int
    upstream_host: str
    upstream_port: int


def plan(routes: Mapping[str, tuple[str, str, int]]) -> tuple[dict[str, PathLink], dict[str, Route]]:
    """Paths (in order of first use) and routes; a route listens on its upstream's port when free on its path."""
    if not routes:
        raise ValueError("a lab needs at least one route")
    paths: dict[str, PathLink] = {}
    planned: dict[str, Route] = {}
    used: dict[str, set[int]] = {}
    for label, (path, host, port) in routes.items():
        if path not in paths:
            k = len(paths) + 1
            if k > 250:
                raise ValueError("at most 250 paths")
            paths[path] = PathLink(path, k, f"nlw{k}", f"nlg{k}", f"{SUBNET}.{k}.1", f"{SUBNET}.{k}.2")
        taken = used.setdefault(path, set())
        listen = int(port)
        while listen in taken:
            listen = listen + 1 if listen < 65535 else 1024
        taken.add(listen)
        planned[label] = Route(label, path, listen, host, int(port))
    return paths, planned


# --------------------------------------------------------------------------- namespaces
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter_netns(ns_path: str) -> None:
    """Move the calling thread (only it) into the network namespace at ns_path."""
    fd = os.open(ns_path, os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def in_netns(ns_path: str) -> Iterator[None]:
    """Run the block's socket creation in another namespace (this thread), then come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter_netns(ns_path)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def _inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _host_inodes() -> set[int]:
    # /proc/self is the main thread (a pool thread of ours may sit inside the lab).
    return {i for i in (_inode("self"), _inode(1)) if i is not None}


def netns_holders(inodes: set[int], threads: bool = True) -> dict[int, int]:
    """pid → namespace inode of every process in one of these namespaces (with `threads`: any of its threads)."""
    found: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            tids = os.listdir(f"/proc/{entry.name}/task") if threads else [entry.name]
        except OSError:
            continue
        for tid in tids:
            try:
                ino = os.stat(f"/proc/{entry.name}/task/{tid}/ns/net").st_ino
            except OSError:
                continue
            if ino in inodes:
                found[int(entry.name)] = ino
                break
    return found


def _ip(pid: int, inode: int, *args: str) -> str:
    """`ip ARGS` inside the namespace held by pid, after checking it is that one and not the host's."""
    now = _inode(pid)
    if now != inode or now in _host_inodes():
        raise NetLabError(f"refusing `ip {' '.join(args)}`: /proc/{pid}/ns/net is not the lab's namespace")
    result = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "--", "ip", *args],
                            capture_output=True, text=True, timeout=15)
    if result.returncode != 0:
        raise NetLabError(f"ip {' '.join(args)} (netns of {pid}) failed: {result.stderr.strip()}")
    return result.stdout


def _hold_netns(log: Path) -> tuple[int, int]:
    """Start a sleeper in a new network namespace; (pid, namespace inode) once it has unshared."""
    pid = state.spawn(["unshare", "--net", "--", "sleep", "infinity"], log)
    host = _host_inodes()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ino = _inode(pid)
        if ino is not None and ino not in host:
            return pid, ino
        if not state.alive(pid):
            break
        time.sleep(0.02)
    state.kill_group(pid)
    raise NetLabError(f"`unshare --net` (pid {pid}) did not make a network namespace; see {log}")


# --------------------------------------------------------------------------- the lab
class NetLab:
    """A running lab (see the module docstring). Build it with `NetLab.up`, end it with `down()`."""

    def __init__(self, record: state.Record) -> None:
        self.record = record
        facts = record.facts
        self.name: str = facts["name"]
        self.paths = {name: PathLink(**link) for name, link in facts["paths"].items()}
        self.routes = {label: Route(**route) for label, route in facts["routes"].items()}
        self.client_pid: int = facts["client_pid"]
        self.gateway_ns_pid: int = facts["gateway_ns_pid"]
        self._inodes: dict[str, int] = facts["inodes"]
        self._pools: list[ThreadPoolExecutor] = []
        self._probe_pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def component(self) -> str:
        return self.record.component

    @property
    def netns_path(self) -> str:
        """The clients namespace (W), for nsenter or setns."""
        return f"/proc/{self.client_pid}/ns/net"

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def up(cls, name: str, routes: Mapping[str, tuple[str, str, int]], timeout: float = 30.0) -> NetLab:
        """Namespaces, veths, static neighbours, the gateway; returns once every route accepts in W."""
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"lab name {name!r}: letters, digits, '-' and '_' only")
        paths, planned = plan(routes)
        component = COMPONENT_PREFIX + name
        _down_record(component)  # a lab of that name a killed run left behind
        log = state.STATE_DIR / "logs" / f"{component}.log"
        client_pid, client_ino = _hold_netns(log)
        facts: dict[str, Any] = {
            "name": name, "client_pid": client_pid, "gateway_ns_pid": None,
            "paths": {p.name: p.__dict__ for p in paths.values()},
            "routes": {r.label: r.__dict__ for r in planned.values()},
            "inodes": {"clients": client_ino}, "control": _control_path(name),
            "log": str(log),
        }
        state.save(state.Record(component, (client_pid,), facts))
        lab: NetLab | None = None
        try:
            gateway_ns_pid, gateway_ino = _hold_netns(log)
            facts["gateway_ns_pid"] = gateway_ns_pid
            facts["inodes"]["gateway"] = gateway_ino
            state.save(state.Record(component, (client_pid, gateway_ns_pid), facts))
            _wire(client_pid, client_ino, gateway_ns_pid, gateway_ino, paths.values())
            config = {"netns": f"/proc/{gateway_ns_pid}/ns/net", "control": facts["control"],
                      "routes": [{**r.__dict__, "listen_host": paths[r.path].gateway_ip} for r in planned.values()]}
            gateway_pid = state.spawn([sys.executable, "-m", "emailqueue_testbed.netlab", "gateway",
                                       "--config", json.dumps(config)], log)
            facts["gateway_pid"] = gateway_pid
            record = state.Record(component, (client_pid, gateway_ns_pid, gateway_pid), facts)
            state.save(record)
            lab = cls(record)
            state.wait_until(lambda: lab._control({"op": "ping"}, check=False).get("ok") is True, timeout,
                             f"netlab {name}: gateway control", interval=0.1, log=log)
            for label in planned:
                state.wait_until(lambda label=label: lab._accepts(label), timeout,
                                 f"netlab {name}: route {label} accepting in the clients namespace",
                                 interval=0.1, log=log)
        except BaseException:
            if lab is not None:
                lab.down()
            else:
                _down_record(component)
            raise
        return lab

    @classmethod
    def attach(cls, name: str) -> NetLab | None:
        """The running lab of that name (started by another process), or None."""
        record = state.load(COMPONENT_PREFIX + name)
        return None if record is None else cls(record)

    # -- where things are --------------------------------------------------------------------
    def address(self, label: str) -> tuple[str, int]:
        """What a process inside W connects to for the route `label`."""
        route = self.routes[label]
        return self.paths[route.path].gateway_ip, route.listen_port

    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command inside W (nsenter execs it: the pid is the command's)."""
        return ["nsenter", f"--net={self.netns_path}", "--"]

    def pool(self, max_workers: int = 4) -> ThreadPoolExecutor:
        """Threads that live inside W (their sockets are W's). `down()` shuts them down."""
        pool = ThreadPoolExecutor(max_workers=max_workers, initializer=enter_netns, initargs=(self.netns_path,),
                                  thread_name_prefix=f"netlab-{self.name}")
        with self._lock:
            self._pools.append(pool)
        return pool

    # -- faults ------------------------------------------------------------------------------
    def partition(self, path: str) -> None:
        """Drop every packet on `path`, both ways, silently (G's veth down); see the module docstring."""
        link = self.paths[path]
        _ip(self.gateway_ns_pid, self._inodes["gateway"], "link", "set", "dev", link.gateway_if, "down")

    def heal(self, path: str) -> None:
        """Undo `partition(path)`: G's veth up, its static neighbour back (a link going down flushes it)."""
        link = self.paths[path]
        gw_pid, gw_ino = self.gateway_ns_pid, self._inodes["gateway"]
        _ip(gw_pid, gw_ino, "link", "set", "dev", link.gateway_if, "up")
        client_mac = _mac(self.client_pid, self._inodes["clients"], link.client_if)
        _ip(gw_pid, gw_ino, "neigh", "replace", link.client_ip, "lladdr", client_mac, "dev", link.gateway_if,
            "nud", "permanent")

    def set_latency(self, path: str, seconds: float, jitter: float = 0.0) -> None:
        """Hold each chunk on `path` `seconds ± jitter` (both directions, order kept); 0 turns it off."""
        if path not in self.paths:
            raise KeyError(path)
        if seconds < 0 or jitter < 0:
            raise ValueError("latency and jitter are ≥ 0")
        self._control({"op": "latency", "path": path, "seconds": seconds, "jitter": jitter})

    def reset(self, path: str) -> int:
        """Abort every connection on `path` (RST both ways); how many there were."""
        if path not in self.paths:
            raise KeyError(path)
        return int(self._control({"op": "reset", "path": path})["reset"])

    def connections(self) -> dict[str, int]:
        """Open forwarded connections per path."""
        return dict(self._control({"op": "stats"})["connections"])

    # -- probing inside W ----------------------------------------------------------------------
    def http_get(self, port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes]:
        """GET http://127.0.0.1:port/path inside W: (status, body). Raises OSError when nothing answers."""
        return self._prober().submit(_http_get, port, path, timeout).result(timeout + 5)

    def ready_probe(self, port: int) -> bool:
        """The kubelet's readiness probe for a worker inside W: GET /readyz answers 200."""
        try:
            return self.http_get(port, READY_PATH, timeout=0.5)[0] == 200
        except (OSError, http.client.HTTPException, TimeoutError):
            return False

    # -- ending ------------------------------------------------------------------------------
    def down(self) -> None:
        """Kill the gateway, whatever still runs inside the lab, and the holders; check the namespaces went."""
        with self._lock:
            pools = [*self._pools, *([self._probe_pool] if self._probe_pool else [])]
            self._pools, self._probe_pool = [], None
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        _down_record(self.component)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- internals ---------------------------------------------------------------------------
    def _control(self, request: Mapping[str, Any], check: bool = True) -> dict[str, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(self.record.facts["control"])
                sock.sendall(json.dumps(request).encode() + b"\n")
                reply = sock.makefile("rb").readline()
        except OSError as exc:
            if not check:
                return {}
            raise NetLabError(f"netlab {self.name}: gateway control unreachable ({exc}); "
                              f"see {self.record.facts['log']}") from exc
        answer: dict[str, Any] = json.loads(reply or b"{}")
        if check and not answer.get("ok"):
            raise NetLabError(f"netlab {self.name}: gateway refused {request}: {answer.get('error')}")
        return answer

    def _accepts(self, label: str) -> bool:
        def connect(address: tuple[str, int]) -> bool:
            try:
                with socket.create_connection(address, timeout=1):
                    return True
            except OSError:
                return False

        return self._prober().submit(connect, self.address(label)).result(10)

    def _prober(self) -> ThreadPoolExecutor:
        """One thread inside W for probes: a socket per call, no process per call."""
        with self._lock:
            if self._probe_pool is None:
                self._probe_pool = ThreadPoolExecutor(max_workers=1, initializer=enter_netns,
                                                      initargs=(self.netns_path,),
                                                      thread_name_prefix=f"netlab-{self.name}-probe")
            return self._probe_pool


def _http_get(port: int, path: str, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _control_path(name: str) -> str:
    # A pathname socket, not an abstract one: abstract names live in a network namespace, and
    # the lab is driven from threads inside W too. sun_path holds 107 bytes: /tmp when the state dir is deep.
    path = state.STATE_DIR / f"{COMPONENT_PREFIX}{name}.sock"
    if len(str(path)) > 100:
        path = Path(tempfile.gettempdir()) / f"emailqueue-{COMPONENT_PREFIX}{name}-{uuid.uuid4().hex[:8]}.sock"
    return str(path)


def _mac(pid: int, inode: int, dev: str) -> str:
    return json.loads(_ip(pid, inode, "-j", "link", "show", "dev", dev))[0]["address"]


def _wire(client_pid: int, client_ino: int, gw_pid: int, gw_ino: int, links: Iterable[PathLink]) -> None:
    """Loopbacks up; per path a veth made in W with its peer born in G, addresses, static neighbours."""
    for pid, ino in ((client_pid, client_ino), (gw_pid, gw_ino)):
        _ip(pid, ino, "link", "set", "dev", "lo", "up")
    for link in links:
        # `peer ... netns <pid>`: the peer is created inside G, never in the host namespace.
        _ip(client_pid, client_ino, "link", "add", "name", link.client_if, "type", "veth",
            "peer", "name", link.gateway_if, "netns", str(gw_pid))
        _ip(client_pid, client_ino, "addr", "add", f"{link.client_ip}/30", "dev", link.client_if)
        _ip(gw_pid, gw_ino, "addr", "add", f"{link.gateway_ip}/30", "dev", link.gateway_if)
        client_mac = _mac(client_pid, client_ino, link.client_if)
        gateway_mac = _mac(gw_pid, gw_ino, link.gateway_if)
        # Static neighbours: with no ARP to fail, a partition is silence, not "No route to host".
        _ip(client_pid, client_ino, "neigh", "replace", link.gateway_ip, "lladdr", gateway_mac,
            "dev", link.client_if, "nud", "permanent")
        _ip(gw_pid, gw_ino, "neigh", "replace", link.client_ip, "lladdr", client_mac,
            "dev", link.gateway_if, "nud", "permanent")
        _ip(client_pid, client_ino, "link", "set", "dev", link.client_if, "up")
        _ip(gw_pid, gw_ino, "link", "set", "dev", link.gateway_if, "up")


def _kill(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and state.alive(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        if not state.alive(pid):
            return


def _down_record(component: str, strict: bool = True) -> bool:
    """Stop one lab from its record: gateway, then processes inside its namespaces, then the holders.

    A process that only has a thread inside (a test runner probing through `pool()`) is not
    killed: with `strict` that is an error (shut the threads down first), else a warning.
    """
    record = state.load(component)
    if record is None:
        return False
    facts = record.facts
    holders = {facts.get("client_pid"): facts.get("inodes", {}).get("clients"),
               facts.get("gateway_ns_pid"): facts.get("inodes", {}).get("gateway")}
    # Only namespaces whose recorded holder still holds them are ours for sure (inodes get reused).
    ours = {ino for pid, ino in holders.items() if pid and ino and _inode(pid) == ino}
    if facts.get("gateway_pid"):
        state.kill_group(facts["gateway_pid"])
    me = os.getpid()
    strays = {pid for pid in netns_holders(ours, threads=False) if pid not in holders and pid != me}
    for pid in strays:  # workers the lab's users left running inside it
        _kill(pid)
    state.stop(component)
    if facts.get("control"):
        Path(facts["control"]).unlink(missing_ok=True)
    left = sorted(netns_holders(ours))
    if left:
        message = (f"{component}: processes {left} still have threads inside its namespaces, which live on "
                   "until those threads exit (shut down the pools that entered the lab)")
        if strict:
            raise NetLabError(message)
        log.warning("%s", message)
    return True


def down_all() -> list[str]:
    """Stop every lab a run left behind (`netlab-*` records); the names stopped."""
    stopped = []
    for path in sorted(state.STATE_DIR.glob(f"{COMPONENT_PREFIX}*.json")):
        if _down_record(path.stem, strict=False):
            stopped.append(path.stem)
    return stopped


# --------------------------------------------------------------------------- the gateway process
class Gateway:
    """Forwards accepted connections to their upstreams with per-path latency; reset on demand."""

    def __init__(self, routes: Sequence[Mapping[str, Any]]) -> None:
        self.routes = routes
        self.latency: dict[str, tuple[float, float]] = {r["path"]: (0.0, 0.0) for r in routes}
        self.connections: dict[str, set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]]] = {
            r["path"]: set() for r in routes}

    async def serve(self, listeners: Sequence[tuple[Mapping[str, Any], socket.socket]], control: str) -> None:
        servers = [await asyncio.start_server(lambda r, w, route=route: self._forward(route, r, w), sock=sock)
                   for route, sock in listeners]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        servers.append(await asyncio.start_unix_server(self._control, path=control))
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        print(f"netlab gateway: {len(listeners)} routes, control {control}", flush=True)
        await stopping.wait()
        for server in servers:
            server.close()
        for path in self.connections:
            self.reset(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)

    async def _forward(self, route: Mapping[str, Any], down_reader: asyncio.StreamReader,
                       down_writer: asyncio.StreamWriter) -> None:
        path = route["path"]
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(route["upstream_host"], route["upstream_port"]), 10)
        except (OSError, TimeoutError) as exc:
            print(f"netlab gateway: {route['label']}: upstream unreachable: {exc}", flush=True)
            _abort(down_writer)
            return
        pair = (down_writer, up_writer)
        self.connections[path].add(pair)
        pumps = [asyncio.create_task(self._pump(path, down_reader, up_writer)),
                 asyncio.create_task(self._pump(path, up_reader, down_writer))]
        try:
            done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            if any(t.exception() for t in done):
                for task in pending:
                    task.cancel()
                for writer in pair:
                    _abort(writer)
        finally:
            self.connections[path].discard(pair)
            for writer in pair:
                writer.close()

    async def _pump(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy reader → writer, each chunk due at arrival + this path's latency (never before the previous)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=1024)

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()

        delivery = asyncio.create_task(deliver())
        last_due = 0.0
        try:
            while True:
                chunk = await reader.read(65536)
                delay, jitter = self.latency[path]
                held = max(0.0, delay + random.uniform(-jitter, jitter)) if delay or jitter else 0.0
                last_due = max(loop.time() + held, last_due)
                await queue.put((last_due, chunk))
                if not chunk:
                    break
            await delivery
        finally:
            delivery.cancel()

    def reset(self, path: str) -> int:
        pairs = list(self.connections[path])
        for pair in pairs:
            for writer in pair:
                _abort(writer)
        return len(pairs)

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            op = request["op"]
            if op == "ping":
                answer: dict[str, Any] = {"ok": True}
            elif op == "latency":
                self.latency[request["path"]] = (float(request["seconds"]), float(request.get("jitter", 0.0)))
                answer = {"ok": True}
            elif op == "reset":
                answer = {"ok": True, "reset": self.reset(request["path"])}
            elif op == "stats":
                answer = {"ok": True, "connections": {p: len(c) for p, c in self.connections.items()}}
            else:
                answer = {"ok": False, "error": f"unknown op {op!r}"}
        except (ValueError, KeyError) as exc:
            answer = {"ok": False, "error": repr(exc)}
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()
        writer.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), not FIN: what a broken middlebox or a killed peer looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _listen_inside(netns: str, routes: Sequence[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], socket.socket]]:
    """The routes' listening sockets, made inside G (a socket keeps the namespace it was born in)."""
    listeners = []
    with in_netns(netns):
        for route in routes:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((route["listen_host"], route["listen_port"]))
            sock.listen(128)
            sock.setblocking(False)
            listeners.append((route, sock))
    return listeners


def gateway_main(config: Mapping[str, Any]) -> int:
    listeners = _listen_inside(config["netns"], config["routes"])
    asyncio.run(Gateway(config["routes"]).serve(listeners, config["control"]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emailqueue_testbed.netlab")
    sub = parser.add_subparsers(dest="command", required=True)
    gateway = sub.add_parser("gateway", help="run a lab's gateway (NetLab.up starts it)")
    gateway.add_argument("--config", required=True, help="JSON: netns, control, routes")
    sub.add_parser("down-all", help="stop every lab a run left behind")
    args = parser.parse_args(argv)
    if args.command == "gateway":
        return gateway_main(json.loads(args.config))
    print("\n".join(down_all()))
    return 0


__all__ = ["NetLab", "NetLabError", "PathLink", "Route", "plan", "down_all", "enter_netns", "in_netns",
           "netns_holders"]

if __name__ == "__main__":
    sys.exit(main())
