"""Where the test bed keeps its state: folders, ports, pid files and `.testbed/env`.

Every component records what it started in `.testbed/<component>.json` so a second
process (another pytest session, `make testbed-down`) can find, reuse or stop it.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("EQ_TESTBED_DIR", REPO / ".testbed"))
CACHE_DIR = Path(os.environ.get("EQ_TESTBED_CACHE", Path.home() / ".cache" / "emailqueue-testbed"))


class TestbedError(RuntimeError):
    """A test bed component could not be built, started or reached."""


def versions() -> dict[str, str]:
    """The pinned binary versions from testbed/versions.env."""
    pins: dict[str, str] = {}
    for line in (REPO / "testbed" / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            pins[key] = value
    return pins


def binary(name: str) -> Path:
    """Path of a cached test bed binary (kube-apiserver, kubectl, etcd, helm, promtool, prometheus)."""
    pins = versions()
    key = {"kube-apiserver": "KUBERNETES_VERSION", "kubectl": "KUBERNETES_VERSION",
           "etcd": "ETCD_VERSION", "helm": "HELM_VERSION", "promtool": "PROMETHEUS_VERSION",
           "prometheus": "PROMETHEUS_VERSION"}[name]
    path = CACHE_DIR / "bin" / f"{name}-{pins[key]}"
    if not path.exists():
        raise TestbedError(f"{path} is not built: run `make testbed-bins` (testbed/build-bins.sh)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(check, timeout: float, what: str, interval: float = 0.25, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    tail = ""
    if log and log.exists():
        last = log.read_text(errors="replace").splitlines()[-30:]
        tail = f"\n--- last lines of {log} ---\n" + "\n".join(last)
    raise TestbedError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


@dataclass(frozen=True)
class Record:
    """What a component left behind: its pids (process-group leaders) and its facts."""

    component: str
    pids: tuple[int, ...]
    facts: Mapping[str, Any]

    @property
    def path(self) -> Path:
        return STATE_DIR / f"{self.component}.json"


def save(record: Record) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    record.path.write_text(json.dumps({"pids": list(record.pids), "facts": dict(record.facts)}, indent=2))


def load(component: str) -> Record | None:
    path = STATE_DIR / f"{component}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return Record(component, tuple(data["pids"]), data["facts"])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def spawn(argv: Sequence[str | os.PathLike[str]], log: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> int:
    """Start a process in its own session (so it outlives pytest and is killed as a group)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n$ {shlex.join(map(str, argv))}\n".encode())
        out.flush()
        proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(env) if env else None, cwd=cwd,
                                start_new_session=True)
    return proc.pid


def kill_group(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group led by pid, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not alive(pid):
                # Also wait for the rest of the group to go.
                try:
                    os.killpg(pid, 0)
                except ProcessLookupError:
                    return
            time.sleep(0.1)


def stop(component: str) -> bool:
    record = load(component)
    if record is None:
        return False
    for pid in reversed(record.pids):
        kill_group(pid)
    record.path.unlink(missing_ok=True)
    return True
