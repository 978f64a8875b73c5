"""The closed loop on real pods (issue 13): a surge against the chart installed in a real cluster.

Works on any cluster reached by a kubeconfig where `testbed/e2e-install.sh` has installed the
evaluation RabbitMQ, the SMTP sink and the chart with the worker enabled: the test bed's own
single-node cluster (`make e2e-cluster`) or kind on a Docker host (`make e2e-kind`).

The operator runs in-cluster as its ServiceAccount and reads RabbitMQ through its Service;
the Deployment controller creates the worker pods, the scheduler places them, containerd
starts them from our image, the chart's readiness probe admits them and scale-in SIGTERMs
them. From outside we only publish (through `kubectl port-forward` to the broker's Service),
read the SMTP sink's receipts and watch the objects: what a user sees.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kubernetes.client.rest import ApiException

from . import state
from .demo_plan import PROCESS_START_SECONDS, QUEUE, SurgePlan
from .demo_report import percentile, simulate
from .demo_surge import _deliveries, _SurgePublisher
from .smtp import SmtpControl

GROUP, VERSION, PLURAL = "emailqueue.dev", "v1alpha1", "emailqueues"
EMAILQUEUE = "emails-e2e"
WORKER = "email-worker"  # worker.fullnameOverride in e2e-install.sh, like deploy/worker
SECRET = "rabbitmq"      # deploy/rabbitmq/secret.yaml
SINK_CONTROL_PORT = 8025


@dataclass(frozen=True)
class Target:
    kubeconfig: str
    kubectl: str
    namespace: str = "email"


@contextlib.contextmanager
def port_forward(target: Target, resource: str, port: int, timeout: float = 30.0) -> Iterator[int]:
    """`kubectl port-forward RESOURCE :PORT`: the local port, for the block's duration."""
    proc = subprocess.Popen([target.kubectl, "--kubeconfig", target.kubeconfig, "-n", target.namespace,
                             "port-forward", "--address", "127.0.0.1", resource, f":{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        found: list[int] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                match = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
                if match and not found:
                    found.append(int(match.group(1)))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while not found:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kubectl port-forward {resource} :{port} did not start (exit {proc.poll()})")
            time.sleep(0.1)
        yield found[0]
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()


def _ts(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


@dataclass
class PodLife:
    """One worker pod as seen from the API: when it was created, started, became Ready, was
    asked to stop and was gone; how its container ended (when we saw it)."""

    name: str
    created: float
    started: float | None = None
    ready: float | None = None
    deleting: float | None = None
    gone: float | None = None
    restarts: int = 0
    exit_code: int | None = None
    grace_seconds: int | None = None


@dataclass
class RealSurge:
    plan: SurgePlan
    started_at: float
    published: dict[str, float]
    receipts: list[tuple[str, float]]
    samples: list[dict[str, Any]]
    pods: dict[str, PodLife]
    publish_errors: int
    settled: bool
    events: list[dict[str, Any]] = field(default_factory=list)


class Watcher:
    """Worker Deployment and pods, sampled through the kubernetes client."""

    def __init__(self, target: Target) -> None:
        from kubernetes import client, config

        api_client = config.new_client_from_config(config_file=target.kubeconfig)
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.ns = target.namespace
        self.pods: dict[str, PodLife] = {}

    def deployment(self) -> tuple[int, int]:
        dep = self.apps.read_namespaced_deployment(WORKER, self.ns)
        return dep.spec.replicas or 0, dep.status.ready_replicas or 0

    def sample_pods(self, now: float) -> int:
        listed = self.core.list_namespaced_pod(self.ns, label_selector=f"app.kubernetes.io/name={WORKER}").items
        seen = set()
        for pod in listed:
            name = pod.metadata.name
            seen.add(name)
            life = self.pods.setdefault(name, PodLife(name, _ts(pod.metadata.creation_timestamp) or now))
            life.grace_seconds = pod.spec.termination_grace_period_seconds
            if pod.metadata.deletion_timestamp is not None and life.deleting is None:
                # deletionTimestamp is "now + grace"; when the kubelet was asked is that minus grace.
                life.deleting = (_ts(pod.metadata.deletion_timestamp) or now) - (
                    pod.metadata.deletion_grace_period_seconds or 0)
            for cond in pod.status.conditions or []:
                if cond.type == "Ready" and cond.status == "True" and life.ready is None:
                    life.ready = _ts(cond.last_transition_time)
            for cs in pod.status.container_statuses or []:
                life.restarts = max(life.restarts, cs.restart_count or 0)
                if cs.state and cs.state.running and cs.state.running.started_at and life.started is None:
                    life.started = _ts(cs.state.running.started_at)
                if cs.state and cs.state.terminated is not None:
                    life.exit_code = cs.state.terminated.exit_code
        for name, life in self.pods.items():
            if name not in seen and life.gone is None:
                life.gone = now
        return sum(1 for p in listed if p.metadata.deletion_timestamp is None)

    def emailqueue(self) -> Mapping[str, Any]:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, EMAILQUEUE)
        except ApiException:  # a sample is skipped, not the run
            return {}

    def events(self, since: float) -> list[dict[str, Any]]:
        out = []
        for ev in self.core.list_namespaced_event(self.ns).items:
            when = _ts(ev.last_timestamp or ev.event_time or ev.metadata.creation_timestamp) or 0
            if when >= since - 1 and ev.involved_object.kind == "EmailQueue":
                out.append({"t": when, "reason": ev.reason, "message": ev.message})
        return sorted(out, key=lambda e: e["t"])


def emailqueue_body(plan: SurgePlan) -> dict[str, Any]:
    spec = plan.emailqueue_spec(prometheus=True)
    spec["scaleTargetRef"] = {"apiVersion": "apps/v1", "kind": "Deployment", "name": WORKER}
    spec["broker"] = {"queue": QUEUE, "amqpSecretRef": {"name": SECRET, "uriKey": "uri"},
                      "prometheusSecretRef": {"name": SECRET, "urlKey": "prometheus-url"}}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "EmailQueue", "metadata": {"name": EMAILQUEUE},
            "spec": spec}


def credentials(target: Target) -> tuple[str, str]:
    """The evaluation RabbitMQ's user and password, from its Secret (deploy/rabbitmq/secret.yaml)."""
    import base64

    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(config_file=target.kubeconfig))
    data = api.read_namespaced_secret(SECRET, target.namespace).data
    return base64.b64decode(data["username"]).decode(), base64.b64decode(data["password"]).decode()


def run(target: Target, plan: SurgePlan, amqp_credentials: tuple[str, str], say: Callable[[str], None] = print,
        settle_timeout: float = 240.0) -> RealSurge:
    """Create the EmailQueue, publish the plan's surge, sample once a second until the backlog
    is delivered and the fleet is back at min (or settle_timeout after the last publish)."""
    watcher = Watcher(target)
    body = emailqueue_body(plan)
    with contextlib.suppress(Exception):
        watcher.custom.delete_namespaced_custom_object(GROUP, VERSION, target.namespace, PLURAL, EMAILQUEUE)
    watcher.custom.create_namespaced_custom_object(GROUP, VERSION, target.namespace, PLURAL, body)
    say(f"EmailQueue {EMAILQUEUE}: min {plan.min_replicas} max {plan.max_replicas}, drainSeconds "
        f"{plan.drain_seconds:g}, {plan.rate_per_replica:g}/s per worker")
    state.wait_until(lambda: watcher.deployment() == (plan.min_replicas, plan.min_replicas), 180,
                     f"deployment {WORKER} at {plan.min_replicas} ready replica(s)", interval=1.0)
    run_id = f"e2e-{uuid.uuid4().hex[:8]}"
    user, password = amqp_credentials
    with port_forward(target, "svc/rabbitmq", 5672) as amqp_port, \
            port_forward(target, "svc/smtp-sink", SINK_CONTROL_PORT) as control_port:
        smtp = SmtpControl("127.0.0.1", 0, control_port)
        smtp.clear()
        stop = threading.Event()
        publisher = _SurgePublisher(plan, f"amqp://{user}:{password}@127.0.0.1:{amqp_port}/%2F", run_id, stop)
        publisher.start()
        if not publisher.started.wait(60):
            raise RuntimeError("the publisher did not connect through the port-forward")
        origin = time.monotonic()
        samples: list[dict[str, Any]] = []
        deadline: float | None = None
        settled = False
        try:
            while True:
                t = time.monotonic() - origin
                now = time.time()
                desired, ready = watcher.deployment()
                pods = watcher.sample_pods(now)
                try:
                    received = smtp.count()
                except OSError:
                    received = samples[-1]["received"] if samples else 0
                status = watcher.emailqueue().get("status") or {}
                sample = {"t": round(t, 2), "published": len(publisher.published), "received": received,
                          "desired": desired, "ready": ready, "pods": pods,
                          "reason": str((status.get("lastDecision") or {}).get("reason", ""))}
                samples.append(sample)
                if int(t) % 10 == 0 and (len(samples) < 2 or int(samples[-2]["t"]) // 10 != int(t) // 10):
                    say(f"t={t:5.0f}s published {sample['published']} received {received} "
                        f"desired {desired} ready {ready} pods {pods}")
                if publisher.finished.is_set():
                    deadline = deadline or time.monotonic() + settle_timeout
                    settled = (received >= len(publisher.published) and desired == plan.min_replicas
                               and ready == plan.min_replicas and pods == plan.min_replicas
                               and all(p.gone is not None for p in watcher.pods.values() if p.deleting))
                    if settled or time.monotonic() > deadline:
                        break
                time.sleep(max(0.0, 1.0 - (time.monotonic() - origin - t)))
        finally:
            stop.set()
            publisher.join(10)
        receipts = [(job_id, at) for job_id, at in _deliveries(smtp) if job_id.startswith(run_id)]
    # One last look at the pods, for those that went between the last samples.
    watcher.sample_pods(time.time())
    return RealSurge(plan=plan, started_at=publisher.started_at, published=dict(publisher.published),
                     receipts=receipts, samples=samples, pods=watcher.pods, publish_errors=publisher.errors,
                     settled=settled, events=watcher.events(publisher.started_at))


def summarize(run_: RealSurge) -> dict[str, Any]:
    """The figures the issue asks for: pod start-up, scale-up-to-ready latency, lost, duplicates."""
    first_receipt: dict[str, float] = {}
    counts: dict[str, int] = {}
    for job_id, at in run_.receipts:
        counts[job_id] = counts.get(job_id, 0) + 1
        first_receipt[job_id] = min(at, first_receipt.get(job_id, at))
    lost = sorted(j for j in run_.published if j not in counts)
    waits = [first_receipt[j] - at for j, at in run_.published.items() if j in first_receipt]
    new_pods = [p for p in run_.pods.values() if p.created >= run_.started_at - 1]
    startup = [p.ready - p.created for p in new_pods if p.ready is not None]
    to_running = [p.started - p.created for p in new_pods if p.started is not None]
    stopped = [p for p in run_.pods.values() if p.deleting is not None and p.gone is not None]
    stop_seconds = [p.gone - p.deleting for p in stopped if p.deleting is not None and p.gone is not None]
    # Scale-up to ready: from the first sample asking for more than min to the first sample
    # where as many replicas as the peak asked for are Ready.
    peak = max((s["desired"] for s in run_.samples), default=0)
    t_up = next((s["t"] for s in run_.samples if s["desired"] > run_.plan.min_replicas), None)
    t_peak_asked = next((s["t"] for s in run_.samples if s["desired"] >= peak), None)
    t_peak_ready = next((s["t"] for s in run_.samples if s["ready"] >= peak and peak > run_.plan.min_replicas), None)
    simulated = None
    if startup:
        # The simulator on the same plan, with the start-up these pods really took (median).
        measured = percentile(startup, 50) or 0.0
        replanned = replace(run_.plan, pod_start_delay_seconds=max(0.0, measured - PROCESS_START_SECONDS))
        simulated, _series = simulate(replanned)
        simulated["startup_seconds"] = round(replanned.startup_seconds, 2)
    peak_backlog = max((s["published"] - s["received"] for s in run_.samples), default=None)
    return {
        "scenario": {"name": run_.plan.name, "steps": [list(s) for s in run_.plan.steps],
                     "rate_per_replica": run_.plan.rate_per_replica, "min": run_.plan.min_replicas,
                     "max": run_.plan.max_replicas, "drain_seconds": run_.plan.drain_seconds,
                     "spec_startup_seconds": run_.plan.startup_seconds},
        "simulated": simulated, "peak_backlog": peak_backlog,
        "published": len(run_.published), "delivered": len(counts), "lost": len(lost), "lost_ids": lost[:20],
        "duplicates": sum(c - 1 for c in counts.values()), "publish_errors": run_.publish_errors,
        "time_in_queue_seconds": {"p50": percentile(waits, 50), "p99": percentile(waits, 99),
                                  "max": max(waits, default=None)},
        "peak_replicas_desired": peak, "peak_replicas_ready": max((s["ready"] for s in run_.samples), default=0),
        "final": run_.samples[-1] if run_.samples else None, "settled": run_.settled,
        "pods_started": len(new_pods),
        "pod_startup_seconds": {"to_running_p50": percentile(to_running, 50),
                                "to_running_max": max(to_running, default=None),
                                "to_ready_p50": percentile(startup, 50), "to_ready_max": max(startup, default=None)},
        "scale_up": {"first_asked_t": t_up, "peak_asked_t": t_peak_asked, "peak_ready_t": t_peak_ready,
                     "peak_asked_to_ready_seconds": (round(t_peak_ready - t_peak_asked, 1)
                                                     if t_peak_ready is not None and t_peak_asked is not None
                                                     else None)},
        "scale_in": {"pods_stopped": len(stopped), "stop_seconds_max": max(stop_seconds, default=None),
                     "stop_seconds_p50": percentile(stop_seconds, 50),
                     "grace_seconds": max((p.grace_seconds or 0 for p in stopped), default=None),
                     "exit_codes_seen": sorted({p.exit_code for p in stopped if p.exit_code is not None})},
        "restarts": sum(p.restarts for p in run_.pods.values()),
        "events": [{"t": round(e["t"] - run_.started_at, 1), "reason": e["reason"]} for e in run_.events],
    }


def write_report(report: Mapping[str, Any], path: Path) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    """`make demo CLUSTER=real`: the demo's surge on real pods (after testbed/e2e-install.sh)."""
    import argparse
    import json
    import os

    from .demo_plan import preset

    parser = argparse.ArgumentParser(prog="python -m emailqueue_testbed.cluster_surge")
    parser.add_argument("--preset", default="e2e", choices=["e2e", "quick"],
                        help="e2e: ~2 min, ~7 workers at the peak; quick: ~3 min, ~14")
    parser.add_argument("--out", default="out/demo-real", help="report.json goes here")
    args = parser.parse_args(argv)
    target = Target(kubeconfig=os.environ["KUBECONFIG"], kubectl=os.environ.get("KUBECTL", "kubectl"),
                    namespace=os.environ.get("NAMESPACE", "email"))
    plan = preset(args.preset)
    for line in plan.describe():
        print(line)
    report = summarize(run(target, plan, credentials(target)))
    path = Path(args.out) / "report.json"
    write_report(report, path)
    sim = report.get("simulated") or {}
    sim_p99 = (sim.get("time_in_queue_seconds") or {}).get("p99")
    startup, scale_in = report["pod_startup_seconds"], report["scale_in"]
    print(f"published {report['published']}, delivered {report['delivered']}, lost {report['lost']}, "
          f"duplicates {report['duplicates']}; peak replicas {report['peak_replicas_desired']} "
          f"(simulated {sim.get('peak_replicas')}); p99 time in queue "
          f"{report['time_in_queue_seconds']['p99']} s (simulated {sim_p99})")
    print(f"pods started {report['pods_started']}: creation → Ready p50 {startup['to_ready_p50']} s, max "
          f"{startup['to_ready_max']} s; scale-in: {scale_in['pods_stopped']} pods stopped on SIGTERM in ≤ "
          f"{scale_in['stop_seconds_max']} s; report: {path}")
    print(json.dumps({"settled": report["settled"], "restarts": report["restarts"]}))
    return 0 if report["lost"] == 0 and report["settled"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
