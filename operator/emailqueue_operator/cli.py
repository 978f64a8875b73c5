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
    parser.add_argument("--peering", default=None,
                        help="kopf peering name for HA (needs the KopfPeering CRDs); default: standalone")
    parser.add_argument("--log-format", choices=["plain", "json"], default="plain")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    from .runner import run_operator  # kopf is imported only when the operator really runs

    return run_operator(namespaces=args.namespace, metrics_port=args.metrics_port, health_port=args.health_port,
                        peering=args.peering, log_format=args.log_format, verbose=args.verbose)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": _run}
    try:
        from .sim import run_cli_simulate
        commands["simulate"] = run_cli_simulate
    except ImportError:
        pass
    try:
        from .planner import run_cli_plan
        commands["plan"] = run_cli_plan
    except ImportError:
        pass
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands and argv[0] != "version":
        print(f"usage: emailqueue-operator {{{','.join([*commands, 'version'])}}} [options]\n\n"
              "  run       watch EmailQueues and scale their workers (the operator)\n"
              "  simulate  replay a surge scenario against scaling policies\n"
              "  plan      recommend an EmailQueue for a peak rate and an SLO\n"
              "  version   print the version", file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "version":
        print(__version__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
