#!/usr/bin/env bash
# Validates every Kubernetes manifest: daemonset/ (rendered with `kubectl kustomize`, with and
# without the monitoring component), crds/ and examples/k8s/ against the Kubernetes schemas
# (kubernetes-validate --strict), and the custom resources against the generated CRD schemas.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v kubectl >/dev/null; then
  echo "validate-k8s: kubectl is missing (it renders daemonset/ with its built-in kustomize); install kubectl" >&2
  exit 1
fi
VALIDATE=.venv/bin/kubernetes-validate
if [ ! -x "$VALIDATE" ]; then
  echo "validate-k8s: $VALIDATE is missing; run scripts/setup.sh" >&2
  exit 1
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
kubectl kustomize daemonset/ > "$out/daemonset.yaml"
kubectl kustomize examples/k8s/with-monitoring/ > "$out/with-monitoring.yaml"

# Kubernetes 1.33 is the oldest version the CRDs target (selectable fields are GA since 1.32).
# PodMonitor and PrometheusRule have no bundled schema: kubernetes-validate only warns on them.
for version in 1.33.0 1.37.0; do
  "$VALIDATE" --strict --quiet -k "$version" \
    "$out/daemonset.yaml" "$out/with-monitoring.yaml" crds/*.arl.infra.io.yaml examples/k8s/*.yaml
done
.venv/bin/python scripts/validate_k8s.py crds "$out/daemonset.yaml" examples/k8s/*.yaml
echo "validate-k8s: ok"
