"""Worker configuration from flags and environment, secrets from files, and log redaction."""
from __future__ import annotations

import io
import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from email_worker.cli import build_parser, main, worker_config
from email_worker.logs import JsonFormatter, redact_text, redact_url
from email_worker.metrics import Health, WorkerMetrics, serve_http
from email_worker.routing import RetryPolicy, RetryTier
from email_worker.topology import Topology

from ..exposition import sample_values, series_names


@pytest.fixture(autouse=True)
def keep_root_logging() -> Iterator[None]:
    """main() installs the JSON handler on the root logger; give other tests theirs back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    pika_level = logging.getLogger("pika").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("pika").setLevel(pika_level)


def config_from(argv: list[str], env: dict[str, str]):  # type: ignore[no-untyped-def]
    args = build_parser(env).parse_args(["run", *argv])
    return worker_config(args, env)


def test_environment_fills_every_setting(tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("p@ss:/word\n")
    env = {"AMQP_URL": "amqp://u:p@rabbit:5672/mail", "SMTP_HOST": "smtp.example.com", "SMTP_PORT": "587",
           "SMTP_USERNAME": "mailer", "SMTP_PASSWORD_FILE": str(password_file), "SMTP_TLS": "starttls",
           "QUEUE": "notifications", "CONCURRENCY": "8", "RATE_LIMIT": "50", "METRICS_PORT": "9999",
           "GRACE_SECONDS": "40", "SMTP_TIMEOUT": "12", "RETRY_TIERS": "5s,1m", "MAX_RETRIES": "3"}
    cfg = config_from([], env)
    assert cfg.amqp_url == "amqp://u:p@rabbit:5672/mail"
    assert (cfg.smtp.host, cfg.smtp.port, cfg.smtp.tls, cfg.smtp.timeout) == ("smtp.example.com", 587, "starttls", 12)
    assert (cfg.smtp.username, cfg.smtp.password) == ("mailer", "p@ss:/word")
    assert cfg.topology.work_queue == "notifications" and cfg.topology.dead_queue == "notifications.dead"
    assert cfg.topology.retry_queues == ("notifications.retry.v2.5s", "notifications.retry.v2.60s")
    assert cfg.topology.retry.max_retries == 3
    assert (cfg.concurrency, cfg.rate_limit, cfg.metrics_port, cfg.grace_seconds) == (8, 50, 9999, 40)
    assert "u:p@" not in repr(cfg) and "p@ss" not in repr(cfg)


def test_flags_override_environment() -> None:
    cfg = config_from(["--concurrency", "2", "--smtp-port", "2525", "--metrics-port", "-1"],
                      {"CONCURRENCY": "8", "SMTP_PORT": "25"})
    assert (cfg.concurrency, cfg.smtp.port, cfg.metrics_port) == (2, 2525, None)


@pytest.mark.parametrize("argv, env, message", [
    (["run", "--retry-tiers", "soon"], {}, "bad retry tier"),
    (["run", "--concurrency", "0"], {}, "concurrency"),
    (["run"], {"SMTP_PASSWORD_FILE": "/nonexistent/secret"}, "SMTP_PASSWORD_FILE"),
    (["run"], {"CONCURRENCY": "many"}, "environment"),
])
def test_bad_configuration_exits_2_with_a_clear_message(argv: list[str], env: dict[str, str], message: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv, env) == 2
    assert message in capsys.readouterr().err


def test_redaction_of_urls_with_special_characters() -> None:
    url = "amqp://testbed:tb-x%2F%3A%40%25@127.0.0.1:5672/%2F"
    assert redact_url(url) == "amqp://testbed:***@127.0.0.1:5672/%2F"
    assert redact_url("amqp://rabbit/vh") == "amqp://rabbit/vh"
    assert redact_text(f"failed to reach {url} now") == "failed to reach amqp://testbed:***@127.0.0.1:5672/%2F now"


def test_json_logs_carry_fields_and_never_a_password() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.worker.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        raise ConnectionError("cannot reach amqp://user:hunter2@host/")
    except ConnectionError:
        logger.error("connect to amqp://user:hunter2@host/ failed", exc_info=True,
                     extra={"fields": {"job_id": "j1", "attempts": 2}})
    entry = json.loads(stream.getvalue())
    assert entry["level"] == "error" and entry["job_id"] == "j1" and entry["attempts"] == 2
    assert "hunter2" not in stream.getvalue()


def test_metrics_endpoint_serves_metrics_health_and_readiness() -> None:
    metrics = WorkerMetrics(tiers=("10s",))
    health = Health()
    server = serve_http(metrics, health, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_port}"

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        metrics.sent.inc(3)
        with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert sample_values(text, "emailworker_emails_sent_total") == [3.0]
        # labelled series exist before their first failure
        assert sample_values(text, "emailworker_emails_failed_total", {"class": "invalid"}) == [0.0]
        assert sample_values(text, "emailworker_emails_retried_total", {"tier": "10s"}) == [0.0]
        assert {"emailworker_send_duration_seconds_bucket", "emailworker_in_flight"} <= series_names(text)
        assert (status("/healthz"), status("/readyz")) == (200, 503)
        health.ready = True
        assert status("/readyz") == 200
    finally:
        server.shutdown()


def test_topology_arguments() -> None:
    # Every broker-side hop is at least once: quorum queues, at-least-once dead-lettering,
    # and reject-publish (without it RabbitMQ silently falls back to at-most-once).
    topology = Topology(prefix="emails", retry=RetryPolicy(tiers=(RetryTier(10), RetryTier(60))), delivery_limit=5)
    assert topology.work_queue_arguments() == {
        "x-queue-type": "quorum", "x-delivery-limit": 5, "x-dead-letter-exchange": "emails.dlx",
        "x-dead-letter-routing-key": "emails.dead", "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish"}
    # v0.1's arguments, recognised (not re-declared) when the worker meets the old queue.
    assert topology.legacy_work_queue_arguments() == {
        "x-queue-type": "quorum", "x-delivery-limit": 5, "x-dead-letter-exchange": "emails.dlx",
        "x-dead-letter-routing-key": "emails.dead"}
    # New names: v0.1's classic tiers (emails.retry.10s) cannot become quorum queues in place.
    assert topology.retry_queues == ("emails.retry.v2.10s", "emails.retry.v2.60s")
    assert topology.legacy_retry_queue(RetryTier(10)) == "emails.retry.10s"
    assert topology.legacy_retry_queue_arguments(RetryTier(10)) == {
        "x-message-ttl": 10000, "x-dead-letter-exchange": "emails.dlx", "x-dead-letter-routing-key": "emails"}
    assert topology.retry_queue_arguments(RetryTier(60)) == {
        "x-queue-type": "quorum", "x-message-ttl": 60000, "x-dead-letter-exchange": "emails.dlx",
        "x-dead-letter-routing-key": "emails", "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish"}


@pytest.mark.parametrize("argv, expected", [
    (["run"], "warning"),                               # from LOG_LEVEL
    (["--log-level", "debug", "run"], "debug"),
    (["run", "--log-level", "error"], "error"),
])
def test_log_level_before_or_after_the_subcommand(argv: list[str], expected: str) -> None:
    args = build_parser({"LOG_LEVEL": "warning"}).parse_args(argv)
    assert (args.log_level or args.global_log_level) == expected
