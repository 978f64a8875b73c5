#!/usr/bin/env bash
# Installs the Debian packages the test bed needs when missing.
#   testbed/install-deps.sh           RabbitMQ (the test bed's broker)
#   testbed/install-deps.sh cluster   also what the real single-node cluster (make cluster-up) and
#                                     `make images` use: runc, the CNI plugins, iptables (inside the
#                                     cluster's own network namespace only), buildah, debootstrap
# Package services are kept from starting: the test bed runs its own processes.
set -euo pipefail

# binary -> package
declare -A wanted=([/usr/lib/rabbitmq/bin/rabbitmq-server]=rabbitmq-server)
if [ "${1:-}" = cluster ]; then
  wanted+=(
    [/usr/sbin/runc]=runc
    [/usr/lib/cni/bridge]=containernetworking-plugins
    [/usr/sbin/iptables]=iptables
    [/usr/sbin/conntrack]=conntrack
    [/usr/bin/buildah]=buildah
    [/usr/sbin/debootstrap]=debootstrap
  )
fi
missing=()
for bin in "${!wanted[@]}"; do [ -x "$bin" ] || missing+=("${wanted[$bin]}"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "[install-deps] installing from Debian: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Deny service start during install (no init system here; we start our own processes).
policy=/usr/sbin/policy-rc.d
restore=
if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; restore=1; fi
trap '[ -n "$restore" ] && rm -f "$policy"' EXIT
# One apt at a time (make runs this from several targets).
exec 9>/var/lib/apt/lists/.eqtb-install.lock
flock 9
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# rabbitmq-server's package may have launched epmd/beam for its own node; stop those.
pkill -u rabbitmq -f beam.smp 2>/dev/null || true
pkill -u rabbitmq epmd 2>/dev/null || true
