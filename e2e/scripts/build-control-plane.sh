#!/usr/bin/env bash
# Builds the end-to-end control plane from Go modules at pinned versions: kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, etcd, kwok, helm, kubeconform and promtool. Binaries are cached outside the
# clone, keyed by the versions, so CI rebuilds only when a pin changes. Prints the bin directory.
set -euo pipefail

K8S_VERSION=1.36.3
ETCD_VERSION=3.6.16
KWOK_VERSION=0.8.0
HELM_VERSION=3.22.0
KUBECONFORM_VERSION=0.8.0
PROMETHEUS_VERSION=0.316.0

CACHE=${SEMANTIS_CACHE:-$HOME/.cache/semantis}
BIN=$CACHE/e2e/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION-kc-$KUBECONFORM_VERSION-prom-$PROMETHEUS_VERSION
SRC=$CACHE/e2e/src
export GOFLAGS="-trimpath" CGO_ENABLED=0 GOTOOLCHAIN=local
export GOPATH=${GOPATH:-$HOME/go}

wanted=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm kubeconform promtool)
missing=0
for b in "${wanted[@]}"; do [[ -x $BIN/$b ]] || missing=1; done
if [[ $missing == 0 ]]; then echo "$BIN"; exit 0; fi
mkdir -p "$BIN" "$SRC"
command -v go >/dev/null || { echo "build-control-plane: needs Go ≥ 1.26 (https://go.dev/dl/)" >&2; exit 1; }

# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

log() { echo "build-control-plane: $*" >&2; }

kube() { kube_build "$K8S_VERSION" "$SRC/kube-$K8S_VERSION" kube-apiserver kube-controller-manager kube-scheduler kubectl; }

etcd() {
  [[ -x $BIN/etcd ]] && return
  local dir=$SRC/etcd-$ETCD_VERSION
  mkdir -p "$dir"
  printf 'module semantis.dev/e2e/etcd\ngo 1.26\n' > "$dir/go.mod"
  (
    cd "$dir"
    go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2
    log "building etcd v$ETCD_VERSION"
    go build -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
  )
}

tool() { # name module-path version package
  [[ -x $BIN/$1 ]] && return
  local dir=$SRC/$1-$3
  mkdir -p "$dir"
  printf 'module semantis.dev/e2e/%s\ngo 1.26\n' "$1" > "$dir/go.mod"
  (
    cd "$dir"
    go get "$4@v$3" >&2
    log "building $1 v$3"
    go build -ldflags "-s -w" -o "$BIN/$1" "$4"
  )
}

etcd
kube
tool kwok sigs.k8s.io/kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
tool helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm
tool kubeconform github.com/yannh/kubeconform "$KUBECONFORM_VERSION" github.com/yannh/kubeconform/cmd/kubeconform
tool promtool github.com/prometheus/prometheus "$PROMETHEUS_VERSION" github.com/prometheus/prometheus/cmd/promtool
echo "$BIN"
