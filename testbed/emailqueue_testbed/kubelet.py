"""A local kubelet for one worker Deployment on the test bed (issue 7).

The test bed has a bare kube-apiserver: no controller-manager, scheduler or kubelet, so
a Deployment's `spec.replicas` changes (the operator's `/scale` writes) but nothing runs.
`LocalKubelet` plays the missing parts for one Deployment, with real processes:

- it polls the Deployment (every `poll_seconds`, default 0.5 s) and keeps that many
  "pods" — each one a real `email-worker run` process with its own metrics port;
- a new pod is *pending* for `startup_delay_seconds` (image pull, container start), then
  its process is spawned; it counts as ready once its `/readyz` answers 200;
- surplus pods get SIGTERM (the worker drains in-flight sends and requeues the rest) and
  are reaped; like the ReplicaSet controller, not-ready pods go first, then the newest;
  a pod that ignores SIGTERM past `termination_grace_seconds` gets SIGKILL;
- a worker that exits on its own is restarted with a capped back-off (CrashLoopBackOff);
- it patches the Deployment's status (replicas, readyReplicas, availableReplicas,
  updatedReplicas, unavailableReplicas, observedGeneration) so the operator reads what a
  cluster would show.

What to do is decided by pure functions (`pods_to_delete`, `deployment_status`,
`restart_delay`) so the policy is unit-tested without processes; `LocalKubelet` is the
I/O shell around them. `python -m emailqueue_testbed.kubelet --namespace NS --deployment
NAME -- <email-worker run args>` runs it from a shell until Ctrl-C.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import state

log = logging.getLogger("emailqueue_testbed.kubelet")

# `email_worker` has no __main__ module; this runs its console entry point with our interpreter.
WORKER_COMMAND: tuple[str, ...] = (sys.executable, "-c", "import sys; from email_worker.cli import main; "
                                   "sys.exit(main())", "run")

PENDING, STARTING, READY, TERMINATING = "pending", "starting", "ready", "terminating"


# --------------------------------------------------------------------------- pure policy
@dataclass(frozen=True)
class PodView:
    """What the reconcile policy knows about one pod."""

    name: str
    created_at: float          # monotonic seconds
    phase: str                 # pending | starting | ready | terminating


def pods_to_delete(pods: Sequence[PodView], desired: int) -> tuple[str, ...]:
    """Names of the pods to stop so that `desired` live (non-terminating) pods remain.

    Order as the ReplicaSet controller's: pods not yet ready first (a pending pod costs
    nothing to drop, a ready one is doing work), then the newest first.
    """
    live = [p for p in pods if p.phase != TERMINATING]
    surplus = len(live) - max(0, desired)
    if surplus <= 0:
        return ()
    rank = {PENDING: 0, STARTING: 1, READY: 2}
    # Pod names carry a serial: on equal creation times the higher serial is the newer pod.
    by_name = sorted(live, key=lambda p: p.name, reverse=True)
    ordered = sorted(by_name, key=lambda p: (rank[p.phase], -p.created_at))
    return tuple(p.name for p in ordered[:surplus])


def pods_to_create(pods: Sequence[PodView], desired: int) -> int:
    """How many new pods to create: desired minus live pods (terminating ones do not count)."""
    return max(0, max(0, desired) - sum(1 for p in pods if p.phase != TERMINATING))


def deployment_status(pods: Sequence[PodView], generation: int | None) -> dict[str, Any]:
    """The Deployment status a cluster would show for these pods (minReadySeconds 0, one revision).

    Terminating pods are not counted, as the Deployment controller does not count them.
    """
    live = [p for p in pods if p.phase != TERMINATING]
    ready = sum(1 for p in live if p.phase == READY)
    status: dict[str, Any] = {
        "replicas": len(live), "updatedReplicas": len(live), "readyReplicas": ready,
        "availableReplicas": ready, "unavailableReplicas": len(live) - ready,
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def restart_delay(restarts: int, base: float = 1.0, cap: float = 10.0) -> float:
    """CrashLoopBackOff: base·2^(restarts-1), capped (the kubelet's is 10 s → 5 min; ours is shorter)."""
    if restarts <= 0:
        return 0.0
    return min(cap, base * 2 ** (restarts - 1))


# --------------------------------------------------------------------------- timeline
@dataclass(frozen=True)
class KubeletEvent:
    """One line of the kubelet's timeline (for reports and debugging)."""

    at: float                  # wall clock (time.time())
    kind: str                  # desired | create | spawn | ready | stop | exit | crash | kill
    pod: str
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind, "pod": self.pod, "detail": self.detail}


# --------------------------------------------------------------------------- the Deployment edge
class DeploymentClient(Protocol):
    """The two calls the kubelet makes to the apiserver (a fake one in tests)."""

    def read(self) -> tuple[int, int | None]:
        """(spec.replicas, metadata.generation)."""
        ...

    def patch_status(self, status: Mapping[str, Any]) -> None: ...


class ApiDeployment:
    """A Deployment on a real apiserver via the kubernetes client."""

    def __init__(self, namespace: str, name: str, kubeconfig: str | None = None) -> None:
        from kubernetes import client, config

        self.namespace, self.name = namespace, name
        api_client = config.new_client_from_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"))
        self._apps = client.AppsV1Api(api_client)

    def read(self) -> tuple[int, int | None]:
        obj = self._apps.read_namespaced_deployment(self.name, self.namespace, _request_timeout=5)
        replicas = obj.spec.replicas if obj.spec.replicas is not None else 1
        return int(replicas), obj.metadata.generation

    def patch_status(self, status: Mapping[str, Any]) -> None:
        self._apps.patch_namespaced_deployment_status(self.name, self.namespace, {"status": dict(status)},
                                                      _request_timeout=5)


# --------------------------------------------------------------------------- the runtime
@dataclass(frozen=True)
class KubeletConfig:
    """How the local kubelet runs the worker pods."""

    worker_args: tuple[str, ...] = ()
    """Arguments appended to `email-worker run`."""
    worker_env: Mapping[str, str] = field(default_factory=dict)
    """Environment of every worker (over os.environ); METRICS_PORT and POD_NAME are set per pod."""
    startup_delay_seconds: float = 0.0
    """Pod created → process spawned: emulates scheduling, image pull and container start."""
    poll_seconds: float = 0.5
    """How often the Deployment is read and the pods reconciled."""
    termination_grace_seconds: float = 30.0
    """SIGTERM → SIGKILL, like terminationGracePeriodSeconds (keep it above the worker's GRACE_SECONDS)."""
    log_dir: Path = state.STATE_DIR / "logs" / "kubelet"
    """One log file per pod: <log_dir>/<pod>.log."""
    command: tuple[str, ...] = WORKER_COMMAND
    """The worker command before worker_args (a fake worker in tests)."""
    pod_prefix: str = "email-worker"
    probe: Callable[[int], bool] | None = None
    """Readiness probe given the pod's metrics port (None: GET 127.0.0.1:port/readyz on the host);
    a NetLab's `ready_probe` for workers run inside its namespace."""


@dataclass
class _Pod:
    name: str
    created_at: float
    spawn_at: float
    phase: str = PENDING
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int | None = None
    restarts: int = 0
    term_sent_at: float | None = None
    started_at: float | None = None

    def view(self) -> PodView:
        return PodView(self.name, self.created_at, self.phase)


class LocalKubelet:
    """Runs the pods of one Deployment as local processes; see the module docstring.

    `start()` runs the reconcile loop in a thread; `stop()` terminates every worker
    (SIGTERM, then SIGKILL after the grace period) and ends the loop. Thread-safe reads:
    `ready()`, `desired()`, `pods()`, `events`.
    """

    def __init__(self, deployment: DeploymentClient, config: KubeletConfig = KubeletConfig(),
                 on_event: Callable[[KubeletEvent], None] | None = None) -> None:
        self.deployment = deployment
        self.config = config
        self.on_event = on_event
        """Called with every timeline event (from the kubelet's thread)."""
        self._pods: dict[str, _Pod] = {}
        self._lock = threading.Lock()
        self._events: list[KubeletEvent] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._desired = 0
        self._generation: int | None = None
        self._serial = 0
        self._last_status: dict[str, Any] | None = None
        self.errors = 0

    # -- public ---------------------------------------------------------------------------------
    def start(self) -> LocalKubelet:
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="local-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop, SIGTERM every worker and wait for them (SIGKILL after the grace period)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        grace = self.config.termination_grace_seconds if timeout is None else timeout
        with self._lock:
            pods = list(self._pods.values())
        for pod in pods:
            if pod.phase != TERMINATING:
                self._terminate(pod, time.monotonic(), "kubelet stopping")
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.proc is not None and p.proc.poll() is None for p in pods):
            time.sleep(0.1)
        for pod in pods:
            if pod.proc is not None and pod.proc.poll() is None:
                self._record("kill", pod.name, "still running after the grace period")
                _signal_group(pod.proc, signal.SIGKILL)
                pod.proc.wait()
        for pod in pods:
            if pod.proc is not None:
                self._record("exit", pod.name, f"exit code {pod.proc.returncode}")
        with self._lock:
            for pod in pods:
                self._pods.pop(pod.name, None)
        try:
            self.deployment.patch_status(deployment_status([], self._generation))
        except Exception:  # the namespace may be gone already; nothing left to report
            pass

    def __enter__(self) -> LocalKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ready(self) -> int:
        with self._lock:
            return sum(1 for p in self._pods.values() if p.phase == READY)

    def desired(self) -> int:
        return self._desired

    def pods(self) -> list[PodView]:
        with self._lock:
            return [p.view() for p in self._pods.values()]

    def metrics_ports(self) -> dict[str, int]:
        """Pod name → metrics port of every pod whose process runs."""
        with self._lock:
            return {p.name: p.metrics_port for p in self._pods.values()
                    if p.metrics_port is not None and p.phase in (STARTING, READY)}

    @property
    def events(self) -> list[KubeletEvent]:
        with self._lock:
            return list(self._events)

    def wait_ready(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.ready() != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.ready()} of {count} worker pods ready after {timeout:.0f}s")
            time.sleep(0.2)

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile_once()
            except Exception as exc:  # an apiserver hiccup must not kill the kubelet
                self.errors += 1
                log.warning("reconcile failed: %s", exc)
            self._stop.wait(self.config.poll_seconds)

    def reconcile_once(self) -> None:
        """Read the Deployment, converge the pods one step, report status."""
        desired, generation = self.deployment.read()
        now = time.monotonic()
        if desired != self._desired:
            self._record("desired", "", f"{self._desired} → {desired}")
        self._desired, self._generation = desired, generation
        with self._lock:
            views = [p.view() for p in self._pods.values()]
        for name in pods_to_delete(views, desired):
            self._terminate(self._pods[name], now, f"scale down to {desired}")
        for _ in range(pods_to_create(views, desired)):
            self._create(now)
        for pod in list(self._pods.values()):
            self._advance(pod, now)
        self._report()

    def _create(self, now: float) -> None:
        self._serial += 1
        name = f"{self.config.pod_prefix}-{self._serial:03d}"
        pod = _Pod(name=name, created_at=now, spawn_at=now + self.config.startup_delay_seconds)
        with self._lock:
            self._pods[name] = pod
        self._record("create", name, f"starts in {self.config.startup_delay_seconds:g}s")

    def _advance(self, pod: _Pod, now: float) -> None:
        if pod.phase == PENDING and now >= pod.spawn_at:
            self._spawn(pod, now)
        elif pod.phase in (STARTING, READY) and pod.proc is not None and pod.proc.poll() is not None:
            code = pod.proc.returncode
            pod.restarts += 1
            delay = restart_delay(pod.restarts)
            self._record("crash", pod.name, f"exit code {code}; restart #{pod.restarts} in {delay:g}s")
            with self._lock:
                pod.phase, pod.proc, pod.metrics_port = PENDING, None, None
                pod.spawn_at = now + delay
        elif pod.phase == STARTING and self._ready(pod.metrics_port):
            with self._lock:
                pod.phase = READY
            took = now - pod.created_at
            self._record("ready", pod.name, f"{took:.1f}s after creation, metrics port {pod.metrics_port}")
        elif pod.phase == TERMINATING:
            self._reap(pod, now)

    def _spawn(self, pod: _Pod, now: float) -> None:
        port = state.free_port()
        env = dict(os.environ)
        env.update(self.config.worker_env)
        env.update({"METRICS_PORT": str(port), "METRICS_HOST": "127.0.0.1", "POD_NAME": pod.name})
        argv = [*self.config.command, *self.config.worker_args]
        with open(self.config.log_dir / f"{pod.name}.log", "ab") as out:
            # Own session: a Ctrl-C in the terminal reaches the demo, which stops pods in order.
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        with self._lock:
            pod.proc, pod.metrics_port, pod.phase, pod.started_at = proc, port, STARTING, now
        self._record("spawn", pod.name, f"pid {proc.pid}")

    def _terminate(self, pod: _Pod, now: float, why: str) -> None:
        with self._lock:
            was = pod.phase
            pod.phase, pod.term_sent_at = TERMINATING, now
        if pod.proc is not None and pod.proc.poll() is None:
            _signal_group(pod.proc, signal.SIGTERM)
        self._record("stop", pod.name, f"{why} (was {was})")

    def _reap(self, pod: _Pod, now: float) -> None:
        if pod.proc is None or pod.proc.poll() is not None:
            code = None if pod.proc is None else pod.proc.returncode
            with self._lock:
                self._pods.pop(pod.name, None)
            self._record("exit", pod.name, "never started" if code is None else f"exit code {code}")
        elif pod.term_sent_at is not None and now - pod.term_sent_at > self.config.termination_grace_seconds:
            _signal_group(pod.proc, signal.SIGKILL)
            self._record("kill", pod.name, "grace period over")

    def _ready(self, port: int | None) -> bool:
        if self.config.probe is None:
            return _ready(port)
        return port is not None and self.config.probe(port)

    def _report(self) -> None:
        with self._lock:
            status = deployment_status([p.view() for p in self._pods.values()], self._generation)
        if status != self._last_status:
            self.deployment.patch_status(status)
            self._last_status = status

    def _record(self, kind: str, pod: str, detail: str) -> None:
        event = KubeletEvent(time.time(), kind, pod, detail)
        with self._lock:
            self._events.append(event)
        log.info("%s %s %s", kind, pod, detail)
        if self.on_event is not None:
            self.on_event(event)


def _ready(port: int | None) -> bool:
    if port is None:
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    worker_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, worker_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m emailqueue_testbed.kubelet",
        description="Run a Deployment's pods as local `email-worker run` processes (the test bed has no kubelet). "
                    "Arguments after `--` go to `email-worker run`.")
    parser.add_argument("-n", "--namespace", required=True)
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument("--startup-delay", type=float, default=0.0,
                        help="seconds from pod creation to process start (image pull emulation)")
    parser.add_argument("--poll-seconds", type=float, default=0.5)
    parser.add_argument("--grace-seconds", type=float, default=30.0, help="SIGTERM → SIGKILL")
    parser.add_argument("--log-dir", type=Path, default=state.STATE_DIR / "logs" / "kubelet")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kubelet %(message)s")
    if not args.kubeconfig:
        parser.error("no kubeconfig: pass --kubeconfig or source .testbed/env")
    config = KubeletConfig(worker_args=tuple(worker_args), startup_delay_seconds=args.startup_delay,
                           poll_seconds=args.poll_seconds, termination_grace_seconds=args.grace_seconds,
                           log_dir=args.log_dir / args.namespace, pod_prefix=args.deployment)
    kubelet = LocalKubelet(ApiDeployment(args.namespace, args.deployment, args.kubeconfig), config)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    kubelet.start()
    stopping.wait()
    kubelet.stop()
    return 0


__all__ = ["KubeletConfig", "KubeletEvent", "LocalKubelet", "ApiDeployment", "DeploymentClient", "PodView",
           "pods_to_delete", "pods_to_create", "deployment_status", "restart_delay", "main"]

if __name__ == "__main__":
    sys.exit(main())
