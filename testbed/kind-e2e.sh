#!/usr/bin/env bash
# kind path (needs a Docker engine): build both images, create a kind cluster, load the images and
# the SMTP sink's, install the evaluation RabbitMQ, the sink and the chart (testbed/e2e-install.sh,
# the same install as make e2e-cluster), then run the e2e tests marked `kind` (tests/e2e/test_real_pods.py).
# Usage: testbed/kind-e2e.sh   (env: KIND_CLUSTER, KEEP_CLUSTER=1, TAG, KIND_NODE_IMAGE)
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-emailqueue-e2e}
TAG=${TAG:-$(.venv/bin/python -c 'import emailqueue_operator as m; print(m.__version__)' 2>/dev/null || echo dev)}
NAMESPACE=email
RELEASE=emailqueue
OPERATOR_IMAGE=emailqueue-operator:${TAG}
WORKER_IMAGE=email-worker:${TAG}
PY=${PY:-.venv/bin/python}

die() { echo "kind-e2e: $*" >&2; exit 1; }

# Fail fast, with the reason, before building anything.
command -v docker >/dev/null || die "docker CLI not found; install Docker to use the kind path"
if ! docker info >/dev/null 2>&1; then
  die "docker info failed: no Docker engine is reachable (DOCKER_HOST=${DOCKER_HOST:-unset}).
  The kind path needs a running Docker engine; this machine may only have the CLI.
  Without Docker, run the same tests on the test bed's own cluster: make e2e-cluster (kubelet + containerd)."
fi
command -v kind >/dev/null || die "kind not found: go install sigs.k8s.io/kind@v0.29.0 (or see kind.sigs.k8s.io)"
HELM=${HELM:-$(command -v helm || true)}
KUBECTL=${KUBECTL:-$(command -v kubectl || true)}
[[ -n "$HELM" && -n "$KUBECTL" ]] || die "helm and kubectl are needed on PATH (make testbed-bins builds pinned ones into ~/.cache/emailqueue-testbed/bin)"

echo "==> building images ${OPERATOR_IMAGE} and ${WORKER_IMAGE}"
docker build -f operator/Dockerfile -t "${OPERATOR_IMAGE}" .
docker build -f worker/Dockerfile -t "${WORKER_IMAGE}" .

if ! kind get clusters | grep -qx "${CLUSTER}"; then
  echo "==> creating kind cluster ${CLUSTER}"
  kind create cluster --name "${CLUSTER}" ${KIND_NODE_IMAGE:+--image "${KIND_NODE_IMAGE}"} --wait 120s
fi
cleanup() {
  if [[ -z "${KEEP_CLUSTER:-}" ]]; then kind delete cluster --name "${CLUSTER}"; fi
}
trap cleanup EXIT

export KUBECONFIG
KUBECONFIG=$(mktemp)
kind get kubeconfig --name "${CLUSTER}" > "${KUBECONFIG}"

echo "==> loading images into the cluster"
kind load docker-image --name "${CLUSTER}" "${OPERATOR_IMAGE}" "${WORKER_IMAGE}"

echo "==> SMTP sink image (testbed/build-images.sh smtp-sink: buildah, Debian base), loaded as an archive"
testbed/build-images.sh smtp-sink
SINK_TAR=$(testbed/build-images.sh --list | sed -n 's/^smtp-sink=//p')
kind load image-archive --name "${CLUSTER}" "${SINK_TAR}"
SINK_IMAGE=$(tar -xOf "${SINK_TAR}" manifest.json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)[0]["RepoTags"][0])')

# RabbitMQ: deploy/rabbitmq's upstream image, pulled by kind's node.
KUBECTL="$KUBECTL" HELM="$HELM" NAMESPACE="${NAMESPACE}" RELEASE="${RELEASE}" PULL_POLICY=Never \
  OPERATOR_IMAGE="${OPERATOR_IMAGE}" WORKER_IMAGE="${WORKER_IMAGE}" SINK_IMAGE="${SINK_IMAGE}" testbed/e2e-install.sh

echo "==> e2e tests on real pods (pytest -m kind)"
export EQ_E2E_KUBECONFIG="${KUBECONFIG}" EQ_E2E_KUBECTL="${KUBECTL}" EQ_E2E_NAMESPACE="${NAMESPACE}" EQ_E2E_CLUSTER=kind
status=0
"$PY" -m pytest tests/e2e -m kind -q || status=$?
if [[ $status -eq 5 ]]; then
  # A run that selects no test is not a pass: the install succeeded, nothing was tested on it.
  echo "kind-e2e: FAILED: no tests marked 'kind' in tests/e2e (the chart installed; nothing ran against it)" >&2
fi
exit $status
