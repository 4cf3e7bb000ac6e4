#!/usr/bin/env bash
# Side by side: exact and semantic hits against the release binaries of two commits, run
# alternately (A, B, A, B) on the same machine so drift shows. Each commit is built once in a
# worktree and its binary cached as ~/.cache/semantis/bench-bins/dataplane-<commit>.
# Usage: scripts/bench-ab.sh REV_A REV_B
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 REV_A REV_B" >&2; exit 2; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semantis/target}"
export SEMANTIS_BENCH_API_KEY=bench-key
bins="$HOME/.cache/semantis/bench-bins"
url="http://127.0.0.1:8090"
mkdir -p "$bins"
bash scripts/setup.sh

binary_of() {
  local rev; rev=$(git rev-parse --short "$1")
  local bin="$bins/dataplane-$rev"
  if [ ! -x "$bin" ]; then
    local tree="/tmp/semantis-ab-tree-$rev"
    git worktree add -f "$tree" "$rev" >/dev/null
    (cd "$tree" && cargo build --release --locked -p semantis-dataplane >&2)
    cp "$CARGO_TARGET_DIR/release/semantis-dataplane" "$bin"
    git worktree remove --force "$tree"
  fi
  echo "$bin"
}

a=$(binary_of "$1"); b=$(binary_of "$2")
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null || true' EXIT
for bin in "$a" "$b" "$a" "$b"; do
  data="/tmp/semantis-ab-$(basename "$bin")"
  rm -rf "$data" "$data.log"
  # A server left on this port would answer the readiness wait below and be measured
  # instead of the one started here.
  if curl -sf "$url/readyz" >/dev/null 2>&1; then
    echo "something already answers on $url: stop it first" >&2
    exit 1
  fi
  SEMANTIS_STORAGE__DATA_DIR="$data" taskset -c 0 "$bin" serve --config dataplane/examples/bench.toml 2>>"$data.log" &
  server=$!
  until curl -sf "$url/readyz" >/dev/null; do
    kill -0 "$server" 2>/dev/null || { echo "server died; see $data.log" >&2; exit 1; }
    sleep 0.05
  done
  echo "## $(basename "$bin")"
  taskset -c 1 "$bin" bench --url "$url" --duration 15s --warmup 3s --scenario exact-hit --seed 10000 --connections 1
  taskset -c 1 "$bin" bench --url "$url" --duration 15s --warmup 3s --scenario semantic-vector --seed 10000 --seeded --connections 1
  kill -TERM "$server"; wait "$server" || true; server=
done
