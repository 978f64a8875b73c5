#!/usr/bin/env bash
# Builds the pod sandbox ("pause") image of the real cluster without a registry: Kubernetes'
# own build/pause/linux/pause.c (from the pinned k8s.io/kubernetes module) compiled with
# `gcc -static`, in an image made from scratch by buildah, saved as a docker-archive that
# containerd imports (`ctr images import`).
# Usage: testbed/build-pause.sh OUT.tar
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
out=${1:?usage: build-pause.sh OUT.tar}
[ -s "$out" ] && exit 0
CACHE=${EQ_TESTBED_CACHE:-$HOME/.cache/emailqueue-testbed}
ref=localhost/emailqueue-testbed/pause:3.10
export GOFLAGS=-mod=mod GOTOOLCHAIN=local
dir=$(GOPROXY=${GOPROXY:-} go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
work=$(mktemp -d)
storage=(--root "$CACHE/containers/storage" --runroot "$work/run" --storage-driver vfs)
ctr=
cleanup() { [ -n "$ctr" ] && buildah "${storage[@]}" rm "$ctr" >/dev/null 2>&1; rm -rf "$work"; }
trap cleanup EXIT
gcc -Os -static -Wall -Werror -DVERSION="v3.10-eqtb-$KUBERNETES_VERSION" -o "$work/pause" "$dir/build/pause/linux/pause.c"
strip "$work/pause"
ctr=$(buildah "${storage[@]}" from scratch)
buildah "${storage[@]}" copy "$ctr" "$work/pause" /pause >/dev/null
buildah "${storage[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
buildah "${storage[@]}" commit --quiet "$ctr" "$ref" >/dev/null
mkdir -p "$(dirname "$out")"
rm -f "$out.tmp"
buildah "${storage[@]}" push --quiet "$ref" "docker-archive:$out.tmp:$ref"
mv "$out.tmp" "$out"
echo "$out"
