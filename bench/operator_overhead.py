"""Operator overhead: N EmailQueues on one broker at a 5 s poll.

    python bench/operator_overhead.py --count 1000 --count 5000 [--seconds 60] [--out out/bench/operator.json]
    python bench/operator_overhead.py --count 1000 --profile-memory   # where the memory goes (object census)

For each N: creates N worker Deployments, N queues on one vhost and N EmailQueues in a
fresh namespace of the test bed, starts one real operator process, lets it settle, then
measures over `--seconds`: poll lag p95 (from the operator's own
emailqueue_poll_lag_seconds histogram, delta over the window), CPU (cores, from
/proc/PID/stat), peak RSS (VmHWM) and RSS at the end, the AMQP connections the operator
holds on the broker (management API), and the apiserver requests the operator makes per
minute by verb and resource. Those are counted in the operator process itself (its two
HTTP clients, urllib3 for the kubernetes client and aiohttp for kopf, are wrapped by
this script before the operator starts), because the test bed's apiserver is shared and
its own apiserver_request_total counts every client; that delta is recorded beside it as
an upper bound. Goals: p95 lag < 1 s, < 0.5 core, RSS <= 300 MB, <= 2 connections.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pika
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "testbed"))

from emailqueue_testbed import bed, rabbit, state  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def kubectl(kubeconfig: str, *args: str, input: str | None = None) -> str:
    result = subprocess.run([str(state.binary("kubectl")), "--kubeconfig", kubeconfig, *args], input=input,
                            capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"kubectl {' '.join(args[:3])}: {result.stderr[-2000:]}")
    return result.stdout


def objects(count: int, namespace: str, amqp_url: str, start: int = 0) -> str:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rabbit", "namespace": namespace},
              "stringData": {"uri": amqp_url}}
    docs: list[dict[str, Any]] = [secret]
    for i in range(start, start + count):
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


REQUESTS_METRIC = "bench_apiserver_requests_total"
SCRAPED = ("emailqueue_poll_lag_seconds_bucket", "emailqueue_poll_lag_seconds_count", REQUESTS_METRIC)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(SCRAPED):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


# --- counting the operator's apiserver requests (runs inside the operator process) ----------

_COLLECTION = re.compile(r"^/(?:api/v1|apis/[^/]+/[^/]+)(?:/namespaces/[^/]+)?/(?P<resource>[^/]+)"
                         r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$")


def classify(method: str, url: str, params: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(verb, resource[/subresource]) of an apiserver request, as the apiserver's metrics name them:
    a GET on a collection is LIST, with watch=true it is WATCH."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query.update({k: str(v) for k, v in (params or {}).items()})
    path = parts.path
    if path.startswith("/api/v1/namespaces/") and path.count("/") == 4:  # /api/v1/namespaces/NAME
        return method.upper(), "namespaces"
    match = _COLLECTION.match(path)
    if match is None:
        return method.upper(), path
    resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
    verb = method.upper()
    if verb == "GET" and match["name"] is None:
        verb = "WATCH" if query.get("watch") in ("true", "1", "True") else "LIST"
    return verb, resource


def install_request_counter(server: str) -> None:
    """Count every request the operator sends to `server` (urllib3 and aiohttp), exposed on
    its /metrics as bench_apiserver_requests_total{verb, resource}."""
    import aiohttp
    import urllib3
    from prometheus_client import Counter

    requests = Counter("bench_apiserver_requests", "Requests the operator sent to the apiserver",
                       ("verb", "resource"))
    base = urllib.parse.urlsplit(server)
    urlopen = urllib3.PoolManager.urlopen

    def counted_urlopen(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if urllib.parse.urlsplit(url).netloc == base.netloc:
            requests.labels(*classify(method, url)).inc()
        return urlopen(self, method, url, *args, **kwargs)

    urllib3.PoolManager.urlopen = counted_urlopen  # type: ignore[method-assign]
    request = aiohttp.ClientSession._request

    async def counted_request(self: Any, method: str, str_or_url: Any, *args: Any, **kwargs: Any) -> Any:
        url = str(str_or_url)
        if urllib.parse.urlsplit(url).netloc == base.netloc:
            requests.labels(*classify(method, url, kwargs.get("params"))).inc()
        return await request(self, method, str_or_url, *args, **kwargs)

    aiohttp.ClientSession._request = counted_request  # type: ignore[method-assign]


def install_memory_profile(out: str) -> None:
    """SIGUSR1 writes a census of the live objects to `out`: count and shallow size by type
    (module-qualified). tracemalloc over the whole operator slows it so much that a thousand
    EmailQueues never settle; a census costs nothing until asked."""
    import collections
    import gc

    def dump(*_: Any) -> None:
        count: collections.Counter[str] = collections.Counter()
        size: collections.Counter[str] = collections.Counter()
        for obj in gc.get_objects():
            kind = type(obj)
            name = f"{kind.__module__}.{kind.__qualname__}"
            count[name] += 1
            size[name] += sys.getsizeof(obj)
        lines = [f"gc-tracked objects: {sum(count.values())}, shallow {sum(size.values()) / 2**20:.1f} MiB",
                 "== by shallow size (MiB, count, type)"]
        for name, total in size.most_common(40):
            lines.append(f"{total / 2**20:8.2f} {count[name]:9d} {name}")
        Path(out).write_text("\n".join(lines) + "\n")

    signal.signal(signal.SIGUSR1, dump)


def operator_child(argv: list[str]) -> int:
    """`operator_overhead.py --operator-child SERVER [--profile OUT] -- run ...`: the operator, counted."""
    server, rest = argv[0], argv[1:]
    if rest[:1] == ["--profile"]:
        install_memory_profile(rest[1])
        rest = rest[2:]
    install_request_counter(server)
    from emailqueue_operator.cli import main as operator_main

    return operator_main(rest[1:] if rest[:1] == ["--"] else rest)


def requests_per_minute(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """The counted requests in the window, per minute, by "VERB resource" (and a total)."""
    rates: dict[str, float] = {}
    for key, value in after.items():
        if not key.startswith(REQUESTS_METRIC):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', key))
        delta = value - before.get(key, 0.0)
        if delta:
            name = f"{labels.get('verb')} {labels.get('resource')}"
            rates[name] = round(rates.get(name, 0.0) + delta * 60 / seconds, 1)
    rates["total"] = round(sum(rates.values()), 1)
    return dict(sorted(rates.items(), key=lambda item: -item[1]))


def apiserver_requests(kubeconfig: str) -> dict[str, float]:
    """The apiserver's own apiserver_request_total by verb (every client of the shared test bed)."""
    counts: dict[str, float] = {}
    for line in kubectl(kubeconfig, "get", "--raw", "/metrics").splitlines():
        if line.startswith("apiserver_request_total{"):
            key, value = line.rsplit(" ", 1)
            verb = dict(re.findall(r'(\w+)="([^"]*)"', key)).get("verb", "?")
            counts[verb] = counts.get(verb, 0.0) + float(value)
    return counts


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


TARGET_RESOURCES = ("deployments", "statefulsets", "horizontalpodautoscalers")


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def operator_connections(mgmt: rabbit.Management) -> int:
    conns = mgmt.request("GET", "/api/connections")
    return sum(1 for c in conns if (c.get("client_properties") or {}).get("connection_name") == "emailqueue-operator")


def run(count: int, seconds: float, settle: float, profile: bool = False) -> dict[str, Any]:
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
    for start in range(0, count, 1000):  # kubectl holds a whole manifest in memory: batches
        kubectl(kubeconfig, "apply", "--server-side", "-f", "-",
                input=objects(min(1000, count - start), namespace, url, start))
    port = state.free_port()
    log = open(REPO / "out" / "bench" / f"operator-{count}.log", "wb")  # noqa: SIM115 (closed in finally)
    profile_out = REPO / "out" / "bench" / f"operator-{count}-memory.txt"
    child = [sys.executable, __file__, "--operator-child", kube_rec.facts["server"]]
    if profile:
        child += ["--profile", str(profile_out)]
    proc = subprocess.Popen([*child, "--", "run", "--namespace", namespace, "--metrics-port", str(port),
                             "--health-port", "0"],
                            env={**os.environ, "KUBECONFIG": kubeconfig}, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Settle: every EmailQueue's daemon has started and polls on schedule.
        deadline = time.monotonic() + settle
        time.sleep(10)
        while time.monotonic() < deadline:  # the metrics port opens after the imports (slow on a busy machine)
            if proc.poll() is not None:
                raise RuntimeError(f"the operator exited ({proc.returncode}); see {log.name}")
            try:
                scrape(port)
                break
            except OSError:
                time.sleep(2)
        while time.monotonic() < deadline:
            first = scrape(port).get("emailqueue_poll_lag_seconds_count", 0)
            time.sleep(10)
            rate = (scrape(port).get("emailqueue_poll_lag_seconds_count", 0) - first) / 10
            if rate >= 0.95 * count / 5:
                break
        if os.environ.get("EQ_BENCH_PROFILE"):  # e.g. a py-spy command; {pid} is the operator
            subprocess.Popen(os.environ["EQ_BENCH_PROFILE"].format(pid=proc.pid), shell=True)
        settled = time.monotonic() - deadline + settle
        server_before = apiserver_requests(kubeconfig)
        before, cpu_before, t0 = scrape(port), cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        after, cpu_after, t1 = scrape(port), cpu_seconds(proc.pid), time.monotonic()
        server_after = apiserver_requests(kubeconfig)
        polls = after.get("emailqueue_poll_lag_seconds_count", 0) - before.get("emailqueue_poll_lag_seconds_count", 0)
        if profile:
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(20)
        result: dict[str, Any] = {
            "emailqueues": count, "poll_seconds": 5, "window_seconds": round(t1 - t0, 1),
            "polls": int(polls), "polls_expected": int(count * (t1 - t0) / 5),
            "poll_lag_p95_seconds": lag_quantile(before, after, 0.95),
            "poll_lag_p50_seconds": lag_quantile(before, after, 0.50),
            "cpu_cores": round((cpu_after - cpu_before) / (t1 - t0), 3),
            "rss_peak_mb": round(rss_mb(proc.pid), 1), "rss_now_mb": round(rss_mb(proc.pid, "VmRSS"), 1),
            "broker_connections": operator_connections(mgmt),
            "threads": threads(proc.pid), "settle_seconds": round(settled, 1),
            "environment": {k: os.environ[k] for k in ("MALLOC_ARENA_MAX", "EMAILQUEUE_POLL_THREADS")
                            if k in os.environ},
            "apiserver_requests_per_minute": requests_per_minute(before, after, t1 - t0),
            "apiserver_all_clients_per_minute": {
                verb: round((server_after.get(verb, 0) - server_before.get(verb, 0)) * 60 / (t1 - t0), 1)
                for verb in sorted(server_after) if server_after.get(verb, 0) - server_before.get(verb, 0)},
        }
        if profile:
            result["memory_profile"] = str(profile_out.relative_to(REPO))
            result["note"] = "object census taken after the window (SIGUSR1)"
        result["goals_met"] = {
            "p95_lag_under_1s": (result["poll_lag_p95_seconds"] or 99) < 1.0,
            # Lag is measured on the polls that ran: a saturated operator also runs fewer.
            "polls_at_least_95pct": result["polls"] >= 0.95 * result["polls_expected"],
            "under_half_a_core": result["cpu_cores"] < 0.5,
            "rss_at_most_300MB": result["rss_peak_mb"] <= 300,
            "no_target_lists": not any(k.startswith("LIST ") and k.split(" ")[1] in TARGET_RESOURCES
                                       for k in result["apiserver_requests_per_minute"]),
            "at_most_2_connections": result["broker_connections"] <= 2,
        }
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        # Without a namespace controller (bare apiserver) a namespace stays Terminating with its
        # objects: delete the collections (one request each), then the namespace, best effort.
        for collection in (f"/apis/emailqueue.dev/v1alpha1/namespaces/{namespace}/emailqueues",
                           f"/apis/apps/v1/namespaces/{namespace}/deployments"):
            subprocess.run([str(state.binary("kubectl")), "--kubeconfig", kubeconfig, "delete", "--raw", collection],
                           capture_output=True, timeout=600)
        subprocess.run([str(state.binary("kubectl")), "--kubeconfig", kubeconfig, "delete", "namespace", namespace,
                        "--wait=false"], capture_output=True)
        log.close()
        try:  # best effort: RabbitMQ may take long to delete thousands of queues
            mgmt.delete_vhost(vhost)
        except Exception as exc:
            print(f"warning: vhost {vhost} not deleted: {exc}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, action="append", help="EmailQueues (repeatable; default 1000 and 5000)")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--settle", type=float, default=240, help="at most this long for all daemons to start")
    parser.add_argument("--out", default=str(REPO / "out" / "bench" / "operator.json"))
    parser.add_argument("--profile-memory", action="store_true",
                        help="after the window, write a census of the operator's live objects by type")
    args = parser.parse_args()
    (REPO / "out" / "bench").mkdir(parents=True, exist_ok=True)
    results = []
    for count in args.count or [1000, 5000]:
        print(f"operator overhead: {count} EmailQueues ...", flush=True)
        result = run(count, args.seconds, args.settle, args.profile_memory)
        print(json.dumps(result, indent=2), flush=True)
        results.append(result)
        Path(args.out).write_text(json.dumps({"operator_overhead": results, "cores": os.cpu_count()}, indent=2))
    Path(args.out).write_text(json.dumps({"operator_overhead": results, "cores": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--operator-child"]:
        sys.exit(operator_child(sys.argv[2:]))
    sys.exit(main())
