"""`emailqueue-testbed up|down|status|env` — the test bed from a shell (used by the Makefile)."""
from __future__ import annotations

import argparse
import sys

from . import bed, state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emailqueue-testbed", description="local kube-apiserver+etcd, RabbitMQ, SMTP")
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--only", nargs="*", choices=bed.COMPONENTS, help="components (default: all)")
    args = parser.parse_args(argv)
    components = tuple(args.only) if args.only else bed.COMPONENTS
    try:
        if args.command == "up":
            bed.up(components)
            print(f"test bed up; environment in {state.STATE_DIR / 'env'} (source it: . .testbed/env)")
        elif args.command == "down":
            stopped = bed.down(components)
            print("stopped: " + (", ".join(stopped) or "nothing was running"))
        elif args.command == "status":
            healthy = bed.status()
            for name, ok in healthy.items():
                print(f"{name:10s} {'up' if ok else 'down'}")
            return 0 if all(healthy.values()) else 1
        else:
            env = bed.current()
            if env is None:
                print("test bed is not running", file=sys.stderr)
                return 1
            for key, value in env.exports().items():
                print(f"{key}={value}")
    except state.TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
