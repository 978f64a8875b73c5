#!/usr/bin/env bash
# Installs what the real-pod e2e tests run against, into the cluster KUBECONFIG points at: the
# evaluation RabbitMQ (deploy/rabbitmq), the SMTP sink (testbed/e2e/smtp-sink.yaml) and the chart
# with the worker enabled (operator in-cluster as its ServiceAccount). Used by testbed/cluster-e2e.sh
# (the test bed's own cluster) and testbed/kind-e2e.sh (kind on a Docker host).
#
# Env: KUBECTL HELM (binaries), OPERATOR_IMAGE WORKER_IMAGE SINK_IMAGE (name:tag, loaded in the
# cluster), RABBITMQ_IMAGE (optional: replaces deploy/rabbitmq's image), PULL_POLICY (Never),
# NAMESPACE (email), RELEASE (emailqueue), WORKER_RATE_LIMIT (3: emails/s per worker, as the e2e plan).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${KUBECTL:?}" "${HELM:?}" "${OPERATOR_IMAGE:?}" "${WORKER_IMAGE:?}" "${SINK_IMAGE:?}"
NAMESPACE=${NAMESPACE:-email}
RELEASE=${RELEASE:-emailqueue}
PULL_POLICY=${PULL_POLICY:-Never}
WORKER_RATE_LIMIT=${WORKER_RATE_LIMIT:-3}
say() { printf '==> %s\n' "$*" >&2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say "evaluation RabbitMQ (deploy/rabbitmq${RABBITMQ_IMAGE:+, image $RABBITMQ_IMAGE}) in namespace $NAMESPACE"
overlay="$work/rabbitmq"
mkdir -p "$overlay"
cp -r deploy/rabbitmq "$overlay/base"
{
  echo "resources: [base]"
  if [ -n "${RABBITMQ_IMAGE:-}" ]; then
    echo "images:"
    echo "  - {name: rabbitmq, newName: ${RABBITMQ_IMAGE%:*}, newTag: \"${RABBITMQ_IMAGE##*:}\"}"
  fi
} >"$overlay/kustomization.yaml"
"$KUBECTL" apply -k "$overlay"

say "SMTP sink ($SINK_IMAGE)"
sed "s|image: SINK_IMAGE|image: $SINK_IMAGE|" testbed/e2e/smtp-sink.yaml | "$KUBECTL" -n "$NAMESPACE" apply -f -

say "helm install $RELEASE (operator $OPERATOR_IMAGE, worker $WORKER_IMAGE)"
"$HELM" upgrade --install "$RELEASE" charts/emailqueue-operator -n "$NAMESPACE" \
  --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="${OPERATOR_IMAGE##*:}" \
  --set image.pullPolicy="$PULL_POLICY" \
  --set worker.enabled=true --set worker.fullnameOverride=email-worker \
  --set worker.image.repository="${WORKER_IMAGE%:*}" --set worker.image.tag="${WORKER_IMAGE##*:}" \
  --set worker.image.pullPolicy="$PULL_POLICY" --set worker.amqpSecret.name=rabbitmq \
  --set worker.smtp.host="smtp-sink.$NAMESPACE.svc" --set worker.smtp.port=2525 --set worker.smtp.tls=none \
  --set worker.rateLimit="$WORKER_RATE_LIMIT"

say "waiting for RabbitMQ, the SMTP sink, the operator and the worker"
"$KUBECTL" -n "$NAMESPACE" rollout status statefulset/rabbitmq --timeout=300s
"$KUBECTL" -n "$NAMESPACE" rollout status deploy/smtp-sink --timeout=180s
"$KUBECTL" -n "$NAMESPACE" rollout status "deploy/$RELEASE-emailqueue-operator" --timeout=180s
"$KUBECTL" -n "$NAMESPACE" rollout status deploy/email-worker --timeout=180s
