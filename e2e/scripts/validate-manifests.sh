#!/usr/bin/env bash
# Validates what platform teams install: the Helm chart, the kustomize bases, the alert rules
# and the dashboard. Offline checks (helm lint, promtool, render drift, JSON) always run; schema
# checks use the end-to-end API server (started if needed): kubeconform against JSON schemas
# generated from its OpenAPI document (built-in kinds, the CRD from crds/, and the
# prometheus-operator CRDs from their Go module), then a server-side dry-run apply.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
BIN=$(bash e2e/scripts/build-control-plane.sh)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
PROM_OPERATOR_VERSION=0.85.0

step() { echo "== $*" >&2; }

step "helm lint"
"$BIN/helm" lint charts/semantis-operator
"$BIN/helm" lint charts/semantis-operator --set 'watchNamespaces={team-a,team-b}' \
  --set metrics.serviceMonitor.enabled=true --set monitoring.dashboard.enabled=true \
  --set monitoring.prometheusRule.enabled=true --set networkPolicy.enabled=true \
  --set podDisruptionBudget.enabled=true

step "render"
"$BIN/helm" template semantis charts/semantis-operator --kube-version 1.36.3 --namespace semantis-system > "$OUT/chart-default.yaml"
"$BIN/helm" template semantis charts/semantis-operator --kube-version 1.36.3 --namespace semantis-system \
  --set 'watchNamespaces={team-a,team-b}' --set metrics.serviceMonitor.enabled=true \
  --set monitoring.dashboard.enabled=true --set monitoring.prometheusRule.enabled=true \
  --set networkPolicy.enabled=true --set podDisruptionBudget.enabled=true > "$OUT/chart-full.yaml"
"$BIN/kubectl" kustomize config/default > "$OUT/kustomize-default.yaml"
"$BIN/kubectl" kustomize config/prometheus > "$OUT/kustomize-prometheus.yaml"
"$BIN/kubectl" kustomize config/samples > "$OUT/samples.yaml"

step "promtool check rules"
"$BIN/promtool" check rules charts/semantis-operator/files/alerts.rules.yaml
step "monitoring assets in sync, dashboard is JSON"
bash scripts/render-monitoring.sh --check
python3 -m json.tool charts/semantis-operator/files/dashboard.json > /dev/null

if [[ -z ${SEMANTIS_E2E_KUBECONFIG:-} ]]; then
  eval "$(bash e2e/scripts/control-plane.sh start | sed -n 's/^KUBECONFIG=/SEMANTIS_E2E_KUBECONFIG=/p')"
  started=1
fi
export KUBECONFIG=$SEMANTIS_E2E_KUBECONFIG
kubectl() { "$BIN/kubectl" "$@"; }

step "CRDs: ours from crds/, prometheus-operator's from its Go module"
prom_dir=$(cd "$OUT" && GOFLAGS=-mod=mod go mod download -json \
  "github.com/prometheus-operator/prometheus-operator@v$PROM_OPERATOR_VERSION" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
kubectl apply --server-side --force-conflicts -f crds/semanticcaches.semantis.dev.yaml >&2
for kind in servicemonitors prometheusrules; do
  kubectl apply --server-side --force-conflicts \
    -f "$prom_dir/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" >&2
done
kubectl wait --for=condition=Established --timeout=60s \
  crd/semanticcaches.semantis.dev crd/servicemonitors.monitoring.coreos.com crd/prometheusrules.monitoring.coreos.com >&2

step "kubeconform (schemas from the API server's OpenAPI document)"
kubectl get --raw /openapi/v2 > "$OUT/openapi.json"
python3 e2e/scripts/openapi2jsonschema.py "$OUT/openapi.json" "$OUT/schemas" >&2
"$BIN/kubeconform" -summary -strict \
  -schema-location "$OUT/schemas/{{ .ResourceKind }}-{{ .Group }}-{{ .ResourceAPIVersion }}.json" \
  "$OUT/chart-default.yaml" "$OUT/chart-full.yaml" "$OUT/kustomize-default.yaml" \
  "$OUT/kustomize-prometheus.yaml" "$OUT/samples.yaml"

step "server-side dry run"
kubectl create namespace semantis-system --dry-run=client -o yaml | kubectl apply -f - >&2
for ns in team-a team-b; do
  kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >&2
done
kubectl apply --dry-run=server -f "$OUT/chart-full.yaml" >&2
kubectl apply --dry-run=server -f "$OUT/kustomize-default.yaml" >&2
kubectl apply --dry-run=server -n team-a -f "$OUT/samples.yaml" >&2

if [[ ${started:-0} == 1 ]]; then bash e2e/scripts/control-plane.sh stop; fi
echo "manifests: valid" >&2
