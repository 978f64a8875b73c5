"""Operator overhead: N EmailQueues on one broker at a 5 s poll.

    python bench/operator_overhead.py --count 200 --count 1000 [--seconds 60] [--out out/bench/operator.json]

For each N: creates N worker Deployments, N queues on one vhost and N EmailQueues in a
fresh namespace of the test bed, starts one real operator process, lets it settle, then
measures over `--seconds`: poll lag p95 (from the operator's own
emailqueue_poll_lag_seconds histogram, delta over the window), CPU (cores, from
/proc/PID/stat), peak RSS (VmHWM), and the AMQP connections the operator holds on the
broker (management API). Goals: p95 lag < 1 s, < 0.5 core, < 300 MB, <= 2 connections.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pika
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "testbed"))

from emailqueue_testbed import bed, kube, rabbit, state  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def kubectl(kubeconfig: str, *args: str, input: str | None = None) -> str:
    result = subprocess.run([str(state.binary("kubectl")), "--kubeconfig", kubeconfig, *args], input=input,
                            capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"kubectl {' '.join(args[:3])}: {result.stderr[-2000:]}")
    return result.stdout


def objects(count: int, namespace: str, amqp_url: str) -> str:
    docs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rabbit", "namespace": namespace},
                                   "stringData": {"uri": amqp_url}}]
    for i in range(count):
        name = f"w{i:04d}"
        docs.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": namespace},
                     "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                              "template": {"metadata": {"labels": {"app": name}},
                                           "spec": {"containers": [{"name": "w", "image": "example.invalid/w:0"}]}}}})
        docs.append({"apiVersion": "emailqueue.dev/v1alpha1", "kind": "EmailQueue",
                     "metadata": {"name": f"eq{i:04d}", "namespace": namespace},
                     "spec": {"scaleTargetRef": {"name": name},
                              "broker": {"queue": f"q{i:04d}", "amqpSecretRef": {"name": "rabbit", "uriKey": "uri"}},
                              "replicas": {"min": 1, "max": 10}, "target": {"backlogPerReplica": 20},
                              "behavior": {"pollSeconds": 5}}})
    return yaml.safe_dump_all(docs)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("emailqueue_poll_lag_seconds_bucket") or line.startswith("emailqueue_poll_lag_seconds_count"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def lag_quantile(before: dict[str, float], after: dict[str, float], q: float) -> float | None:
    buckets = []
    for key, value in after.items():
        if "_bucket" in key:
            le = key.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets.append((bound, value - before.get(key, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            # linear interpolation inside the bucket, like histogram_quantile
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_bound, prev_count = bound, count
    return prev_bound


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int, key: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def operator_connections(mgmt: rabbit.Management) -> int:
    conns = mgmt.request("GET", "/api/connections")
    return sum(1 for c in conns if (c.get("client_properties") or {}).get("connection_name") == "emailqueue-operator")


def run(count: int, seconds: float, settle: float) -> dict[str, Any]:
    env = bed.up(("kube", "rabbitmq"))
    kube_rec, rmq = state.load("kube"), state.load("rabbitmq")
    kubeconfig = kube_rec.facts["kubeconfig"]
    mgmt = rabbit.management(rmq)
    vhost = f"bench-{uuid.uuid4().hex[:6]}"
    mgmt.create_vhost(vhost, rmq.facts["user"])
    url = bed.vhost_url(env.amqp_url, vhost)
    with pika.BlockingConnection(pika.URLParameters(url)) as conn:
        ch = conn.channel()
        for i in range(count):
            ch.queue_declare(f"q{i:04d}", durable=True)
            ch.basic_publish("", f"q{i:04d}", b"{}")
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    kubectl(kubeconfig, "apply", "-f", str(REPO / "deploy" / "crds"))
    kubectl(kubeconfig, "create", "namespace", namespace)
    kubectl(kubeconfig, "apply", "--server-side", "-f", "-", input=objects(count, namespace, url))
    port = state.free_port()
    log = open(REPO / "out" / "bench" / f"operator-{count}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "emailqueue_operator", "run", "--namespace", namespace,
                             "--metrics-port", str(port), "--health-port", "0"],
                            env={**os.environ, "KUBECONFIG": kubeconfig}, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Settle: every EmailQueue's daemon has started and polls on schedule.
        deadline = time.monotonic() + settle
        time.sleep(10)
        while time.monotonic() < deadline:
            first = scrape(port).get("emailqueue_poll_lag_seconds_count", 0)
            time.sleep(10)
            rate = (scrape(port).get("emailqueue_poll_lag_seconds_count", 0) - first) / 10
            if rate >= 0.95 * count / 5:
                break
        if os.environ.get("EQ_BENCH_PROFILE"):  # e.g. a py-spy command; {pid} is the operator
            subprocess.Popen(os.environ["EQ_BENCH_PROFILE"].format(pid=proc.pid), shell=True)
        before, cpu_before, t0 = scrape(port), cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        after, cpu_after, t1 = scrape(port), cpu_seconds(proc.pid), time.monotonic()
        polls = after.get("emailqueue_poll_lag_seconds_count", 0) - before.get("emailqueue_poll_lag_seconds_count", 0)
        result = {
            "emailqueues": count, "poll_seconds": 5, "window_seconds": round(t1 - t0, 1),
            "polls": int(polls), "polls_expected": int(count * (t1 - t0) / 5),
            "poll_lag_p95_seconds": lag_quantile(before, after, 0.95),
            "poll_lag_p50_seconds": lag_quantile(before, after, 0.50),
            "cpu_cores": round((cpu_after - cpu_before) / (t1 - t0), 3),
            "rss_peak_mb": round(rss_mb(proc.pid), 1), "rss_now_mb": round(rss_mb(proc.pid, "VmRSS"), 1),
            "broker_connections": operator_connections(mgmt),
        }
        result["goals_met"] = {
            "p95_lag_under_1s": (result["poll_lag_p95_seconds"] or 99) < 1.0,
            "under_half_a_core": result["cpu_cores"] < 0.5,
            "under_300MB": result["rss_peak_mb"] < 300,
            "at_most_2_connections": result["broker_connections"] <= 2,
        }
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        # Best effort: without a namespace controller (bare apiserver) it stays Terminating.
        subprocess.run([str(state.binary("kubectl")), "--kubeconfig", kubeconfig, "delete", "namespace", namespace,
                        "--wait=false"], capture_output=True)
        mgmt.delete_vhost(vhost)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, action="append", help="EmailQueues (repeatable; default 200 and 1000)")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--settle", type=float, default=240, help="at most this long for all daemons to start")
    parser.add_argument("--out", default=str(REPO / "out" / "bench" / "operator.json"))
    args = parser.parse_args()
    (REPO / "out" / "bench").mkdir(parents=True, exist_ok=True)
    results = []
    for count in args.count or [200, 1000]:
        print(f"operator overhead: {count} EmailQueues ...", flush=True)
        result = run(count, args.seconds, args.settle)
        print(json.dumps(result, indent=2), flush=True)
        results.append(result)
    Path(args.out).write_text(json.dumps({"operator_overhead": results, "cores": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
