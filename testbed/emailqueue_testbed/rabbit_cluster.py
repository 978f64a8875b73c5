"""Three RabbitMQ nodes of the test bed's own, clustered (issue #16's broker for failover tests).

Each node is a 3.10 node as `rabbit` starts one (own name, data dir, AMQP/management/
Prometheus/distribution ports, every listener on 127.0.0.1), and all three register with one
epmd of the cluster's own and share one Erlang cookie, so they find each other. They form the
cluster at first boot by peer discovery from a fixed list (`classic_config`), node 0 first.
Quorum queues declared on it are replicated on all three nodes (the initial group size
defaults to the cluster's size).

`kill(i)` SIGKILLs one node (the leader of a quorum queue, say) and `start(i)` brings it back on
the same ports and data; `freeze(i)`/`thaw(i)` SIGSTOP/SIGCONT one (it stops answering clients and
peers alike, as a node cut off by the network does); `down` stops every process it started.
Nothing leaves loopback.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from . import rabbit, state

COMPONENT = "rabbitmq-cluster"
NODES = 3


def _node_facts(record: state.Record, index: int) -> dict[str, Any]:
    return dict(record.facts["nodes"][index])


def node_record(record: state.Record, index: int) -> state.Record:
    """A single-node view of node `index` (for `rabbit.management`, `rabbit.amqp_url`)."""
    return state.Record(f"{record.component}-n{index}", (record.pids[0], record.pids[1 + index]),
                        _node_facts(record, index))


def amqp_urls(record: state.Record, vhost: str = "/") -> list[str]:
    """Every node's AMQP URL, node 0 first (join them with ", " for a client's node list)."""
    return [rabbit.amqp_url(node_record(record, i), vhost) for i in range(len(record.facts["nodes"]))]


def node_healthy(record: state.Record, index: int) -> bool:
    pid = record.pids[1 + index]
    return state.alive(pid) and rabbit.healthy(node_record(record, index))


def healthy(record: state.Record | None) -> bool:
    if record is None or "nodes" not in record.facts or not state.alive(record.pids[0]):
        return False
    return all(node_healthy(record, i) for i in range(len(record.facts["nodes"])))


def running_nodes(record: state.Record, index: int = 0) -> list[str]:
    """Cluster members running, as node `index` sees them."""
    status = json.loads(rabbit.ctl(_node_facts(record, index), "cluster_status", "--formatter", "json", timeout=30))
    return sorted(status.get("running_nodes") or [])


def up(component: str = COMPONENT, nodes: int = NODES, timeout: float = 120.0) -> state.Record:
    """Start the cluster unless a healthy one is running; returns its record (pids: epmd, node 0..n-1)."""
    record = state.load(component)
    if healthy(record):
        assert record is not None
        return record
    if not rabbit.SERVER.exists():
        raise state.TestbedError("rabbitmq-server is not installed: run testbed/install-deps.sh")
    down(component)
    base = state.STATE_DIR / component
    shutil.rmtree(base, ignore_errors=True)
    cookie = secrets.token_hex(20)
    epmd_port = state.free_port()
    names = [f"eqtb-{component}-{i}-{os.getpid()}@localhost" for i in range(nodes)]
    password = "tb-" + secrets.token_hex(6) + "/:@%"   # characters that need escaping, as on one node
    peers = tuple(f"cluster_formation.classic_config.nodes.{i + 1} = {name}" for i, name in enumerate(names))
    all_facts = []
    for i, name in enumerate(names):
        node_base = base / f"n{i}"
        (node_base / "home").mkdir(parents=True)
        cookie_file = node_base / "home" / ".erlang.cookie"
        cookie_file.write_text(cookie)
        cookie_file.chmod(0o400)
        facts: dict[str, Any] = {
            "base": str(node_base), "node": name, "variant": "3.10", "root": None, "version": rabbit.HOST_VERSION,
            "amqp_port": state.free_port(), "mgmt_port": state.free_port(), "prom_port": state.free_port(),
            "dist_port": state.free_port(), "epmd_port": epmd_port, "user": "testbed", "password": password,
        }
        facts["mgmt_url"] = f"http://127.0.0.1:{facts['mgmt_port']}"
        rabbit.write_config(node_base, facts, rabbit.VARIANTS["3.10"],
                            ("cluster_formation.peer_discovery_backend = classic_config", *peers))
        all_facts.append(facts)
    logs = state.STATE_DIR / "logs"
    epmd_pid = state.spawn(rabbit.epmd_argv(all_facts[0]), logs / f"{component}-epmd.log",
                           env=rabbit.node_env(all_facts[0]))
    record = state.Record(component, (epmd_pid,), {"nodes": all_facts, "base": str(base)})
    state.save(record)
    try:
        state.wait_until(lambda: state.port_open(epmd_port), 15, "epmd", log=logs / f"{component}-epmd.log")
        for i in range(nodes):  # one after the other: each joins the ones already running
            record = _start(record, i, timeout)
        state.wait_until(lambda: len(running_nodes(record)) == nodes, 60, f"{nodes} running cluster nodes")
    except BaseException:
        down(component)
        raise
    return record


def _start(record: state.Record, index: int, timeout: float) -> state.Record:
    facts = _node_facts(record, index)
    log = state.STATE_DIR / "logs" / f"{record.component}-n{index}.log"
    pid = state.spawn(rabbit._argv(facts, rabbit.SERVER), log, env=rabbit.node_env(facts), cwd=facts["base"])
    pids = list(record.pids) + [0] * max(0, 2 + index - len(record.pids))
    pids[1 + index] = pid
    record = state.Record(record.component, tuple(pids), record.facts)
    state.save(record)
    rabbit.await_startup(facts, timeout, log, pid)
    state.wait_until(lambda: rabbit.healthy(node_record(record, index)), 60, f"node {index}'s management API",
                     log=log)
    return record


def start(record: state.Record, index: int, timeout: float = 120.0) -> state.Record:
    """Start node `index` again (same name, ports and data: it rejoins the cluster)."""
    return _start(record, index, timeout)


def kill(record: state.Record, index: int) -> None:
    """SIGKILL node `index` (no clean shutdown); the other nodes keep running."""
    pid = record.pids[1 + index]
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while state.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if state.alive(pid):
        raise state.TestbedError(f"node {index} (pid {pid}) survived SIGKILL")


def freeze(record: state.Record, index: int) -> None:
    """SIGSTOP node `index`: its sockets stay open but nothing answers, to clients or to its peers
    (what a node cut off by the network looks like from both sides); `thaw` resumes it."""
    os.killpg(record.pids[1 + index], signal.SIGSTOP)


def thaw(record: state.Record, index: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(record.pids[1 + index], signal.SIGCONT)


def index_of(record: state.Record, node_name: str) -> int:
    """Which node (0..n-1) has this Erlang node name (e.g. a quorum queue's `leader`)."""
    return [facts["node"] for facts in record.facts["nodes"]].index(node_name)


def down(component: str = COMPONENT) -> bool:
    record = state.load(component)
    if record is None:
        return False
    for pid in reversed(record.pids):
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGCONT)   # a frozen node cannot act on SIGTERM
            state.kill_group(pid, timeout=0.5)  # throwaway nodes: their data goes with them
    base = record.facts.get("base")
    stopped = state.stop(component)
    if base:
        shutil.rmtree(Path(base), ignore_errors=True)
    return stopped
