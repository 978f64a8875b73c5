"""The network-namespace lab (issue 16): forwarding, latency, partition, reset, probes, cleanup.

Real namespaces, veths and a real gateway process; the upstreams are small echo servers on the
host loopback (no broker needed). Every test also checks that the host's links and routes are
exactly what they were: the lab must never touch the host namespace.
"""
from __future__ import annotations

import http.server
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from emailqueue_testbed import netlab, state
from emailqueue_testbed.kubelet import KubeletConfig, LocalKubelet
from emailqueue_testbed.netlab import NetLab

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter")),
                       reason="the lab needs root, unshare and nsenter"),
]


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:  # a reset connection is part of some tests
            pass


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server on the host loopback (the stand-in for RabbitMQ and SMTP)."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _host_network() -> tuple[str, str]:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout
    return links, routes


def _netns_inodes() -> set[int]:
    inodes = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                inodes.add(os.stat(f"/proc/{entry.name}/ns/net").st_ino)
            except OSError:
                pass
    return inodes


@pytest.fixture
def host_network() -> Iterator[tuple[str, str]]:
    """The host's `ip -o link` and `ip route`, checked unchanged after the test."""
    before = _host_network()
    yield before
    assert _host_network() == before, "the host's links or routes changed"


@pytest.fixture
def lab(echo_port: int, host_network: tuple[str, str]) -> Iterator[NetLab]:
    """Two paths: broker (two routes, like a two-node broker) and smtp, all to the echo server."""
    routes = {"amqp-0": ("broker", "127.0.0.1", echo_port), "amqp-1": ("broker", "127.0.0.1", echo_port),
              "smtp": ("smtp", "127.0.0.1", echo_port)}
    with NetLab.up(f"t-{uuid.uuid4().hex[:8]}", routes) as running:
        assert _host_network() == host_network, "the lab changed the host's links or routes"
        yield running


@pytest.fixture
def inside(lab: NetLab) -> ThreadPoolExecutor:
    """Threads inside the clients namespace (W), where the workers run."""
    return lab.pool(4)


def _round_trip(address: tuple[str, int], payload: bytes = b"ping", timeout: float = 5.0) -> float:
    with socket.create_connection(address, timeout=timeout) as conn:
        started = time.monotonic()
        conn.sendall(payload)
        assert _recv_exactly(conn, len(payload)) == payload
        return time.monotonic() - started


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_plan_gives_each_path_a_subnet_and_each_route_a_free_port() -> None:
    paths, routes = netlab.plan({"a": ("broker", "127.0.0.1", 5672), "b": ("broker", "127.0.0.1", 5672),
                                 "s": ("smtp", "127.0.0.1", 2525)})
    assert [(p.client_ip, p.gateway_ip) for p in paths.values()] == [("10.213.1.1", "10.213.1.2"),
                                                                     ("10.213.2.1", "10.213.2.2")]
    # Two routes on one path cannot share a listening port.
    assert [r.listen_port for r in routes.values()] == [5672, 5673, 2525]


def test_forwards_from_inside_the_clients_namespace(lab: NetLab, inside: ThreadPoolExecutor, echo_port: int) -> None:
    # A process started with exec_prefix() (how the kubelet runs workers) reaches the upstream...
    host, port = lab.address("amqp-0")
    client = (f"import socket; c = socket.create_connection(({host!r}, {port}), timeout=5); c.sendall(b'hello'); "
              "print(c.recv(100).decode())")
    out = subprocess.run([*lab.exec_prefix(), sys.executable, "-c", client], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello"
    # ... through every route, and only through the lab: the host's loopback is not W's.
    for label in ("amqp-0", "amqp-1", "smtp"):
        assert inside.submit(_round_trip, lab.address(label)).result() < 1.0
    with pytest.raises(ConnectionRefusedError):
        inside.submit(socket.create_connection, ("127.0.0.1", echo_port), 2).result()


def test_latency_is_added_both_ways_on_one_path_only(lab: NetLab, inside: ThreadPoolExecutor) -> None:
    lab.set_latency("broker", 0.2)
    broker = [inside.submit(_round_trip, lab.address("amqp-0")).result() for _ in range(3)]
    smtp = inside.submit(_round_trip, lab.address("smtp")).result()
    # 0.2 s each way; the upper bound leaves room for a loaded 2-core machine.
    assert all(0.38 <= rtt <= 1.2 for rtt in broker), broker
    assert smtp < 0.2, smtp
    lab.set_latency("broker", 0)
    assert inside.submit(_round_trip, lab.address("amqp-0")).result() < 0.2


def test_jitter_keeps_the_byte_order(lab: NetLab, inside: ThreadPoolExecutor) -> None:
    lab.set_latency("smtp", 0.1, jitter=0.09)

    def burst() -> tuple[bytes, bytes, float]:
        sent = b"".join(b"<%03d>" % i for i in range(30))
        with socket.create_connection(lab.address("smtp"), timeout=10) as conn:
            started = time.monotonic()
            for i in range(0, len(sent), 5):
                conn.sendall(sent[i:i + 5])
                time.sleep(0.005)  # separate chunks, each with its own random hold
            return sent, _recv_exactly(conn, len(sent)), time.monotonic() - started

    sent, received, took = inside.submit(burst).result()
    assert received == sent
    assert took >= 0.02  # at least two holds of ≥ 0.01 s


def test_partition_is_silent_and_heal_restores(lab: NetLab, inside: ThreadPoolExecutor) -> None:
    def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        established = socket.create_connection(lab.address("amqp-0"), timeout=5)
        established.sendall(b"1")
        assert established.recv(10) == b"1"
        lab.partition("broker")
        # An established connection: the send is accepted, the reply never comes, no error.
        established.settimeout(3)
        established.sendall(b"2")
        started = time.monotonic()
        try:
            seen["stalled_recv"] = established.recv(10)
        except TimeoutError:
            seen["stalled_recv"] = "timeout"
        seen["stalled_seconds"] = time.monotonic() - started
        # A new connection times out: no RST (ECONNREFUSED), no "No route to host".
        started = time.monotonic()
        try:
            socket.create_connection(lab.address("amqp-1"), timeout=3).close()
            seen["new_connect"] = "connected"
        except TimeoutError:
            seen["new_connect"] = "timeout"
        except OSError as exc:
            seen["new_connect"] = repr(exc)
        seen["connect_seconds"] = time.monotonic() - started
        # The other path is unaffected.
        seen["smtp_rtt"] = _round_trip(lab.address("smtp"))
        lab.heal("broker")
        seen["healed_rtt"] = _round_trip(lab.address("amqp-1"))
        # TCP retransmits the stalled byte once the path is back (after its back-off).
        established.settimeout(30)
        started = time.monotonic()
        seen["late_reply"] = established.recv(10)
        seen["late_seconds"] = time.monotonic() - started
        established.close()
        return seen

    seen = inside.submit(scenario).result(timeout=90)
    assert seen["stalled_recv"] == "timeout" and seen["stalled_seconds"] >= 2.9, seen
    assert seen["new_connect"] == "timeout" and seen["connect_seconds"] >= 2.9, seen
    assert seen["smtp_rtt"] < 1.0, seen
    assert seen["healed_rtt"] < 1.0, seen
    assert seen["late_reply"] == b"2", seen


def test_reset_aborts_the_paths_connections(lab: NetLab, inside: ThreadPoolExecutor) -> None:
    def scenario() -> tuple[int, str, float]:
        broker = socket.create_connection(lab.address("amqp-0"), timeout=5)
        smtp = socket.create_connection(lab.address("smtp"), timeout=5)
        for conn in (broker, smtp):
            conn.sendall(b"x")
            assert conn.recv(1) == b"x"
        count = lab.reset("broker")
        try:
            broker.recv(10)
            outcome = "no error"
        except ConnectionResetError:
            outcome = "reset"
        smtp.sendall(b"y")
        started = time.monotonic()
        assert smtp.recv(1) == b"y"
        rtt = time.monotonic() - started
        broker.close()
        smtp.close()
        return count, outcome, rtt

    count, outcome, smtp_rtt = inside.submit(scenario).result(timeout=30)
    assert (count, outcome) == (1, "reset")
    assert smtp_rtt < 1.0


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ready" if self.path == "/readyz" else b"nope"
        self.send_response(200 if self.path == "/readyz" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_http_get_and_ready_probe_reach_the_clients_loopback(lab: NetLab, inside: ThreadPoolExecutor) -> None:
    port = state.free_port()
    # Made in a thread inside W: the server listens on W's loopback, not the host's.
    server = inside.submit(http.server.ThreadingHTTPServer, ("127.0.0.1", port), _Ready).result()
    inside.submit(server.serve_forever)
    try:
        assert lab.http_get(port, "/readyz") == (200, b"ready")
        assert lab.http_get(port, "/metrics")[0] == 404
        assert lab.ready_probe(port)
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
    finally:
        server.shutdown()
        server.server_close()
    assert not lab.ready_probe(port)


class _OneReplica:
    """A Deployment that wants one pod (the kubelet's apiserver edge)."""

    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []

    def read(self) -> tuple[int, int | None]:
        return 1, 1

    def patch_status(self, status: Any) -> None:
        self.statuses.append(dict(status))


_FAKE_WORKER = """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer((os.environ["METRICS_HOST"], int(os.environ["METRICS_PORT"])), H).serve_forever()
"""


def test_kubelet_runs_workers_inside_the_lab(lab: NetLab, tmp_path: Path) -> None:
    config = KubeletConfig(command=(*lab.exec_prefix(), sys.executable, "-c", _FAKE_WORKER),
                           probe=lab.ready_probe, log_dir=tmp_path, poll_seconds=0.2,
                           termination_grace_seconds=5)
    kubelet = LocalKubelet(_OneReplica(), config).start()
    try:
        kubelet.wait_ready(1, timeout=30)
        spawn = next(e for e in kubelet.events if e.kind == "spawn")
        pid = int(spawn.detail.split()[-1])
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(lab.netns_path).st_ino
        (port,) = kubelet.metrics_ports().values()
        assert not state.port_open(port)  # the default host probe would never see it ready
    finally:
        kubelet.stop(timeout=5)
    assert not state.alive(pid)


def test_down_leaves_nothing_behind(echo_port: int, host_network: tuple[str, str]) -> None:
    netns_before = _netns_inodes()
    lab = NetLab.up(f"t-{uuid.uuid4().hex[:8]}", {"smtp": ("smtp", "127.0.0.1", echo_port)})
    lab_inodes = {os.stat(f"/proc/{lab.client_pid}/ns/net").st_ino,
                  os.stat(f"/proc/{lab.gateway_ns_pid}/ns/net").st_ino}
    assert not lab_inodes & netns_before
    assert _host_network() == host_network
    pids = lab.record.pids
    # A worker someone left running inside the lab goes too.
    stray = subprocess.Popen([*lab.exec_prefix(), "sleep", "600"], start_new_session=True)
    state.wait_until(lambda: os.stat(f"/proc/{stray.pid}/ns/net").st_ino in lab_inodes, 10, "stray inside W")
    lab.down()
    assert stray.wait(timeout=10) is not None
    assert not [pid for pid in pids if state.alive(pid)]
    assert not lab_inodes & _netns_inodes()
    assert not netlab.netns_holders(lab_inodes)
    assert state.load(lab.component) is None
    assert not Path(lab.record.facts["control"]).exists()
    assert _netns_inodes() - netns_before == set()


def test_down_all_stops_a_lab_a_killed_run_left_behind(echo_port: int, host_network: tuple[str, str]) -> None:
    # A run that built a lab and died without down(): its holders and gateway live on (own sessions).
    name = f"t-{uuid.uuid4().hex[:8]}"
    run = subprocess.run([sys.executable, "-c", "import os, sys; from emailqueue_testbed.netlab import NetLab; "
                          f"NetLab.up({name!r}, {{'smtp': ('smtp', '127.0.0.1', {echo_port})}}); "
                          "sys.stdout.flush(); os._exit(0)"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lab = NetLab.attach(name)
    assert lab is not None
    assert all(state.alive(pid) for pid in lab.record.pids)
    assert lab.component in netlab.down_all()
    assert not [pid for pid in lab.record.pids if state.alive(pid)]
    assert NetLab.attach(name) is None
