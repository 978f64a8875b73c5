"""Topology declaration and the publish/declare commands against a real broker."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pika
import pytest

from email_worker.publisher import Publisher, PublishError
from email_worker.routing import RetryPolicy, RetryTier
from email_worker.topology import Topology, TopologyError, declare

pytestmark = pytest.mark.integration


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "email_worker.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=60)


def test_declare_is_idempotent_and_a_conflicting_queue_is_reported(vhost: str) -> None:
    first = cli("declare", "--amqp-url", vhost, "--retry-tiers", "1s,5s")
    again = cli("declare", "--amqp-url", vhost, "--retry-tiers", "1s,5s")
    assert first.returncode == again.returncode == 0, first.stderr
    assert "emails.retry.v2.1s" in first.stdout and "emails.dead" in first.stdout

    conflicting = cli("declare", "--amqp-url", vhost, "--delivery-limit", "3")
    assert conflicting.returncode == 1
    assert "emails" in conflicting.stderr and "PRECONDITION_FAILED" in conflicting.stderr
    assert "tb-" not in conflicting.stderr  # no password in errors


def test_expired_retries_return_to_the_work_queue(vhost: str) -> None:
    topology = Topology(retry=RetryPolicy(tiers=(RetryTier(0.2),)))
    connection = pika.BlockingConnection(pika.URLParameters(vhost))
    try:
        channel = connection.channel()
        declare(channel, topology)
        declare(channel, topology)
        channel.basic_publish("", topology.retry_queue(RetryTier(0.2)), b'{"to":"a@b.example"}')
        for _ in range(50):
            method, _, body = channel.basic_get(topology.work_queue, auto_ack=True)
            if method is not None:
                break
            connection.sleep(0.1)
        assert method is not None and body == b'{"to":"a@b.example"}'
        with pytest.raises(TopologyError, match="PRECONDITION_FAILED"):
            declare(connection.channel(), Topology(delivery_limit=99))
    finally:
        connection.close()


def test_publish_command_counts_and_rejects_bad_lines(vhost: str, tmp_path: Path) -> None:
    lines = [json.dumps({"to": f"u{i}@example.com", "from": "a@example.com", "text": "hi"}) for i in range(5)]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"from": "a@example.com", "text": "no recipient"}))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")

    result = cli("publish", "--amqp-url", vhost, "--declare", str(jobs))
    assert result.returncode == 1  # some lines were rejected
    assert "published 5" in result.stdout
    assert "line 3: not JSON" in result.stderr and "line 5: missing field: to" in result.stderr

    from_stdin = cli("publish", "--amqp-url", vhost, stdin=lines[0] + "\n")
    assert from_stdin.returncode == 0 and "published 1" in from_stdin.stdout

    connection = pika.BlockingConnection(pika.URLParameters(vhost))
    try:
        channel = connection.channel()
        assert channel.queue_declare("emails", passive=True).method.message_count == 6
        _method, properties, body = channel.basic_get("emails", auto_ack=True)
        assert properties.delivery_mode == 2 and properties.content_type == "application/json"
        assert properties.message_id == json.loads(body)["id"] and properties.timestamp > 0
    finally:
        connection.close()


def test_publishing_to_a_missing_queue_fails_loudly(vhost: str) -> None:
    with Publisher(vhost, queue="does-not-exist") as publisher, pytest.raises(PublishError, match="does not exist"):
        publisher.publish({"to": "a@example.com", "from": "b@example.com", "text": "x"})
