#!/usr/bin/env bash
# Builds the test bed's binaries from pinned Go modules into a cache keyed by
# version: kube-apiserver and kubectl (k8s.io/kubernetes), etcd
# (go.etcd.io/etcd/server/v3), helm, promtool and the prometheus server; for the real single-node
# cluster (`make cluster-up`, target `cluster`) also kubelet, kube-controller-manager,
# kube-scheduler, kube-proxy (k8s.io/kubernetes), containerd, its runc shim and ctr
# (github.com/containerd/containerd/v2) and CoreDNS (github.com/coredns/coredns). A binary already in the cache is never rebuilt, so a warm
# run builds nothing.
#
# Usage: testbed/build-bins.sh [all|cluster|kube|node|containerd|coredns|etcd|helm|promtool|prometheus]...
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

CACHE=${EQ_TESTBED_CACHE:-$HOME/.cache/emailqueue-testbed}
BIN="$CACHE/bin"
SRC="$CACHE/src"
mkdir -p "$BIN" "$SRC"

export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
log() { printf '[build-bins] %s\n' "$*" >&2; }

# have NAME VERSION: true when the cached binary exists.
have() { [ -x "$BIN/$1-$2" ]; }

# install NAME VERSION BUILT_FILE: atomically move a fresh build into the cache.
install_bin() { mv -f "$3" "$BIN/$1-$2.tmp" && mv -f "$BIN/$1-$2.tmp" "$BIN/$1-$2"; }

# kube_module DIR CMD...: cd into a wrapper module of k8s.io/kubernetes in DIR and `go get` the
# commands; sets KUBE_LDFLAGS (the version ldflags, or a node reports v0.0.0-master).
kube_module() {
  local v=$KUBERNETES_VERSION staging=v0.${KUBERNETES_VERSION#v1.}
  local dir=$1; shift
  mkdir -p "$dir" && cd "$dir"
  if [ ! -f go.mod ]; then
    log "kubernetes $v: preparing wrapper module in $dir (staging modules at $staging)"
    cat >go.mod.new <<MOD
module emailqueue.dev/testbed/kubernetes

go 1.26

require k8s.io/kubernetes $v
MOD
    # k8s.io/kubernetes points every k8s.io/<staging> module at ./staging/src;
    # the list is read from its own go.mod so it stays right across versions.
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@$v" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    python3 - "$gomod" "$staging" >>go.mod.new <<'PY'
import re, sys
text = open(sys.argv[1]).read()
mods = sorted(set(re.findall(r'^\s*(k8s\.io/[\w.\-/]+)\s+=>\s+\./staging/src/', text, re.M)))
if not mods:
    sys.exit("no staging replace directives found in k8s.io/kubernetes go.mod")
print("\nreplace (")
for m in mods:
    print(f"\t{m} => {m} {sys.argv[2]}")
print(")")
PY
    mv go.mod.new go.mod
  fi
  local cmd gets=()
  for cmd in "$@"; do gets+=("k8s.io/kubernetes/cmd/$cmd@$v"); done
  go get "${gets[@]}"
  local major=${v#v}; major=${major%%.*}
  local minor=${v#v*.}; minor=${minor%%.*}
  KUBE_LDFLAGS="-s -w"
  local pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    KUBE_LDFLAGS+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    KUBE_LDFLAGS+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
}

# kube_build V CMD...: build each k8s.io/kubernetes command not yet cached.
kube_build() {
  local v=$1 cmd; shift
  for cmd in "$@"; do
    have "$cmd" "$v" && continue
    log "kubernetes $v: building $cmd (slow on 2 cores)"
    go build -trimpath -ldflags "$KUBE_LDFLAGS" -o "$cmd.new" "k8s.io/kubernetes/cmd/$cmd"
    install_bin "$cmd" "$v" "$cmd.new"
  done
}

build_kube() {
  local v=$KUBERNETES_VERSION
  if have kube-apiserver "$v" && have kubectl "$v"; then return; fi
  kube_module "$SRC/kubernetes-$v" kube-apiserver kubectl
  kube_build "$v" kube-apiserver kubectl
}

# The node side of the real cluster (make cluster-up): its own wrapper module directory, so it
# can build while build_kube runs (the module cache is shared and safe for that).
build_node() {
  local v=$KUBERNETES_VERSION
  if have kubelet "$v" && have kube-controller-manager "$v" && have kube-scheduler "$v" && have kube-proxy "$v"; then
    return
  fi
  kube_module "$SRC/kubernetes-node-$v" kubelet kube-controller-manager kube-scheduler kube-proxy
  kube_build "$v" kube-controller-manager kube-scheduler kube-proxy kubelet
}

# CoreDNS with the plugins the cluster's DNS uses (no cloud back ends): the Services and Pods of
# the cluster under cluster.local, nothing forwarded (the cluster has no way out, by design).
build_coredns() {
  local v=$COREDNS_VERSION
  have coredns "$v" && return
  local dir="$SRC/coredns-$v" mod=github.com/coredns/coredns
  mkdir -p "$dir" && cd "$dir"
  [ -f go.mod ] || printf 'module emailqueue.dev/testbed/coredns\n\ngo 1.26\n' >go.mod
  cat >main.go <<'GO'
// Command coredns is CoreDNS with the test bed's plugins only.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() { coremain.Run() }
GO
  go get "$mod@$v"
  go mod tidy
  log "coredns $v"
  go build -trimpath -ldflags "-s -w -X $mod/coremain.GitCommit=$v" -o coredns.new .
  install_bin coredns "$v" coredns.new
}

# containerd, its runc v2 shim and ctr. The btrfs, devmapper and zfs snapshotters need C headers
# and are not used (the overlayfs and native snapshotters are).
build_containerd() {
  local v=$CONTAINERD_VERSION
  if have containerd "$v" && have containerd-shim-runc-v2 "$v" && have ctr "$v"; then return; fi
  local dir="$SRC/containerd-$v" mod=github.com/containerd/containerd/v2
  mkdir -p "$dir" && cd "$dir"
  [ -f go.mod ] || printf 'module emailqueue.dev/testbed/containerd\n\ngo 1.26\n' >go.mod
  go get "$mod/cmd/containerd@$v" "$mod/cmd/containerd-shim-runc-v2@$v" "$mod/cmd/ctr@$v"
  local ld="-s -w -X $mod/version.Version=$v -X $mod/version.Revision=$v"
  local cmd
  for cmd in containerd containerd-shim-runc-v2 ctr; do
    have "$cmd" "$v" && continue
    log "containerd $v: building $cmd"
    go build -trimpath -tags "no_btrfs no_devmapper no_zfs" -ldflags "$ld" -o "$cmd.new" "$mod/cmd/$cmd"
    install_bin "$cmd" "$v" "$cmd.new"
  done
}

build_etcd() {
  local v=$ETCD_VERSION
  have etcd "$v" && return
  local dir="$SRC/etcd-$v"
  mkdir -p "$dir" && cd "$dir"
  log "etcd $v: wrapper module"
  cat >go.mod <<MOD
module emailqueue.dev/testbed/etcd

go 1.26
MOD
  cat >main.go <<'GO'
// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  go get "go.etcd.io/etcd/server/v3@$v"
  go mod tidy
  go build -trimpath -ldflags "-s -w" -o etcd.new .
  install_bin etcd "$v" etcd.new
}

build_helm() {
  local v=$HELM_VERSION
  have helm "$v" && return
  local dir="$SRC/helm-$v"
  mkdir -p "$dir" && cd "$dir"
  log "helm $v"
  printf 'module emailqueue.dev/testbed/helm\n\ngo 1.26\n' >go.mod
  go get "helm.sh/helm/v3/cmd/helm@$v"
  go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$v" -o helm.new helm.sh/helm/v3/cmd/helm
  install_bin helm "$v" helm.new
}

# prometheus_module CMD: cd into the wrapper module of github.com/prometheus/prometheus and get CMD
# (promtool and the server share it, so the second build reuses the first's downloads).
prometheus_module() {
  local dir="$SRC/prometheus-$PROMETHEUS_VERSION"
  mkdir -p "$dir" && cd "$dir"
  [ -f go.mod ] || printf 'module emailqueue.dev/testbed/prometheus\n\ngo 1.26\n' >go.mod
  go get "github.com/prometheus/prometheus/cmd/$1@$PROMETHEUS_VERSION"
}

build_promtool() {
  local v=$PROMETHEUS_VERSION
  have promtool "$v" && return
  log "promtool (prometheus module $v)"
  prometheus_module promtool
  go build -trimpath -ldflags "-s -w -X github.com/prometheus/common/version.Version=$v" -o promtool.new github.com/prometheus/prometheus/cmd/promtool
  install_bin promtool "$v" promtool.new
}

# The Prometheus server of the test bed (alerts and dashboard queries evaluated live), from the
# same module as promtool. `remove_all_sd` leaves the static and file service discovery (all the
# test bed uses) and drops the cloud SDKs; the web UI's assets are not embedded (the API is).
build_prometheus() {
  local v=$PROMETHEUS_VERSION
  have prometheus "$v" && return
  log "prometheus server (prometheus module $v)"
  prometheus_module prometheus
  go build -trimpath -tags remove_all_sd -ldflags "-s -w -X github.com/prometheus/common/version.Version=$v" \
    -o prometheus.new github.com/prometheus/prometheus/cmd/prometheus
  install_bin prometheus "$v" prometheus.new
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(all)
for t in "${targets[@]}"; do
  case $t in
    all) build_etcd; build_kube; build_helm; build_promtool; build_prometheus ;;
    cluster) build_containerd; build_coredns; build_node ;;
    kube) build_kube ;;
    node) build_node ;;
    containerd) build_containerd ;;
    coredns) build_coredns ;;
    etcd) build_etcd ;;
    helm) build_helm ;;
    promtool) build_promtool ;;
    prometheus) build_prometheus ;;
    *) echo "unknown target: $t" >&2; exit 2 ;;
  esac
done
log "cached binaries in $BIN:"
ls -1 "$BIN" >&2
