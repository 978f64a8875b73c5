"""`emailqueue-operator` command line: run the operator, simulate surges, plan capacity."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="emailqueue-operator run",
                                     description="Watch EmailQueues and scale their worker Deployments.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch only this namespace (repeatable; default: all namespaces)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    parser.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--health-port", type=int, default=8081, help="liveness endpoint port /healthz (0: off)")
    election = parser.add_argument_group(
        "leader election", "Run several replicas: one leader (a coordination.k8s.io Lease) scales, the others wait "
        "and take over within a lease duration plus a retry period when it is gone.")
    election.add_argument("--leader-elect", action="store_true", help="take part in a leader election (default: off, "
                          "this process always scales)")
    election.add_argument("--leader-election-id", default="emailqueue-operator", help="name of the Lease")
    election.add_argument("--leader-election-namespace", default=None,
                          help="namespace of the Lease (default: $POD_NAMESPACE, else the service account's)")
    election.add_argument("--leader-election-identity", default=None,
                          help="this replica's holder identity (default: $POD_NAME or the host name, a random suffix)")
    election.add_argument("--leader-elect-lease-duration", type=float, default=15.0, metavar="SECONDS",
                          help="a leader silent this long is replaced (default: 15)")
    election.add_argument("--leader-elect-renew-deadline", type=float, default=10.0, metavar="SECONDS",
                          help="a leader that could not renew for this long stops scaling (default: 10)")
    election.add_argument("--leader-elect-retry-period", type=float, default=2.0, metavar="SECONDS",
                          help="how often the leader renews and the others look (default: 2)")
    parser.add_argument("--log-format", choices=["plain", "json"], default="plain")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    from .leader import ElectionSettings, default_identity, default_namespace

    settings = None
    if args.leader_elect:
        try:
            settings = ElectionSettings(
                identity=args.leader_election_identity or default_identity(),
                namespace=args.leader_election_namespace or default_namespace(),
                lease_name=args.leader_election_id, lease_seconds=args.leader_elect_lease_duration,
                renew_deadline_seconds=args.leader_elect_renew_deadline,
                retry_seconds=args.leader_elect_retry_period)
        except ValueError as exc:
            parser.error(str(exc))

    from .runner import run_operator  # kopf is imported only when the operator really runs

    return run_operator(namespaces=args.namespace, metrics_port=args.metrics_port, health_port=args.health_port,
                        log_format=args.log_format, verbose=args.verbose, election=settings)


USAGE = """usage: emailqueue-operator {run,simulate,plan,version} [options]

  run       watch EmailQueues and scale their workers (the operator)
  simulate  replay a surge scenario against scaling policies
  plan      recommend an EmailQueue for a peak rate and an SLO
  version   print the version"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in ("run", "simulate", "plan", "version"):
        print(USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "version":
        print(__version__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if command == "run":
        return _run(rest)
    if command == "simulate":
        from .sim import run_cli_simulate

        return run_cli_simulate(rest)
    from .planner import run_cli_plan

    return run_cli_plan(rest)


if __name__ == "__main__":
    sys.exit(main())
