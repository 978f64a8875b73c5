"""The broker matrix: RabbitMQ 3.10.8, 3.10.8 without the management metrics collector, and
4.0.x (Debian trixie, chrooted). What the operator's probes rely on must hold on each."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from emailqueue_testbed import rabbit, state

pytestmark = pytest.mark.integration

# What /api/overview reports per variant: (rabbitmq_version prefix, Erlang/OTP major).
EXPECTED = {"3.10": ("3.10.8", "25"), "3.10-nocollector": ("3.10.8", "25"), "4.0": ("4.0.", "27")}


def _publish(url: str, queue: str, bodies: list[bytes]) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as conn:
        channel = conn.channel()
        channel.queue_declare(queue, durable=True)
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))


def _detailed_ready(prom_url: str, vhost: str, queue: str) -> float | None:
    """rabbitmq_detailed_queue_messages_ready of one queue, from the Prometheus plugin."""
    query = urllib.parse.urlencode({"family": "queue_coarse_metrics", "vhost": vhost})
    with urllib.request.urlopen(f"{prom_url}/metrics/detailed?{query}", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "rabbitmq_detailed_queue_messages_ready"
                    and sample.labels == {"vhost": vhost, "queue": queue}):
                return sample.value
    return None


def _eventually(read, expected, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.5)
        value = read()
    return value


def test_node_reports_the_variants_rabbitmq_and_erlang_versions(any_broker):
    overview = any_broker.management().request("GET", "/api/overview")
    version, otp = EXPECTED[any_broker.variant]
    assert overview["rabbitmq_version"].startswith(version)
    assert overview["rabbitmq_version"] == any_broker.version
    assert overview["erlang_version"].split(".")[0] == otp


def test_amqp_round_trip_with_a_password_that_needs_escaping(broker_vhost):
    broker, _, url = broker_vhost
    assert set("/:@%") <= set(broker.mgmt_auth[1])
    bodies = [f"message {n}".encode() for n in range(3)]
    _publish(url, "emails", bodies)
    with pika.BlockingConnection(pika.URLParameters(url)) as conn:
        channel = conn.channel()
        got = []
        for _ in bodies:
            method, _props, body = channel.basic_get("emails", auto_ack=True)
            assert method is not None
            got.append(body)
    assert got == bodies


def test_queue_depth_in_management_api_unless_collector_disabled_and_always_in_prometheus(broker_vhost):
    broker, vhost, url = broker_vhost
    _publish(url, "emails", [b"x"] * 7)
    # The Prometheus plugin reads the queue's own counters: right on every variant.
    assert _eventually(lambda: _detailed_ready(broker.prom_url, vhost, "emails"), 7) == 7
    mgmt = broker.management()
    if broker.variant == "3.10-nocollector":
        # Several collection intervals (1 s here) later, the queue is listed but carries no counts.
        time.sleep(3)
        queue = mgmt.queue(vhost, "emails")
        assert queue["name"] == "emails"
        assert not {"messages_ready", "messages", "messages_unacknowledged", "message_stats"} & set(queue)
    else:
        assert _eventually(lambda: mgmt.queue(vhost, "emails").get("messages_ready"), 7) == 7


def _mounts_under(path: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if path in line]


def _processes_rooted_in(root: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/root") == root and state.alive(int(entry)):
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_rabbitmq4_life_cycle_leaves_no_process_mount_or_change_in_the_root_behind():
    root = str(rabbit.rootfs())
    component = f"rabbitmq4-lifecycle-{os.getpid()}"
    already_there = set(_processes_rooted_in(root))  # e.g. the shared rabbitmq4 node
    started_at = time.time()
    record = rabbit.up(component=component, variant="4.0")
    try:
        facts = record.facts
        server = record.pids[1]
        # The node's mounts exist only in its own namespace; the root is mounted read-only there.
        assert _mounts_under(root) == []
        assert os.readlink(f"/proc/{server}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        inner = Path(f"/proc/{server}/mountinfo").read_text().splitlines()
        assert any(line.split()[4] == "/" and "ro" in line.split()[5].split(",") for line in inner
                   if root in line)
        # rabbitmqctl (chrooted too) authenticates with the cookie in the node's HOME.
        assert facts["node"] in rabbit.ctl(facts, "status")
        assert (Path(facts["base"]) / "home" / ".erlang.cookie").exists()

        rabbit.stop_node(record)
        assert not rabbit.healthy(record)
        record = rabbit.start_node(record)
        assert rabbit.healthy(record)
    finally:
        assert rabbit.down(component)
    try:
        assert subprocess.run(["pgrep", "-f", facts["node"].split("@")[0]], capture_output=True).returncode == 1
        assert set(_processes_rooted_in(root)) <= already_there
        assert _mounts_under(root) == []
        for port in ("amqp_port", "mgmt_port", "prom_port", "epmd_port", "dist_port"):
            assert not state.port_open(facts[port]), port
        changed = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                   if os.lstat(os.path.join(d, f)).st_mtime >= started_at]
        assert changed == []
    finally:
        shutil.rmtree(facts["base"], ignore_errors=True)
