"""The test bed itself: every later test trusts these components, so pin what they do."""
from __future__ import annotations

import json
import os
import smtplib
import uuid
from email.message import EmailMessage

import pika
import pytest

from emailqueue_testbed import state

pytestmark = pytest.mark.integration

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.testbed.emailqueue.dev
spec:
  group: testbed.emailqueue.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Phase, type: string, jsonPath: .status.phase}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 0}
          status:
            type: object
            properties:
              phase: {type: string}
"""

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: workers}
spec:
  replicas: 1
  selector: {matchLabels: {app: workers}}
  template:
    metadata: {labels: {app: workers}}
    spec:
      containers: [{name: worker, image: example.invalid/worker:1}]
"""


def test_apiserver_reports_pinned_version(kube_env):
    version = json.loads(kube_env.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.36.3"
    assert version["clientVersion"]["gitVersion"] == "v1.36.3"


def test_crd_with_status_subresource_and_printer_columns(kube_env, namespace):
    kube_env.kubectl("apply", "-f", "-", input=WIDGET_CRD)
    kube_env.kubectl("wait", "--for=condition=Established", "crd/widgets.testbed.emailqueue.dev", "--timeout=30s")
    kube_env.kubectl("-n", namespace, "apply", "-f", "-",
                     input="apiVersion: testbed.emailqueue.dev/v1\nkind: Widget\n"
                           "metadata: {name: w1}\nspec: {size: 3}\n")
    kube_env.kubectl("-n", namespace, "patch", "widget", "w1", "--subresource=status", "--type=merge",
                     "-p", '{"status": {"phase": "Ready"}}')
    table = kube_env.kubectl("-n", namespace, "get", "wd").stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "SIZE", "PHASE"]
    assert row.split() == ["w1", "3", "Ready"]
    # A status patch through the main resource is ignored: status is a subresource.
    kube_env.kubectl("-n", namespace, "patch", "widget", "w1", "--type=merge", "-p", '{"status": {"phase": "X"}}')
    obj = json.loads(kube_env.kubectl("-n", namespace, "get", "widget", "w1", "-o", "json").stdout)
    assert obj["status"]["phase"] == "Ready"
    # The schema is enforced by the real apiserver.
    bad = kube_env.kubectl("-n", namespace, "apply", "-f", "-", check=False,
                           input="apiVersion: testbed.emailqueue.dev/v1\nkind: Widget\n"
                                 "metadata: {name: w2}\nspec: {size: -1}\n")
    assert bad.returncode != 0 and "spec.size" in bad.stderr


def test_deployment_scale_subresource(kube_env, namespace):
    kube_env.kubectl("-n", namespace, "apply", "-f", "-", input=DEPLOYMENT)
    kube_env.kubectl("-n", namespace, "patch", "deployment", "workers", "--subresource=scale", "--type=merge",
                     "-p", '{"spec": {"replicas": 7}}')
    scale = json.loads(kube_env.kubectl("-n", namespace, "get", "deployment", "workers",
                                        "--subresource=scale", "-o", "json").stdout)
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 7


def test_unprivileged_identity_is_forbidden(kube_env, namespace):
    def can_i(*args: str, context: str | None) -> str:
        return kube_env.kubectl("auth", "can-i", *args, "-n", namespace, context=context, check=False).stdout.strip()

    assert can_i("patch", "deployments/scale", context=None) == "yes"
    assert can_i("patch", "deployments/scale", context="unprivileged") == "no"
    assert can_i("get", "secrets", context="unprivileged") == "no"
    denied = kube_env.kubectl("-n", namespace, "get", "deployments", context="unprivileged", check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()


def test_persistent_messages_with_confirms_and_manual_acks(vhost):
    params = pika.URLParameters(vhost)
    with pika.BlockingConnection(params) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.queue_declare("jobs", durable=True, arguments={"x-queue-type": "quorum"})
        ids = [str(uuid.uuid4()) for _ in range(20)]
        for job_id in ids:
            # With confirms on, basic_publish raises if the broker nacks or returns the message.
            channel.basic_publish("", "jobs", job_id.encode(), mandatory=True,
                                  properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                                                  message_id=job_id))
        assert channel.queue_declare("jobs", passive=True).method.message_count == 20
        received = []
        for method, props, body in channel.consume("jobs", auto_ack=False, inactivity_timeout=5):
            if method is None:
                break
            assert props.delivery_mode == 2
            received.append(body.decode())
            channel.basic_ack(method.delivery_tag)
            if len(received) == len(ids):
                break
        channel.cancel()
        assert received == ids
        assert channel.queue_declare("jobs", passive=True).method.message_count == 0


def _mail(to: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "noreply@example.com", to, "Welcome"
    msg["Message-ID"] = f"<{uuid.uuid4()}@example.com>"
    msg.set_content("hello")
    return msg


def test_smtp_records_messages_and_injects_faults(smtp):
    with smtplib.SMTP(smtp.host, smtp.port, timeout=10) as client:
        client.send_message(_mail("alice@example.com"))
        smtp.set_fault(451, "4.7.1 try again later", count=1)
        with pytest.raises(smtplib.SMTPDataError) as exc:
            client.send_message(_mail("bob@example.com"))
        assert exc.value.smtp_code == 451
        client.send_message(_mail("bob@example.com"))  # the fault was for one answer only
        smtp.set_fault(550, "5.1.1 no such user", recipients=["carol@example.com"])
        with pytest.raises(smtplib.SMTPDataError) as exc:
            client.send_message(_mail("carol@example.com"))
        assert exc.value.smtp_code == 550
    messages = smtp.wait_for(2)
    assert [m["rcpt_tos"] for m in messages] == [["alice@example.com"], ["bob@example.com"]]
    assert "Subject: Welcome" in messages[0]["data"]


def test_prometheus_scrapes_loads_the_rules_and_is_stopped_by_testbed_down(tmp_path):
    """The per-run Prometheus (alerts and dashboard proofs): on loopback, the shipped rules
    loaded compressed, a worker target from file_sd, and recorded so `testbed-down` stops a
    server that a killed run left behind."""
    import time

    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    from emailqueue_testbed import prometheus, state

    registry = CollectorRegistry()
    Gauge("emailworker_in_flight", "test", registry=registry).set(3)
    port = state.free_port()
    http_server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    prom = prometheus.PrometheusServer(tmp_path, operator_target=f"127.0.0.1:{state.free_port()}",
                                       operator_namespace="ops", worker_job="email-worker", time_factor=1 / 60)
    prom.start()
    try:
        assert prom.url.startswith("http://127.0.0.1:")
        prom.set_worker_targets({"email-worker-0": port}, "ns")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not prom.query('emailworker_in_flight{job="email-worker"}'):
            time.sleep(0.5)
        (series,) = prom.query('emailworker_in_flight{job="email-worker"}')
        assert series["metric"]["namespace"] == "ns" and series["metric"]["pod"] == "email-worker-0"
        assert series["value"][1] == "3"
        # The operator target is down: up == 0 under the ServiceMonitor's job name.
        while time.monotonic() < deadline and not prom.query('up{job="emailqueue-operator"}'):
            time.sleep(0.5)
        assert prom.query('up{job="emailqueue-operator", namespace="ops"} == 0')
        rules = prom._get("/api/v1/rules", {})["groups"]
        loaded = {r["name"]: r for g in rules for r in g["rules"]}
        assert loaded["EmailQueueOperatorDown"]["duration"] == 5  # for: 5m × 1/60
        # A run killed before its cleanup: the record lets testbed-down find the process.
        pid = prom.pid
        assert pid is not None and state.alive(pid)
        assert prom.component in prometheus.down_all()
        assert not state.alive(pid) and state.load(prom.component) is None
    finally:
        prom.stop()
        http_server.shutdown()


def test_an_apiserver_start_that_fails_half_way_leaves_nothing_behind(monkeypatch, tmp_path):
    """etcd is up, then kube-apiserver never gets ready: `up` raises, stops etcd and keeps no
    record, so the next `up` (another engineer's test run) starts clean instead of meeting a
    half-started pair it cannot use."""
    from emailqueue_testbed import kube

    monkeypatch.setattr(state, "STATE_DIR", tmp_path)
    spawned: list[int] = []
    real_spawn = state.spawn

    def spawn(*args, **kwargs):
        pid = real_spawn(*args, **kwargs)
        spawned.append(pid)
        return pid

    monkeypatch.setattr(state, "spawn", spawn)
    with pytest.raises(state.TestbedError):
        kube.up(timeout=0.5)  # the apiserver cannot be ready within half a second
    assert len(spawned) == 2, "etcd and kube-apiserver were both started"
    assert state.load(kube.COMPONENT) is None
    assert not [pid for pid in spawned if state.alive(pid)], "a process of the failed start is still running"
    assert not kube.healthy(state.Record(kube.COMPONENT, (os.getpid(),), {}))  # a record without facts
