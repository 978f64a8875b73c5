"""`email-worker` command line: run | publish | declare | move.

Every `run` flag falls back to an environment variable (the Kubernetes way), and secrets
can come from files (`SMTP_PASSWORD_FILE`, `AMQP_URL_FILE`) mounted from a Secret.
Exit codes: 0 ok, 1 runtime failure (e.g. rejected jobs on publish), 2 bad configuration,
3 `declare` found the work queue with v0.1 arguments (kept as it is; see docs/message-contract.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TextIO, overload

from email_worker.logs import setup_logging
from email_worker.message import DEFAULT_MAX_BODY_BYTES, InvalidMessage, ParseOptions
from email_worker.routing import RetryPolicy, parse_tiers
from email_worker.smtp import SmtpConfig
from email_worker.topology import DEFAULT_DELIVERY_LIMIT, DEFAULT_PREFIX, Topology, TopologyError

log = logging.getLogger("email_worker.cli")
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"


class ConfigError(ValueError):
    pass


@overload
def _env(env: Mapping[str, str], name: str, default: str) -> str: ...
@overload
def _env(env: Mapping[str, str], name: str, default: None = None) -> str | None: ...
def _env(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(name)
    return value if value not in (None, "") else default


def _secret(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    """NAME, else the contents of the file NAME_FILE (trailing newline stripped)."""
    value = _env(env, name)
    if value is not None:
        return value
    path = _env(env, f"{name}_FILE")
    if path is None:
        return default
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read {name}_FILE {path}: {exc.strerror}") from None


def _add_broker_args(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    parser.add_argument("--amqp-url", default=None,
                        help="broker URL, e.g. amqp://user:pass@host:5672/vhost; a cluster's nodes as a comma-"
                             "separated list (each client starts at its own node, fails over to the next) "
                             "(env AMQP_URL or AMQP_URL_FILE)")
    parser.add_argument("--queue", default=_env(env, "QUEUE", DEFAULT_PREFIX),
                        help="work queue name = topology prefix (env QUEUE, default %(default)s)")
    parser.add_argument("--retry-tiers", default=_env(env, "RETRY_TIERS", "10s,60s,600s"),
                        help="retry delays, one TTL queue each (env RETRY_TIERS, default %(default)s)")
    parser.add_argument("--max-retries", type=int, default=int(_env(env, "MAX_RETRIES", "8") or 8),
                        help="temporary failures before dead-lettering (env MAX_RETRIES, default %(default)s)")
    parser.add_argument("--delivery-limit", type=int,
                        default=int(_env(env, "DELIVERY_LIMIT", str(DEFAULT_DELIVERY_LIMIT)) or DEFAULT_DELIVERY_LIMIT),
                        help="quorum x-delivery-limit for poison messages (env DELIVERY_LIMIT)")


def _amqp_url(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    return args.amqp_url or _secret(env, "AMQP_URL") or DEFAULT_AMQP_URL


def _topology(args: argparse.Namespace) -> Topology:
    try:
        policy = RetryPolicy(tiers=parse_tiers(args.retry_tiers), max_retries=args.max_retries)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.delivery_limit < 1:
        raise ConfigError("--delivery-limit must be >= 1")
    return Topology(prefix=args.queue, retry=policy, delivery_limit=args.delivery_limit)


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    # --log-level works before or after the subcommand (`email-worker run --log-level debug`).
    levels = ["debug", "info", "warning", "error"]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=None, choices=levels, help="env LOG_LEVEL, default info")
    parser = argparse.ArgumentParser(prog="email-worker", description="Queue-driven email worker and publisher.")
    parser.add_argument("--log-level", dest="global_log_level", default=_env(env, "LOG_LEVEL", "info"),
                        choices=levels, help="env LOG_LEVEL, default info")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="consume the work queue and send over SMTP", parents=[common])
    _add_broker_args(run, env)
    run.add_argument("--smtp-host", default=_env(env, "SMTP_HOST", "127.0.0.1"))
    run.add_argument("--smtp-port", type=int, default=int(_env(env, "SMTP_PORT", "25") or 25))
    run.add_argument("--smtp-tls", choices=["none", "starttls", "tls"], default=_env(env, "SMTP_TLS", "none"))
    run.add_argument("--smtp-username", default=None, help="env SMTP_USERNAME or SMTP_USERNAME_FILE")
    run.add_argument("--smtp-password-file", default=None,
                     help="file holding the SMTP password (env SMTP_PASSWORD or SMTP_PASSWORD_FILE); "
                          "no --smtp-password flag: it would show in `ps`")
    run.add_argument("--smtp-timeout", type=float, default=float(_env(env, "SMTP_TIMEOUT", "30") or 30))
    run.add_argument("--smtp-insecure", action="store_true",
                     default=_env(env, "SMTP_TLS_VERIFY", "true").lower() in ("0", "false", "no"),
                     help="do not verify the SMTP server certificate (env SMTP_TLS_VERIFY=false)")
    run.add_argument("--smtp-ca-file", default=_env(env, "SMTP_CA_FILE"))
    run.add_argument("--message-id-domain", default=_env(env, "MESSAGE_ID_DOMAIN", "emailqueue.local"))
    run.add_argument("--default-from", default=_env(env, "DEFAULT_FROM"),
                     help="sender for jobs without `from` (env DEFAULT_FROM)")
    run.add_argument("--max-body-bytes", type=int,
                     default=int(_env(env, "MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES)) or DEFAULT_MAX_BODY_BYTES))
    run.add_argument("--concurrency", type=int, default=int(_env(env, "CONCURRENCY", "4") or 4))
    run.add_argument("--prefetch", type=int, default=int(_env(env, "PREFETCH", "0") or 0),
                     help="unacked deliveries to hold; 0 = concurrency (env PREFETCH)")
    run.add_argument("--rate-limit", type=float, default=float(_env(env, "RATE_LIMIT", "0") or 0),
                     help="emails/s for this worker, 0 = unlimited (env RATE_LIMIT)")
    run.add_argument("--rate-burst", type=float, default=float(_env(env, "RATE_BURST", "1") or 1))
    run.add_argument("--metrics-host", default=_env(env, "METRICS_HOST", "0.0.0.0"))
    run.add_argument("--metrics-port", type=int, default=int(_env(env, "METRICS_PORT", "9102") or 9102),
                     help="/metrics, /healthz, /readyz; 0 = any free port, -1 = off (env METRICS_PORT)")
    run.add_argument("--grace-seconds", type=float, default=float(_env(env, "GRACE_SECONDS", "25") or 25),
                     help="on SIGTERM, time for in-flight sends before requeueing the rest (env GRACE_SECONDS)")
    run.add_argument("--circuit-initial-seconds", type=float,
                     default=float(_env(env, "CIRCUIT_INITIAL_SECONDS", "5") or 5),
                     help="pause after a sender-side SMTP failure (MAIL FROM 5xx, AUTH, TLS, HELO, connect); "
                          "doubles per failed probe (env CIRCUIT_INITIAL_SECONDS, default %(default)s)")
    run.add_argument("--circuit-max-seconds", type=float,
                     default=float(_env(env, "CIRCUIT_MAX_SECONDS", "60") or 60),
                     help="longest such pause (env CIRCUIT_MAX_SECONDS, default %(default)s)")
    run.add_argument("--heartbeat-seconds", type=int, default=int(_env(env, "HEARTBEAT_SECONDS", "30") or 30))
    run.add_argument("--no-declare", action="store_true", help="do not declare the topology at start-up")

    publish = sub.add_parser("publish", help="publish JSON-lines jobs from a file or stdin; prints the count",
                             parents=[common])
    _add_broker_args(publish, env)
    publish.add_argument("file", nargs="?", default="-", help="JSON lines file, - for stdin (default)")
    publish.add_argument("--declare", action="store_true", help="declare the topology first")
    publish.add_argument("--no-validate", action="store_true", help="skip the client-side contract check")

    declare = sub.add_parser("declare", help="declare queues and exchanges, then exit", parents=[common])
    _add_broker_args(declare, env)

    move = sub.add_parser("move", help="move messages between queues, at least once (replay dead letters, "
                                       "migrate v0.1's work queue); prints the count", parents=[common])
    move.add_argument("--amqp-url", default=None, help="broker URL (env AMQP_URL or AMQP_URL_FILE)")
    move.add_argument("source", help="queue to empty, e.g. emails.dead")
    move.add_argument("target", help="existing queue to fill, e.g. emails")
    move.add_argument("--limit", type=int, default=None, help="move at most this many")
    move.add_argument("--create-target", action="store_true",
                      help="declare the target as a durable quorum queue first (a holding queue for a migration)")
    return parser


def worker_config(args: argparse.Namespace, env: Mapping[str, str]) -> Any:
    from email_worker.worker import WorkerConfig  # keeps `publish`/`declare` start-up light

    password = _secret(env, "SMTP_PASSWORD")
    if args.smtp_password_file:
        password = _secret({"SMTP_PASSWORD_FILE": args.smtp_password_file}, "SMTP_PASSWORD")
    smtp = SmtpConfig(
        host=args.smtp_host, port=args.smtp_port, tls=args.smtp_tls,
        username=args.smtp_username or _secret(env, "SMTP_USERNAME"), password=password,
        timeout=args.smtp_timeout, verify_tls=not args.smtp_insecure, ca_file=args.smtp_ca_file,
        message_id_domain=args.message_id_domain)
    try:
        return WorkerConfig(
            amqp_url=_amqp_url(args, env), smtp=smtp, topology=_topology(args), concurrency=args.concurrency,
            prefetch=args.prefetch or None, rate_limit=args.rate_limit, rate_burst=args.rate_burst,
            metrics_host=args.metrics_host,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port, grace_seconds=args.grace_seconds,
            heartbeat_seconds=args.heartbeat_seconds, declare_topology=not args.no_declare,
            circuit_initial_seconds=args.circuit_initial_seconds, circuit_max_seconds=args.circuit_max_seconds,
            parse=ParseOptions(max_body_bytes=args.max_body_bytes, default_from=args.default_from))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def cmd_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from email_worker.worker import Worker

    worker = Worker(worker_config(args, env))
    signals = {"count": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            # Second signal: the operator insists. Unacked deliveries are requeued by the broker.
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("signal received; stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return worker.run()
    except Exception:  # a bug: say so in the log format operators read; the broker requeues unacked work
        log.exception("worker crashed")
        return 1


def _read_jobs(stream: TextIO, errors: list[str]) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: not JSON ({exc.msg})")
            continue
        if not isinstance(job, dict):
            errors.append(f"line {number}: not a JSON object")
            continue
        job["__line"] = number
        yield job


def cmd_publish(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from email_worker.publisher import Publisher, PublishError

    topology = _topology(args)
    errors: list[str] = []
    published = 0
    stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115 (closed below, stdin never)
    try:
        with Publisher(_amqp_url(args, env), queue=topology.work_queue, validate=not args.no_validate,
                       declare_topology=topology if args.declare else None) as publisher:
            for job in _read_jobs(stream, errors):
                line = job.pop("__line")
                try:
                    publisher.publish(job)
                    published += 1
                except InvalidMessage as exc:
                    errors.append(f"line {line}: {exc.reason}")
    except PublishError as exc:
        print(f"published {published}", flush=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if stream is not sys.stdin:
            stream.close()
    for error in errors:
        print(f"rejected {error}", file=sys.stderr)
    print(f"published {published}", flush=True)
    if errors:
        print(f"rejected {len(errors)}", file=sys.stderr)
    return 1 if errors else 0


def _connect(url: str) -> Any:
    """A blocking AMQP connection, or None after saying why on stderr (credentials redacted)."""
    import pika
    import pika.exceptions

    from email_worker import brokers

    try:
        return pika.BlockingConnection(brokers.connection_parameters(url))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    except (pika.exceptions.AMQPError, OSError) as exc:
        print(f"error: cannot connect to {brokers.display(url)}: {type(exc).__name__}", file=sys.stderr)
        return None


def cmd_declare(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from email_worker.topology import declare

    topology = _topology(args)
    url = _amqp_url(args, env)
    connection = _connect(url)
    if connection is None:
        return 1
    try:
        declared = declare(connection.channel(), topology)
    except TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if connection.is_open:
            connection.close()
    queues = [topology.work_queue, *topology.retry_queues, topology.dead_queue]
    print(f"declared {', '.join(queues)} and exchange {topology.dead_letter_exchange}")
    for name in declared.deleted_legacy_queues:
        print(f"deleted empty v0.1 retry tier {name}")
    for name, count in declared.legacy_retry_queues.items():
        print(f"v0.1 retry tier {name} still holds {count} message(s); it drains into {topology.work_queue} "
              "by its TTL: run declare again later to delete it")
    if declared.legacy_work_queue:
        print(f"warning: {topology.work_queue} has v0.1 arguments (at-most-once dead-lettering); see "
              "docs/message-contract.md#migrating-from-v01", file=sys.stderr)
        return 3
    return 0


def cmd_move(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    import pika.exceptions

    from email_worker.topology import move_messages

    url = _amqp_url(args, env)
    connection = _connect(url)
    if connection is None:
        return 1
    try:
        channel = connection.channel()
        if args.create_target:
            channel.queue_declare(args.target, durable=True, arguments={"x-queue-type": "quorum"})
        moved = move_messages(channel, args.source, args.target, args.limit)
    except TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except pika.exceptions.ChannelClosedByBroker as exc:
        print(f"error: {exc.reply_code} {exc.reply_text}", file=sys.stderr)
        return 1
    finally:
        if connection.is_open:
            connection.close()
    print(f"moved {moved} from {args.source} to {args.target}")
    return 0


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    try:
        parser = build_parser(env)
    except ValueError as exc:  # a non-numeric CONCURRENCY=... and friends
        print(f"email-worker: configuration error in environment: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.log_level = args.log_level or args.global_log_level
    setup_logging(args.log_level)
    try:
        if args.command == "run":
            return cmd_run(args, env)
        if args.command == "publish":
            return cmd_publish(args, env)
        if args.command == "move":
            return cmd_move(args, env)
        return cmd_declare(args, env)
    except ConfigError as exc:
        print(f"email-worker: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
