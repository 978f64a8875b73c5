"""The demo's stack (I/O): everything one surge needs on the test bed, created in order and
removed in reverse.

- `Endpoints`: where the test bed answers;
- `DemoStack`: namespace, vhost, recording SMTP sink, CRD, worker Deployment, Secret,
  EmailQueue, operator process and local kubelet (and, optionally, a Prometheus with the
  shipped alert rules), plus the reads the surge samples every second.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import bed, state
from .demo_plan import DEPLOYMENT, EMAILQUEUE, QUEUE, SECRET, SurgePlan
from .demo_report import ScaleEvent
from .kubelet import ApiDeployment, KubeletConfig, KubeletEvent, LocalKubelet
from .prometheus import OPERATOR_JOB, PrometheusServer
from .rabbit import Management
from .smtp import SmtpControl

REPO = state.REPO
CRD_DIR = REPO / "deploy" / "crds"


@dataclass(frozen=True)
class Endpoints:
    """Where the test bed answers (from `bed.current()` or the test fixtures)."""

    kubeconfig: str
    amqp_url: str
    mgmt_url: str
    user: str
    password: str
    prom_url: str | None = None
    """RabbitMQ's Prometheus plugin: when set, the operator reads the queue there."""
    broker_metrics_url: str | None = None
    """RabbitMQ's Prometheus plugin for the test bed's Prometheus to scrape (job rabbitmq)."""

    @staticmethod
    def from_env(env: bed.Env) -> Endpoints:
        missing = [n for n, v in (("kube", env.kubeconfig), ("rabbitmq", env.amqp_url)) if not v]
        if missing:
            raise state.TestbedError(f"test bed components not running: {', '.join(missing)}")
        # The operator reads the queue from RabbitMQ's Prometheus plugin (counters: rates that do
        # not blink with the management API's statistics tick), the setup RabbitMQ recommends.
        return Endpoints(env.kubeconfig or "", env.amqp_url or "", env.rabbitmq_mgmt_url or "",
                         env.rabbitmq_user or "", env.rabbitmq_password or "",
                         prom_url=env.rabbitmq_prometheus_url, broker_metrics_url=env.rabbitmq_prometheus_url)


class DemoStack:
    """Everything one surge needs, created in order and removed in reverse (see `close`).

    A namespace and a vhost of its own, a private recording SMTP server (the shared one is
    cleared by tests running beside us), the CRD, the worker Deployment at min replicas,
    the AMQP/management Secret, the EmailQueue, the operator process and the kubelet; with
    `prometheus=True`, a Prometheus server scraping the operator, every worker and RabbitMQ,
    the shipped alert rules loaded (`for:` and windows compressed like the timeline).
    """

    def __init__(self, plan: SurgePlan, endpoints: Endpoints, out_dir: Path,
                 on_kubelet_event: Callable[[KubeletEvent], None] | None = None,
                 say: Callable[[str], None] = print, prometheus: bool = False) -> None:
        self.plan, self.endpoints, self.out_dir = plan, endpoints, out_dir
        self.run_id = uuid.uuid4().hex[:6]
        self.namespace = f"demo-{self.run_id}"
        self.vhost = self.namespace
        self.amqp_url = bed.vhost_url(endpoints.amqp_url, self.vhost)
        self.say = say
        self._on_kubelet_event = on_kubelet_event
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self.smtp: SmtpControl | None = None
        self.kubelet: LocalKubelet | None = None
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_metrics_port: int | None = None
        self.with_prometheus = prometheus
        self.prometheus: PrometheusServer | None = None
        self.rendered_annotations: dict[str, dict[str, str]] = {}
        """alertname -> annotations as Prometheus rendered them the first time the alert was seen."""
        self.mgmt = Management(endpoints.mgmt_url, endpoints.user, endpoints.password)
        from kubernetes import client, config

        api_client = config.new_client_from_config(config_file=endpoints.kubeconfig)
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> DemoStack:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._start_smtp()
        self._apply_crd()
        self._create_broker_objects()
        self._create_kube_objects()
        self._start_kubelet()
        self._start_operator()
        if self.with_prometheus:
            self._start_prometheus()

    def close(self) -> None:
        """Undo everything, newest first; one failing step does not stop the others."""
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:
                self.say(f"cleanup: {what} failed: {type(exc).__name__}: {exc}")

    def _later(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    # -- steps --------------------------------------------------------------------------------------
    def _start_smtp(self) -> None:
        port, control_port = state.free_port(), state.free_port()
        log = self.out_dir / "smtp.log"
        pid = state.spawn([sys.executable, "-m", "emailqueue_testbed.smtp", "--port", str(port),
                           "--control-port", str(control_port), "--no-bodies"], log)
        self._later("stop the SMTP sink", lambda: state.kill_group(pid, timeout=5))
        smtp = SmtpControl("127.0.0.1", port, control_port)

        def up() -> bool:
            try:
                smtp.count()
                return state.port_open(port)
            except OSError:
                return False

        state.wait_until(up, 30, "the demo's recording SMTP server", log=log)
        self.smtp = smtp

    def _apply_crd(self) -> None:
        kubectl = str(state.binary("kubectl"))
        env = {**os.environ, "KUBECONFIG": self.endpoints.kubeconfig}
        for argv in (["apply", "-f", str(CRD_DIR)],
                     ["wait", "--for=condition=Established", "crd/emailqueues.emailqueue.dev", "--timeout=60s"]):
            result = subprocess.run([kubectl, *argv], capture_output=True, text=True, env=env, timeout=90)
            if result.returncode:
                raise state.TestbedError(f"kubectl {' '.join(argv)}: {result.stderr.strip()}")

    def _create_broker_objects(self) -> None:
        import pika

        from email_worker.topology import Topology, declare

        self.mgmt.create_vhost(self.vhost, self.endpoints.user)
        self._later(f"delete vhost {self.vhost}", lambda: self.mgmt.delete_vhost(self.vhost))
        # Declared up front (same arguments as `email-worker run` defaults) so the first
        # publish and the operator's first probe find the queue.
        with contextlib.closing(pika.BlockingConnection(pika.URLParameters(self.amqp_url))) as conn:
            declare(conn.channel(), Topology(prefix=QUEUE))

    def _create_kube_objects(self) -> None:
        ns = self.namespace
        labels = {"app.kubernetes.io/part-of": "emailqueue-demo"}
        self.core.create_namespace({"metadata": {"name": ns, "labels": labels}})
        self._later(f"delete namespace {ns}", self._delete_namespace)
        self.core.create_namespaced_secret(ns, {"metadata": {"name": SECRET}, "stringData": {
            "uri": self.amqp_url, "url": self.endpoints.mgmt_url, "prometheus-url": self.endpoints.prom_url or ""}})
        self.apps.create_namespaced_deployment(ns, {
            "metadata": {"name": DEPLOYMENT},
            "spec": {"replicas": self.plan.min_replicas, "selector": {"matchLabels": {"app": DEPLOYMENT}},
                     "template": {"metadata": {"labels": {"app": DEPLOYMENT}},
                                  "spec": {"containers": [{"name": "worker",
                                                           "image": "emailqueue/email-worker:demo"}]}}}})
        self.custom.create_namespaced_custom_object("emailqueue.dev", "v1alpha1", ns, "emailqueues", {
            "apiVersion": "emailqueue.dev/v1alpha1", "kind": "EmailQueue", "metadata": {"name": EMAILQUEUE},
            "spec": self.plan.emailqueue_spec(prometheus=bool(self.endpoints.prom_url))})

    def _delete_namespace(self) -> None:
        from kubernetes.client.exceptions import ApiException

        ns = self.namespace
        # No controller-manager on the test bed: a namespace is never emptied for us, so the
        # objects go first. The EmailQueue's finalizer is gone once the operator has stopped
        # (kopf removes it on cleanup), else it is removed here.
        with contextlib.suppress(ApiException):
            self.custom.patch_namespaced_custom_object("emailqueue.dev", "v1alpha1", ns, "emailqueues", EMAILQUEUE,
                                                       {"metadata": {"finalizers": None}})
        for delete in (lambda: self.custom.delete_namespaced_custom_object("emailqueue.dev", "v1alpha1", ns,
                                                                           "emailqueues", EMAILQUEUE),
                       lambda: self.apps.delete_namespaced_deployment(DEPLOYMENT, ns),
                       lambda: self.core.delete_namespaced_secret(SECRET, ns),
                       lambda: self.core.delete_collection_namespaced_event(ns),
                       lambda: self.core.delete_namespace(ns),
                       # ...and it stays Terminating until someone finalizes it, as the
                       # namespace controller does once the namespace is empty.
                       lambda: self.core.replace_namespace_finalize(
                           ns, {"metadata": {"name": ns}, "spec": {"finalizers": []}})):
            with contextlib.suppress(ApiException):
                delete()

    def worker_env(self) -> dict[str, str]:
        """The environment every worker process gets (what a Deployment's pod spec would set)."""
        smtp = self.smtp
        assert smtp is not None
        return {"AMQP_URL": self.amqp_url, "SMTP_HOST": smtp.host, "SMTP_PORT": str(smtp.port),
                "QUEUE": QUEUE, "RATE_LIMIT": f"{self.plan.rate_per_replica:g}", "RATE_BURST": "1",
                "CONCURRENCY": "2", "GRACE_SECONDS": "10", "LOG_LEVEL": "warning",
                "MESSAGE_ID_DOMAIN": "demo.emailqueue.dev"}

    def _start_kubelet(self) -> None:
        config = KubeletConfig(
            worker_env=self.worker_env(),
            startup_delay_seconds=self.plan.pod_start_delay_seconds, poll_seconds=0.5,
            termination_grace_seconds=15, log_dir=self.out_dir / "pods", pod_prefix=DEPLOYMENT)
        self.kubelet = LocalKubelet(ApiDeployment(self.namespace, DEPLOYMENT, self.endpoints.kubeconfig), config,
                                    on_event=self._on_kubelet_event)
        self.kubelet.start()
        self._later("stop the kubelet and its workers", self.kubelet.stop)
        self.kubelet.wait_ready(self.plan.min_replicas, 60)

    def _start_operator(self) -> None:
        self.operator_metrics_port = state.free_port()
        log = open(self.out_dir / "operator.log", "ab")  # noqa: SIM115 - open while it runs; _stop_operator closes it
        env = {**os.environ, "KUBECONFIG": self.endpoints.kubeconfig}
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "emailqueue_operator", "run", "--namespace", self.namespace,
             "--metrics-port", str(self.operator_metrics_port), "--health-port", "0"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
            start_new_session=True)  # our Ctrl-C handler stops it, in order
        self._later("stop the operator", lambda: self._stop_operator(log))
        deadline = time.monotonic() + 60
        while not self._first_poll_done():
            if self.operator.poll() is not None:
                raise state.TestbedError(f"the operator exited ({self.operator.returncode}); see {log.name}")
            if time.monotonic() > deadline:
                raise state.TestbedError("the operator did not poll the EmailQueue within 60 s; see operator.log")
            time.sleep(0.5)

    def _start_prometheus(self) -> None:
        """After the operator's first poll: a Prometheus that started first would see the operator
        down during its start-up and (with `for:` compressed) fire EmailQueueOperatorDown."""
        broker = urllib.parse.urlsplit(self.endpoints.broker_metrics_url).netloc \
            if self.endpoints.broker_metrics_url else None
        time_factor = self.plan.compression.get("time", 1.0)
        prom = PrometheusServer(self.out_dir / "prometheus", operator_target=f"127.0.0.1:{self.operator_metrics_port}",
                                operator_namespace=self.namespace, worker_job=DEPLOYMENT, rabbitmq_target=broker,
                                time_factor=time_factor)
        prom.start()
        self._later("stop Prometheus", prom.stop)
        self.prometheus = prom
        self.sync_scrape_targets()

        def operator_scraped() -> bool:
            try:
                return bool(prom.query(f'up{{job="{OPERATOR_JOB}"}} == 1'))
            except Exception:
                return False

        # Until the first scrape, absent(up) is true: the surge starts once Prometheus sees the operator.
        state.wait_until(operator_scraped, 30, "Prometheus' first scrape of the operator", interval=0.5,
                         log=prom.workdir / "prometheus.log")

    def sync_scrape_targets(self) -> None:
        """Point Prometheus at the workers that run now (what the worker Service's Endpoints list)."""
        if self.prometheus is not None and self.kubelet is not None:
            self.prometheus.set_worker_targets(self.kubelet.metrics_ports(), self.namespace)

    def _stop_operator(self, log: Any) -> None:
        proc = self.operator
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()

    def _first_poll_done(self) -> bool:
        status = self.emailqueue_status()
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])

    # -- reads ----------------------------------------------------------------------------------------
    def firing_alerts(self) -> dict[str, str]:
        """alertname -> pending|firing, as the test bed's Prometheus evaluates the shipped rules now."""
        if self.prometheus is None:
            return {}
        try:
            alerts = self.prometheus.alerts()
        except Exception:  # Prometheus busy: nothing new to report this second
            return {}
        states: dict[str, str] = {}
        for alert in alerts:
            name = (alert.get("labels") or {}).get("alertname", "")
            self.rendered_annotations.setdefault(name, dict(alert.get("annotations") or {}))
            if states.get(name) != "firing":
                states[name] = str(alert.get("state", ""))
        return states

    def dashboard_variables(self) -> dict[str, str]:
        """The shipped dashboard's template variables as a user would pick them for this run."""
        return {"namespace": self.namespace, "emailqueue": EMAILQUEUE, "job": DEPLOYMENT, "instance": ".*",
                "datasource": "prometheus"}

    def emailqueue_status(self) -> dict[str, Any]:
        try:
            obj = self.custom.get_namespaced_custom_object("emailqueue.dev", "v1alpha1", self.namespace,
                                                           "emailqueues", EMAILQUEUE, _request_timeout=5)
        except Exception:  # an API error or an apiserver that is down (fault tests): nothing to report now
            return {}
        return obj.get("status") or {}

    def desired_replicas(self) -> int | None:
        try:
            return int(self.apps.read_namespaced_deployment_scale(DEPLOYMENT, self.namespace,
                                                                  _request_timeout=5).spec.replicas)
        except Exception:
            return None

    def queue_depth(self) -> tuple[int | None, int | None]:
        try:
            q = self.mgmt.queue(self.vhost, QUEUE)
        except (OSError, urllib.error.URLError, ValueError):
            return None, None
        return int(q.get("messages_ready") or 0), int(q.get("messages_unacknowledged") or 0)

    def scale_events(self, started_at: float) -> list[ScaleEvent]:
        """The EmailQueue's Kubernetes Events (what `kubectl describe eq` shows), oldest first."""
        try:
            items = self.core.list_namespaced_event(self.namespace, field_selector="involvedObject.kind=EmailQueue",
                                                    _request_timeout=10).items
        except Exception:
            return []
        events = []
        for item in items:
            when = item.event_time or item.last_timestamp or item.first_timestamp or item.metadata.creation_timestamp
            at = when.timestamp() - started_at if when else 0.0
            events.append(ScaleEvent(at, item.reason or "", item.message or "", item.type or "Normal"))
        return sorted(events, key=lambda e: e.at)
