#!/usr/bin/env bash
# Builds the real node's Go binaries at pinned versions: kubelet and kube-proxy from the same
# Kubernetes module and version as the control plane (build-control-plane.sh), and CoreDNS with
# the plugins a cluster's DNS needs. Binaries are cached outside the clone, keyed by the
# versions. Prints the bin directory. containerd, runc, the CNI plugins and buildah come from
# Debian's packages (node.sh installs them).
set -euo pipefail

K8S_VERSION=1.36.3
COREDNS_VERSION=1.15.0

CACHE=${SEMANTIS_CACHE:-$HOME/.cache/semantis}
BIN=$CACHE/e2e/node-bin/k8s-$K8S_VERSION-coredns-$COREDNS_VERSION
SRC=$CACHE/e2e/src
export GOFLAGS="-trimpath" CGO_ENABLED=0 GOTOOLCHAIN=local
export GOPATH=${GOPATH:-$HOME/go}

wanted=(kubelet kube-proxy coredns)
missing=0
for b in "${wanted[@]}"; do [[ -x $BIN/$b ]] || missing=1; done
if [[ $missing == 0 ]]; then echo "$BIN"; exit 0; fi
mkdir -p "$BIN" "$SRC"
command -v go >/dev/null || { echo "build-node: needs Go ≥ 1.26 (https://go.dev/dl/)" >&2; exit 1; }

# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

log() { echo "build-node: $*" >&2; }

kube() { kube_build "$K8S_VERSION" "$SRC/node-kube-$K8S_VERSION" kubelet kube-proxy; }

# CoreDNS the way its docs describe a build with a chosen plugin set: a main package that
# imports only those plugins and lists them, in their execution order, as the directives.
coredns() {
  [[ -x $BIN/coredns ]] && return
  local dir=$SRC/coredns-$COREDNS_VERSION
  mkdir -p "$dir"
  printf 'module semantis.dev/e2e/coredns\ngo 1.26\n' > "$dir/go.mod"
  local plugins=(reload bind ready health errors log loadbalance cache kubernetes loop forward)
  {
    echo "// A CoreDNS build with the plugins the end-to-end node's cluster DNS uses."
    echo "package main"
    echo
    echo "import ("
    echo '	"github.com/coredns/coredns/core/dnsserver"'
    echo '	"github.com/coredns/coredns/coremain"'
    for p in "${plugins[@]}"; do echo "	_ \"github.com/coredns/coredns/plugin/$p\""; done
    echo ")"
    echo
    echo "func init() {"
    echo "	dnsserver.Directives = []string{"
    # CoreDNS runs plugins in the order of its own plugin.cfg; these follow that order.
    for p in "${plugins[@]}"; do echo "		\"$p\","; done
    echo "	}"
    echo "}"
    echo
    echo "func main() { coremain.Run() }"
  } > "$dir/main.go"
  (
    cd "$dir"
    go get "github.com/coredns/coredns@v$COREDNS_VERSION" >&2
    go mod tidy >&2
    log "building coredns v$COREDNS_VERSION"
    go build -ldflags "-s -w" -o "$BIN/coredns" .
  )
}

kube
coredns
echo "$BIN"
