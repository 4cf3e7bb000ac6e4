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

log() { echo "build-node: $*" >&2; }

# The same wrapper module as build-control-plane.sh: every k8s.io/<staging> module pinned to
# v0.N.M by a replace line derived from k8s.io/kubernetes's own go.mod.
kube() {
  local dir=$SRC/node-kube-$K8S_VERSION staging=v0.${K8S_VERSION#1.}
  mkdir -p "$dir"
  {
    echo "module semantis.dev/e2e/nodekube"
    echo "go 1.26"
    echo "replace ("
    curl -fsS "https://proxy.golang.org/k8s.io/kubernetes/@v/v$K8S_VERSION.mod" \
      | sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/k8s.io/.*#\t\1 => \1 '"$staging"'#p'
    echo ")"
  } > "$dir/go.mod"
  (
    cd "$dir"
    local cmds=(kubelet kube-proxy)
    local pkgs=()
    for cmd in "${cmds[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$cmd@v$K8S_VERSION"); done
    go get "${pkgs[@]}" >&2
    local pkg=k8s.io/component-base/version
    local ldflags
    ldflags="-s -w -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X $pkg.gitTreeState=clean"
    for cmd in "${cmds[@]}"; do
      [[ -x $BIN/$cmd ]] && continue
      log "building $cmd v$K8S_VERSION"
      go build -ldflags "$ldflags" -o "$BIN/$cmd" "k8s.io/kubernetes/cmd/$cmd"
    done
  )
}

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
