# shellcheck shell=bash
# Helpers shared by the scripts that debootstrap Debian roots (build-rabbitmq4.sh,
# build-images.sh). Sourced, not run.

# mirror: the mirror this machine's apt uses for Debian itself (not debian-security);
# EQ_DEBIAN_MIRROR overrides it.
mirror() {
  if [ -n "${EQ_DEBIAN_MIRROR:-}" ]; then echo "$EQ_DEBIAN_MIRROR"; return; fi
  local found
  found=$(awk '
      function emit() { if (uri ~ /\/debian\/?$/ && suites !~ /security/) { print uri; exit } uri = ""; suites = "" }
      FNR == 1 { emit() }
      /^URIs:/ { uri = $2 } /^Suites:/ { suites = $0 }
      /^[[:space:]]*$/ { emit() }
      END { emit() }' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
  if [ -z "$found" ]; then
    found=$(grep -hE '^deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | grep -v security | awk '{for (i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' | grep -E '/debian/?$' | head -n1)
  fi
  echo "${found:-http://deb.debian.org/debian}"
}

# reap DIR: kill (by pid) every process whose root is DIR or below it, e.g. a daemon a
# package's postinst started inside a root being built.
reap() {
  local proc pid
  for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    case "$(readlink "/proc/$pid/root" 2>/dev/null)" in
      "$1"|"$1"/*) printf 'killing pid %s (%s) left by the install\n' "$pid" \
                     "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-80)" >&2
                   kill -9 "$pid" 2>/dev/null || true ;;
    esac
  done
}
