"""Capture what a broker of the matrix serves on its Prometheus endpoints, as test data.

Brings a known queue state about in a fresh vhost (50 messages published, 20 consumed
and acked by a consumer that stays attached with prefetch 5: 25 ready, 5 unacked,
1 consumer), then saves for `tests/unit/data/prometheus/`:

- `rabbitmq-<version>-detailed.txt`: /metrics/detailed?vhost=<vhost>&family=... verbatim
  (queue and channel families), so a parser can be tested on exactly what the broker emits;
- `rabbitmq-<version>-per-object.txt` and `-aggregated.txt`: /metrics/per-object and
  /metrics, only the queue/channel/global families and the build/identity info;
- `rabbitmq-<version>-api-queue.json`: /api/queues/<vhost>/<queue> for the same state.

Usage: python -m emailqueue_testbed.prom_capture [--variant 3.10|3.10-nocollector|4.0] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

from . import rabbit, state

VHOST = "t-prom-capture"
QUEUE = "emails"
PUBLISHED, ACKED, PREFETCH = 50, 20, 5
FAMILIES = (
    "queue_coarse_metrics", "queue_consumer_count", "queue_metrics", "queue_delivery_metrics",
    "queue_exchange_metrics", "channel_metrics", "channel_queue_metrics", "channel_queue_exchange_metrics",
    "channel_exchange_metrics", "channel_process_metrics",
)
# Families kept from /metrics and /metrics/per-object (the rest is node/VM detail).
RELEVANT = re.compile(r"rabbitmq_(queue|channel|global|detailed_queue|detailed_channel|build_info|identity_info)")


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()


def relevant_families(text: str) -> str:
    """Keep only the metric families RELEVANT matches (HELP/TYPE lines and samples)."""
    kept = []
    for line in text.splitlines():
        name = line.split()[2] if line.startswith("# ") and len(line.split()) > 2 else line.split("{")[0].split(" ")[0]
        if RELEVANT.match(name):
            kept.append(line)
    return "\n".join(kept) + "\n"


def bring_about_state(record: state.Record) -> object:
    """Publish and half-consume; returns the open connection (keeps the consumer attached)."""
    import pika

    mgmt = rabbit.management(record)
    mgmt.delete_vhost(VHOST)
    mgmt.create_vhost(VHOST, record.facts["user"])
    conn = pika.BlockingConnection(pika.URLParameters(rabbit.amqp_url(record, VHOST)))
    channel = conn.channel()
    channel.queue_declare(QUEUE, durable=True)
    channel.confirm_delivery()
    for n in range(PUBLISHED):
        channel.basic_publish("", QUEUE, f"message {n}".encode(), pika.BasicProperties(delivery_mode=2))
    channel.basic_qos(prefetch_count=PREFETCH)
    acked = 0

    def on_message(ch, method, _props, _body) -> None:
        nonlocal acked
        if acked < ACKED:
            ch.basic_ack(method.delivery_tag)
            acked += 1

    channel.basic_consume(QUEUE, on_message)
    deadline = time.monotonic() + 30
    while acked < ACKED and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.2)
    conn.process_data_events(time_limit=0.5)
    return conn


def capture(variant: str, out: Path) -> list[Path]:
    kind = rabbit.VARIANTS[variant]
    record = rabbit.up(component=kind.component, variant=variant)
    conn = bring_about_state(record)
    try:
        mgmt = rabbit.management(record)
        # Let the management collector (and the consumer's prefetch) settle before sampling.
        deadline = time.monotonic() + 20
        ready = PUBLISHED - ACKED - PREFETCH
        queue = mgmt.queue(VHOST, QUEUE)
        while time.monotonic() < deadline and kind.metrics_collector and queue.get("messages_ready") != ready:
            conn.process_data_events(time_limit=1)
            queue = mgmt.queue(VHOST, QUEUE)
        version = mgmt.request("GET", "/api/overview")["rabbitmq_version"]
        prom = f"http://127.0.0.1:{record.facts['prom_port']}"
        query = urllib.parse.urlencode([("vhost", VHOST), *(("family", f) for f in FAMILIES)])
        header = (f"# Captured from RabbitMQ {version} ({variant}) by emailqueue_testbed.prom_capture:\n"
                  f"# vhost {VHOST!r}, queue {QUEUE!r}: {PUBLISHED} published, {ACKED} consumed and acked,\n"
                  f"# one consumer still attached with prefetch {PREFETCH} "
                  f"(expect {ready} ready, {PREFETCH} unacked).\n")
        pages = {
            "detailed": (f"/metrics/detailed?{query}", lambda text: text),
            "per-object": ("/metrics/per-object", relevant_families),
            "aggregated": ("/metrics", relevant_families),
        }
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for kind_name, (path, trim) in pages.items():
            target = out / f"rabbitmq-{version}-{kind_name}.txt"
            target.write_text(header + f"# GET {path}\n" + trim(fetch(prom + path)))
            written.append(target)
        target = out / f"rabbitmq-{version}-api-queue.json"
        volatile = ("idle_since", "node", "garbage_collection", "backing_queue_status")
        target.write_text(json.dumps({k: v for k, v in sorted(queue.items()) if k not in volatile}, indent=1) + "\n")
        written.append(target)
        return written
    finally:
        conn.close()
        rabbit.management(record).delete_vhost(VHOST)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="3.10", choices=sorted(rabbit.VARIANTS))
    parser.add_argument("--out", type=Path, default=state.REPO / "tests" / "unit" / "data" / "prometheus")
    args = parser.parse_args(argv)
    for path in capture(args.variant, args.out):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
