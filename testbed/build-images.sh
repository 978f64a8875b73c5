#!/usr/bin/env bash
# Builds the container images of the test bed's real cluster with buildah, without a Docker
# engine or a registry, and saves each as a docker-archive tarball that containerd imports
# (`ctr -n k8s.io images import`):
#
#   operator   localhost/emailqueue-operator:<VERSION>            operator/Dockerfile
#   worker     localhost/email-worker:<VERSION>                   worker/Dockerfile
#   smtp-sink  localhost/emailqueue-testbed/smtp-sink:<VERSION>   testbed/images/smtp-sink
#   rabbitmq   localhost/emailqueue-testbed/rabbitmq:<deb ver.>   testbed/images/rabbitmq
#
# VERSION is __version__ of operator/emailqueue_operator (as in `make images`).
#
# The bases are local: `debootstrap --variant=minbase $IMAGE_BASE_SUITE` with Debian's python3
# (3.11 in bookworm) and python3-aiosmtpd, imported as localhost/emailqueue-testbed/python-base
# and given to the Dockerfiles by their PYTHON_IMAGE/PYTHON_DIGEST build args (the Dockerfiles
# are built unchanged); and the rabbitmq-server root of testbed/build-rabbitmq4.sh. Builds run
# with --network none: pip installs the locks (--require-hashes, as in the Dockerfiles) from a
# wheelhouse that `pip download` fills on the host, which a pip.conf bind-mounted at
# /etc/pip.conf (RUN steps only, never in a layer) points pip at.
#
# Everything is cached under ${EQ_TESTBED_CACHE:-~/.cache/emailqueue-testbed}: roots in
# rootfs/, buildah's storage (vfs) in containers/storage, wheels in wheelhouse/<hash of the
# locks>, tarballs in images/<name>-<tag>.tar. Beside each tarball, <tarball>.key holds the hash
# of the image's inputs (its Containerfile, the files it copies, the locks, its base image, this
# script); a tarball whose key matches is not rebuilt, so a warm run builds nothing.
#
# Usage: testbed/build-images.sh [operator|worker|smtp-sink|rabbitmq|base|all]...   (default all)
#        testbed/build-images.sh --list     name=tarball lines, without building
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
# shellcheck source=lib-debian.sh
source "$here/lib-debian.sh"

CACHE=${EQ_TESTBED_CACHE:-$HOME/.cache/emailqueue-testbed}
IMAGES="$CACHE/images"
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$repo/operator/emailqueue_operator/__init__.py")
BASE_REPO=localhost/emailqueue-testbed/python-base
BASE_REF="$BASE_REPO:$IMAGE_BASE_SUITE"
BASE_ROOT="$CACHE/rootfs/$IMAGE_BASE_SUITE-python"
RABBITMQ_ROOT="$CACHE/rootfs/$RABBITMQ4_SUITE-rabbitmq-$RABBITMQ4_DEB_VERSION"
RABBITMQ_ROOT_REF="localhost/emailqueue-testbed/rabbitmq-root:$RABBITMQ4_DEB_VERSION"
PATH_ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
NAMES=(operator worker smtp-sink rabbitmq)
log() { printf '[build-images] %s\n' "$*" >&2; }
work=
base_tmp=  # a root being debootstrapped, removed if the run stops
working=   # a buildah working container, removed if the run stops
cleanup() {
  if [ -n "$working" ]; then bah rm "$working" >/dev/null 2>&1 || true; fi
  if [ -n "$base_tmp" ]; then reap "$base_tmp"; rm -rf --one-file-system "$base_tmp" "$base_tmp.debootstrap.log"; fi
  if [ -n "$work" ]; then rm -rf "$work"; fi
}

ref_of() {
  case $1 in
    operator) echo "localhost/emailqueue-operator:$VERSION" ;;
    worker) echo "localhost/email-worker:$VERSION" ;;
    smtp-sink) echo "localhost/emailqueue-testbed/smtp-sink:$VERSION" ;;
    rabbitmq) echo "localhost/emailqueue-testbed/rabbitmq:$RABBITMQ4_DEB_VERSION" ;;
    *) echo "unknown image: $1" >&2; return 2 ;;
  esac
}

# tarball_of NAME: images/<last path element of the repository>-<tag>.tar
tarball_of() {
  local ref
  ref=$(ref_of "$1")
  local image=${ref%:*}
  echo "$IMAGES/${image##*/}-${ref##*:}.tar"
}

# bah ARGS...: buildah on the test bed's own storage (never /var/lib/containers).
bah() { buildah --root "$CACHE/containers/storage" --runroot "$work/run" --storage-driver vfs "$@"; }

# image_id REF: the ID of REF in the storage, or nothing.
image_id() { bah images --quiet --no-trunc "$1" 2>/dev/null | head -n1 || true; }

# hash_files FILE...: one hash over the names and contents of the files (paths relative to the repo).
hash_files() { (cd "$repo" && sha256sum -- "$@") | sha256sum | cut -d' ' -f1; }

# copied_sources DOCKERFILE: every file its COPY instructions (not --from) take from the context,
# without what .dockerignore drops (__pycache__, *.pyc).
copied_sources() {
  local source
  for source in $(awk 'toupper($1) == "COPY" && !/--from/ { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' "$repo/$1"); do
    (cd "$repo" && find "$source" -type f ! -path '*/__pycache__/*' ! -name '*.pyc')
  done | LC_ALL=C sort
}

# revision_of PATH...: the last commit that changed these paths (+dirty if they differ from it),
# so the revision label names the source of the image, and unrelated commits rebuild nothing.
revision_of() {
  local rev
  rev=$(git -C "$repo" log -1 --format=%H -- "$@" 2>/dev/null || true)
  [ -n "$rev" ] || rev=unknown
  if [ -n "$(git -C "$repo" status --porcelain -- "$@" 2>/dev/null)" ]; then rev="$rev+dirty"; fi
  echo "$rev"
}

# fresh NAME KEY: true when NAME's tarball exists and was built from inputs hashing to KEY.
fresh() {
  local tarball
  tarball=$(tarball_of "$1")
  [ -s "$tarball" ] && [ "$(cat "$tarball.key" 2>/dev/null)" = "$2" ]
}

# save NAME KEY: push NAME's image to its tarball (via a temp file), then record the key.
save() {
  local ref tarball
  ref=$(ref_of "$1")
  tarball=$(tarball_of "$1")
  rm -f "$tarball.tmp" "$tarball.key"
  bah push --quiet "$ref" "docker-archive:$tarball.tmp:$ref"
  mv -f "$tarball.tmp" "$tarball"
  echo "$2" >"$tarball.key"
}

# import_root ROOT REF [CONFIG ARGS...]: REF becomes an image of one layer holding ROOT (its
# ownership and modes kept; the .eqtb-complete marker left out).
import_root() {
  local root=$1 ref=$2 ctr mnt
  shift 2
  ctr=$(bah from scratch)
  working=$ctr
  mnt=$(bah mount "$ctr")
  tar -C "$root" --exclude=./.eqtb-complete --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
  bah umount "$ctr" >/dev/null
  bah config "$@" "$ctr"
  bah commit --quiet --rm "$ctr" "$ref" >/dev/null
  working=
}

# The Debian root of the Python base: built in a temp dir renamed at the end (as build-rabbitmq4.sh).
build_base_root() {
  [ -e "$BASE_ROOT/.eqtb-complete" ] && return
  if [ "$(id -u)" != 0 ]; then
    echo "building the $IMAGE_BASE_SUITE root needs root (debootstrap, chroot, mount namespaces)" >&2
    exit 1
  fi
  mkdir -p "$CACHE/rootfs"
  local suite=$IMAGE_BASE_SUITE mirror_url tmp start
  mirror_url=$(mirror)
  tmp=$(mktemp -d "$CACHE/rootfs/.$suite-python.XXXXXX")
  chmod 755 "$tmp"
  base_tmp=$tmp
  start=$(date +%s)
  log "debootstrap --variant=minbase $suite (python3, python3-venv, python3-aiosmtpd) from $mirror_url"
  # A private mount namespace: debootstrap's /proc and /sys mounts vanish with it.
  unshare --mount --propagation private -- \
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,python3-aiosmtpd,ca-certificates \
    "$suite" "$tmp" "$mirror_url" >"$tmp.debootstrap.log" 2>&1 || {
      tail -n 30 "$tmp.debootstrap.log" >&2; exit 1; }
  rm -f "$tmp.debootstrap.log"
  reap "$tmp"
  rm -rf "${tmp:?}"/var/lib/apt/lists/* "$tmp"/var/cache/apt/*.bin "$tmp"/var/cache/apt/archives/*.deb \
    "$tmp"/var/log/*.log "$tmp"/var/log/apt/*
  local python
  python=$(chroot "$tmp" dpkg-query -W -f '${Version}' python3)
  printf 'suite=%s\nmirror=%s\npython3=%s\n' "$suite" "$mirror_url" "$python" >"$tmp/.eqtb-complete"
  mv -T "$tmp" "$BASE_ROOT"
  base_tmp=
  log "built $BASE_ROOT (python3 $python) in $(( $(date +%s) - start ))s"
}

# The Python base image, re-imported when its root changed (the marker's hash is a label).
build_base() {
  build_base_root
  local key
  key=$(sha256sum "$BASE_ROOT/.eqtb-complete" | cut -d' ' -f1)
  if [ -n "$(image_id "$BASE_REF")" ] &&
     [ "$(bah inspect --type image --format '{{index .OCIv1.Config.Labels "dev.emailqueue.testbed.root"}}' "$BASE_REF")" = "$key" ]; then
    return
  fi
  local start
  start=$(date +%s)
  import_root "$BASE_ROOT" "$BASE_REF" --env "$PATH_ENV" --env LANG=C.UTF-8 --cmd '["python3"]' \
    --label "dev.emailqueue.testbed.root=$key" \
    --label "org.opencontainers.image.description=debootstrap $IMAGE_BASE_SUITE minbase with Debian's python3 (test bed only)"
  log "imported $BASE_REF in $(( $(date +%s) - start ))s"
}

# base_digest: the digest the Dockerfiles' FROM ${PYTHON_IMAGE}@${PYTHON_DIGEST} resolves locally.
base_digest() { bah inspect --type image --format '{{.FromImageDigest}}' "$BASE_REF"; }

# The locks' wheels for pip inside the builds (no network there); keyed by the locks' hash.
wheelhouse() {
  local locks=(requirements/build.lock requirements/operator.lock requirements/worker.lock) dir key
  key=$(hash_files "${locks[@]}")
  dir="$CACHE/wheelhouse/$key"
  if [ ! -e "$dir/.complete" ]; then
    local python=${EQ_WHEELHOUSE_PYTHON:-$repo/.venv/bin/python} lock tmp
    mkdir -p "$CACHE/wheelhouse"
    tmp=$(mktemp -d "$CACHE/wheelhouse/.$key.XXXXXX")
    log "pip download the locks' wheels into $dir"
    for lock in "${locks[@]}"; do
      # --only-binary: nothing is built on the host; the locks' hashes are checked here and in the build.
      "$python" -m pip download --quiet --disable-pip-version-check --require-hashes --only-binary=:all: \
        --no-deps -r "$repo/$lock" -d "$tmp" >&2
    done
    printf '[global]\nno-index = true\nfind-links = /wheelhouse\n' >"$tmp/pip.conf"
    touch "$tmp/.complete"
    rm -rf "$dir"
    mv -T "$tmp" "$dir"
  fi
  echo "$dir"
}

# build_python NAME DOCKERFILE: operator/Dockerfile or worker/Dockerfile, unchanged, on the local base.
build_python() {
  local name=$1 dockerfile=$2 ref sources key revision
  ref=$(ref_of "$name")
  build_base
  mapfile -t sources < <(copied_sources "$dockerfile")
  revision=$(revision_of "$dockerfile" "${sources[@]}")
  key=$(printf '%s\n' "$(hash_files "$dockerfile" "${sources[@]}")" "$(image_id "$BASE_REF")" \
    "$VERSION" "$revision" "$script_hash" | sha256sum | cut -d' ' -f1)
  if fresh "$name" "$key"; then log "$ref: up to date"; return; fi
  local wheels start
  wheels=$(wheelhouse)
  start=$(date +%s)
  log "$ref: buildah bud -f $dockerfile (network none, wheels from $wheels)"
  bah bud --quiet --pull=never --network none --layers=false \
    -f "$repo/$dockerfile" \
    --build-arg "PYTHON_IMAGE=$BASE_REPO" --build-arg "PYTHON_DIGEST=$(base_digest)" \
    --build-arg "VERSION=$VERSION" --build-arg "REVISION=$revision" \
    -v "$wheels:/wheelhouse:ro" -v "$wheels/pip.conf:/etc/pip.conf:ro" \
    -t "$ref" "$repo" >/dev/null
  save "$name" "$key"
  log "$ref: built in $(( $(date +%s) - start ))s"
}

build_smtp_sink() {
  local name=smtp-sink ref key revision
  local containerfile=testbed/images/smtp-sink/Containerfile source=testbed/emailqueue_testbed/smtp.py
  ref=$(ref_of "$name")
  build_base
  revision=$(revision_of "$containerfile" "$source")
  key=$(printf '%s\n' "$(hash_files "$containerfile" "$source")" "$(image_id "$BASE_REF")" \
    "$VERSION" "$revision" "$script_hash" | sha256sum | cut -d' ' -f1)
  if fresh "$name" "$key"; then log "$ref: up to date"; return; fi
  local start context="$work/smtp-sink"
  start=$(date +%s)
  # The context is smtp.py alone (the repository's .dockerignore is the Python images').
  mkdir -p "$context"
  cp "$repo/$source" "$context/smtp.py"
  bah bud --quiet --pull=never --network none --layers=false -f "$repo/$containerfile" \
    --build-arg "BASE_IMAGE=$BASE_REF" --build-arg "VERSION=$VERSION" --build-arg "REVISION=$revision" \
    -t "$ref" "$context" >/dev/null
  save "$name" "$key"
  log "$ref: built in $(( $(date +%s) - start ))s"
}

build_rabbitmq() {
  local name=rabbitmq ref key dir=testbed/images/rabbitmq
  ref=$(ref_of "$name")
  "$here/build-rabbitmq4.sh"
  local root_key
  root_key=$(sha256sum "$RABBITMQ_ROOT/.eqtb-complete" | cut -d' ' -f1)
  if [ -z "$(image_id "$RABBITMQ_ROOT_REF")" ] ||
     [ "$(bah inspect --type image --format '{{index .OCIv1.Config.Labels "dev.emailqueue.testbed.root"}}' "$RABBITMQ_ROOT_REF")" != "$root_key" ]; then
    local start
    start=$(date +%s)
    import_root "$RABBITMQ_ROOT" "$RABBITMQ_ROOT_REF" --env "$PATH_ENV" --label "dev.emailqueue.testbed.root=$root_key"
    log "imported $RABBITMQ_ROOT_REF in $(( $(date +%s) - start ))s"
  fi
  key=$(printf '%s\n' "$(hash_files "$dir/Containerfile" "$dir/entrypoint.sh")" "$(image_id "$RABBITMQ_ROOT_REF")" \
    "$script_hash" | sha256sum | cut -d' ' -f1)
  if fresh "$name" "$key"; then log "$ref: up to date"; return; fi
  local start
  start=$(date +%s)
  bah bud --quiet --pull=never --network none --layers=false -f "$repo/$dir/Containerfile" \
    --build-arg "BASE_IMAGE=$RABBITMQ_ROOT_REF" --build-arg "VERSION=$RABBITMQ4_DEB_VERSION" \
    -t "$ref" "$repo/$dir" >/dev/null
  save "$name" "$key"
  log "$ref: built in $(( $(date +%s) - start ))s"
}

main() {
  if [ "${1:-}" = --list ]; then
    local name
    for name in "${NAMES[@]}"; do echo "$name=$(tarball_of "$name")"; done
    return
  fi
  local targets=("$@")
  [ ${#targets[@]} -eq 0 ] && targets=(all)
  local t
  for t in "${targets[@]}"; do
    case $t in all|base|operator|worker|smtp-sink|rabbitmq) ;; *) echo "unknown target: $t" >&2; return 2 ;; esac
  done
  command -v buildah >/dev/null || { echo "buildah is missing: testbed/install-deps.sh cluster" >&2; return 1; }
  mkdir -p "$IMAGES" "$CACHE/containers"
  # One build at a time on the storage; a waiting run finds the tarballs fresh and returns.
  exec 9>"$CACHE/containers/.build-images.lock"
  flock 9
  work=$(mktemp -d)
  trap cleanup EXIT
  script_hash=$(sha256sum "$0" | cut -d' ' -f1)
  local built=()
  for t in "${targets[@]}"; do
    case $t in
      all) build_python operator operator/Dockerfile; build_python worker worker/Dockerfile
           build_smtp_sink; build_rabbitmq; built+=("${NAMES[@]}") ;;
      base) build_base ;;
      operator) build_python operator operator/Dockerfile; built+=(operator) ;;
      worker) build_python worker worker/Dockerfile; built+=(worker) ;;
      smtp-sink) build_smtp_sink; built+=(smtp-sink) ;;
      rabbitmq) build_rabbitmq; built+=(rabbitmq) ;;
    esac
  done
  # vfs keeps a full copy per layer: drop the images a rebuild left without a name.
  bah rmi --prune >/dev/null 2>&1 || true
  local name
  for name in "${built[@]}"; do echo "$(ref_of "$name") $(tarball_of "$name")"; done
}

# On one line: bash has read it whole before running it, so editing this file meanwhile is safe.
main "$@"; exit $?
