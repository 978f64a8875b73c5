#!/usr/bin/env bash
# Installs the Debian packages the test bed needs (RabbitMQ) when missing.
# The package's service is kept from starting: the test bed runs its own node.
set -euo pipefail
if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "rabbitmq-server is missing; run as root or: sudo apt-get install rabbitmq-server" >&2
  exit 1
fi
echo "[install-deps] installing rabbitmq-server from Debian" >&2
export DEBIAN_FRONTEND=noninteractive
# Deny service start during install (no init system here; we start our own node).
policy=/usr/sbin/policy-rc.d
restore=
if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; restore=1; fi
trap '[ -n "$restore" ] && rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
# The package may have launched epmd/beam for its own node; stop those.
pkill -u rabbitmq -f beam.smp 2>/dev/null || true
pkill -u rabbitmq epmd 2>/dev/null || true
