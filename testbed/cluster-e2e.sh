#!/usr/bin/env bash
# make e2e-cluster: the chart on real pods in the test bed's own single-node cluster (no Docker).
# Brings the cluster up (testbed/emailqueue_testbed/cluster.py) with our images imported into its
# containerd, installs RabbitMQ, the SMTP sink and the chart (testbed/e2e-install.sh), runs the
# e2e tests marked `kind` against it and takes the cluster down again (KEEP_CLUSTER=1 keeps it);
# then the tests marked `cluster` (a cluster of their own: a pod runs, and cluster down leaves
# nothing on the machine). `--demo` (make demo CLUSTER=real) runs the demo's surge instead of the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
say() { printf '==> %s\n' "$*" >&2; }

say "images (buildah; cached by their inputs)"
testbed/build-images.sh >&2
declare -A image_tar image_ref
while IFS='=' read -r name tar; do
  image_tar[$name]=$tar
  image_ref[$name]=$(tar -xOf "$tar" manifest.json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)[0]["RepoTags"][0])')
done < <(testbed/build-images.sh --list)
for name in operator worker smtp-sink rabbitmq; do
  [ -n "${image_tar[$name]:-}" ] || { echo "cluster-e2e: testbed/build-images.sh did not list the $name image" >&2; exit 1; }
done

say "cluster up"
"$PY" -m emailqueue_testbed.cluster up --images "${image_tar[@]}"
cleanup() {
  if [ -z "${KEEP_CLUSTER:-}" ]; then say "cluster down"; "$PY" -m emailqueue_testbed.cluster down; fi
}
trap cleanup EXIT
export KUBECONFIG=$PWD/.testbed/cluster.kubeconfig
KUBECTL=$("$PY" -c 'from emailqueue_testbed.cluster import binary; print(binary("kubectl"))')
HELM=$("$PY" -c 'from emailqueue_testbed.state import binary; print(binary("helm"))')
export KUBECTL HELM

# No storage provisioner on a bare node: the evaluation RabbitMQ's claim binds this volume.
volume=$PWD/.testbed/cluster/volumes/rabbitmq-data
mkdir -p "$volume" && chown 999:999 "$volume"
"$KUBECTL" apply -f - <<YAML
apiVersion: v1
kind: PersistentVolume
metadata:
  name: eqtb-rabbitmq-data
spec:
  capacity: {storage: 2Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Delete
  hostPath: {path: $volume, type: Directory}
YAML

OPERATOR_IMAGE=${image_ref[operator]} WORKER_IMAGE=${image_ref[worker]} SINK_IMAGE=${image_ref[smtp-sink]} \
  RABBITMQ_IMAGE=${image_ref[rabbitmq]} PULL_POLICY=Never testbed/e2e-install.sh

if [ "${1:-}" = --demo ]; then
  say "the demo's surge on real pods (make demo CLUSTER=real)"
  "$PY" -m emailqueue_testbed.cluster_surge --preset "${DEMO_PRESET:-e2e}" --out out/demo-real
  exit $?
fi

say "e2e tests on real pods (pytest -m kind)"
export EQ_E2E_KUBECONFIG=$KUBECONFIG EQ_E2E_KUBECTL=$KUBECTL EQ_E2E_NAMESPACE=email EQ_E2E_CLUSTER=testbed
status=0
"$PY" -m pytest tests/e2e -m kind -q -p no:cacheprovider -s --durations=5 || status=$?
if [ $status -eq 5 ]; then echo "cluster-e2e: FAILED: no test marked 'kind' was selected" >&2; fi
[ -n "${KEEP_CLUSTER:-}" ] && exit $status
trap - EXIT
cleanup

say "the cluster's own lifecycle (pytest -m cluster)"
lifecycle=0
"$PY" -m pytest tests -m cluster -q -p no:cacheprovider || lifecycle=$?
if [ $lifecycle -eq 5 ]; then echo "cluster-e2e: FAILED: no test marked 'cluster' was selected" >&2; fi
[ $status -ne 0 ] && exit $status
exit $lifecycle
