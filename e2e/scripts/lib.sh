# Shared by build-control-plane.sh and build-node.sh. Sourced; expects BIN, SRC and log().

# kube_build VERSION MODULE_DIR CMD...: builds k8s.io/kubernetes/cmd/CMD at VERSION into $BIN.
# k8s.io/kubernetes only builds as a dependency when every k8s.io/<staging> module is pinned to
# the matching v0.N.M by a replace line, derived here from k8s.io/kubernetes's own go.mod.
kube_build() {
  local version=$1 dir=$2; shift 2
  local staging=v0.${version#1.}
  mkdir -p "$dir"
  {
    echo "module semantis.dev/e2e/$(basename "$dir" | tr -cd 'a-z0-9')"
    echo "go 1.26"
    echo "replace ("
    curl -fsS "https://proxy.golang.org/k8s.io/kubernetes/@v/v$version.mod" \
      | sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/k8s.io/.*#\t\1 => \1 '"$staging"'#p'
    echo ")"
  } > "$dir/go.mod"
  (
    cd "$dir"
    local pkgs=() cmd
    for cmd in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$cmd@v$version"); done
    go get "${pkgs[@]}" >&2
    local pkg=k8s.io/component-base/version
    local ldflags
    ldflags="-s -w -X $pkg.gitVersion=v$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(echo "$version" | cut -d. -f2) -X $pkg.gitTreeState=clean"
    for cmd in "$@"; do
      [[ -x $BIN/$cmd ]] && continue
      log "building $cmd v$version"
      go build -ldflags "$ldflags" -o "$BIN/$cmd" "k8s.io/kubernetes/cmd/$cmd"
    done
  )
}
