#!/usr/bin/env bash
# Builds the Debian root the test bed's RabbitMQ 4.0 node runs in: `debootstrap
# --variant=minbase $RABBITMQ4_SUITE` plus Debian's rabbitmq-server (4.0.x, Erlang 27).
# The root is cached by suite and version under
#   ${EQ_TESTBED_CACHE:-~/.cache/emailqueue-testbed}/rootfs/<suite>-rabbitmq-<version>
# and built into a temporary directory that is renamed at the end, so a warm run does
# nothing and an interrupted run leaves no half-built root behind.
#
# Host hygiene: debootstrap and the package install mount /proc (and friends) inside the
# root; both run in a private mount namespace, so those mounts vanish with the process
# and the host's mount table is never touched. Service start is denied by policy-rc.d,
# and any process the install left running inside the root is killed by pid.
#
# Usage: testbed/build-rabbitmq4.sh            (EQ_DEBIAN_MIRROR overrides the mirror)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

CACHE=${EQ_TESTBED_CACHE:-$HOME/.cache/emailqueue-testbed}
suite=$RABBITMQ4_SUITE
version=$RABBITMQ4_DEB_VERSION
root="$CACHE/rootfs/$suite-rabbitmq-$version"
log() { printf '[build-rabbitmq4] %s\n' "$*" >&2; }

# The marker is written last, inside the temp dir, before the rename.
if [ -e "$root/.eqtb-complete" ]; then exit 0; fi
mkdir -p "$CACHE/rootfs"
# One build at a time; a waiting run finds the root built and returns.
exec 9>"$CACHE/rootfs/.build.lock"
flock 9
if [ -e "$root/.eqtb-complete" ]; then exit 0; fi

if [ "$(id -u)" != 0 ]; then
  echo "building the $suite root needs root (debootstrap, chroot, mount namespaces)" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null; then
  log "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

# shellcheck source=lib-debian.sh
source "$here/lib-debian.sh"
MIRROR=$(mirror)

tmp=$(mktemp -d "$CACHE/rootfs/.$suite-rabbitmq-$version.XXXXXX")
chmod 755 "$tmp"  # apt's _apt user must reach /var/lib/apt/lists inside it
# reap (lib-debian.sh) kills whatever still runs with its root inside the temp dir, by pid.
cleanup() { reap "$tmp"; rm -rf --one-file-system "$tmp"; }
trap cleanup EXIT

start=$(date +%s)
log "debootstrap --variant=minbase $suite from $MIRROR into $tmp"
unshare --mount --propagation private -- \
  debootstrap --variant=minbase "$suite" "$tmp" "$MIRROR" >"$tmp.debootstrap.log" 2>&1 || {
    tail -n 30 "$tmp.debootstrap.log" >&2; rm -f "$tmp.debootstrap.log"; exit 1; }
rm -f "$tmp.debootstrap.log"
log "debootstrap done in $(( $(date +%s) - start ))s"

printf '#!/bin/sh\n# the test bed starts its own nodes; no service starts at install\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
chmod +x "$tmp/usr/sbin/policy-rc.d"
# Where the node's data dir is bind-mounted at run time (see rabbit.py).
mkdir -p "$tmp/var/lib/eqtb"

log "installing rabbitmq-server ($version-* expected) in the root"
unshare --mount --propagation private -- sh -c '
  set -e
  mount -t proc proc "$1/proc"
  exec chroot "$1" sh -c "
    set -e
    export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
    apt-get update -qq
    apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends rabbitmq-server >/dev/null
    apt-get clean
    rm -rf /var/lib/apt/lists/*
  "' sh "$tmp"
reap "$tmp"

installed=$(chroot "$tmp" dpkg-query -W -f '${Version}' rabbitmq-server)
case "$installed" in
  "$version"-*) ;;
  *) echo "installed rabbitmq-server $installed, expected $version-*" >&2; exit 1 ;;
esac
erts=$(chroot "$tmp" dpkg-query -W -f '${Version}' erlang-base)
printf 'suite=%s\nmirror=%s\nrabbitmq-server=%s\nerlang-base=%s\n' "$suite" "$MIRROR" "$installed" "$erts" \
  >"$tmp/.eqtb-complete"
mv -T "$tmp" "$root"
trap - EXIT
log "built $root (rabbitmq-server $installed, erlang-base $erts) in $(( $(date +%s) - start ))s"
