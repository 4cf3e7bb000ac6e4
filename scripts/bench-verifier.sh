#!/usr/bin/env bash
# Text lookups with and without the local verifier, side by side in one run (the caches on,
# then off): the same binary, the same configuration (dataplane/examples/bench.toml), the same
# seeded entries, one server core. Usage: scripts/bench-verifier.sh [DURATION] (default 20s).
#   SEMANTIS_BENCH_BIN=path  measure that binary instead of the release build
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semantis/target}"
duration="${1:-20s}"
bin="${SEMANTIS_BENCH_BIN:-$CARGO_TARGET_DIR/release/semantis-dataplane}"
data="${SEMANTIS_BENCH_DIR:-/tmp/semantis-bench-verifier}"
url="http://127.0.0.1:8090"
export SEMANTIS_BENCH_API_KEY=bench-key

bash scripts/setup.sh
if [ -z "${SEMANTIS_BENCH_BIN:-}" ]; then
  cargo build --release --locked -p semantis-dataplane >&2
fi
[ -f "$(bash scripts/fetch-model.sh)/semantis-verifier.safetensors" ] || {
  echo "the local verifier's file is not installed; run scripts/fetch-model.sh" >&2
  exit 1
}

server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null || true' EXIT
# The bench asks about 500 seeded questions again and again, as users of a cache do: with the
# caches on, a repeated question's embedding (and with the verifier, its score) is remembered.
# With them off, every lookup embeds and verifies: the cost of a question never asked before.
for run in "none on" "local on" "none off" "local off"; do
  read -r verifier caches <<<"$run"
  entries=100000
  [ "$caches" = off ] && entries=0
  rm -rf "$data" "$data.log"
  # A server left on this port would answer the readiness wait below and be measured
  # instead of the one started here.
  if curl -sf "$url/readyz" >/dev/null 2>&1; then
    echo "something already answers on $url: stop it first" >&2
    exit 1
  fi
  SEMANTIS_STORAGE__DATA_DIR="$data" SEMANTIS_CACHE__VERIFIER="$verifier" \
    SEMANTIS_EMBEDDER__CACHE_ENTRIES="$entries" SEMANTIS_VERIFIERS__LOCAL__CACHE_ENTRIES="$entries" \
    taskset -c 0 "$bin" serve --config dataplane/examples/bench.toml 2>>"$data.log" &
  server=$!
  until curl -sf "$url/readyz" >/dev/null; do
    kill -0 "$server" 2>/dev/null || { echo "server died; see $data.log" >&2; exit 1; }
    sleep 0.05
  done
  echo "## semantic-text, verifier $verifier, embedding and score caches $caches (duration $duration)"
  taskset -c 1 "$bin" bench --url "$url" --duration "$duration" --warmup 3s \
    --scenario semantic-text --seed 500 --seed-connections 2 --connections 1
  kill -TERM "$server"
  wait "$server" || true
  server=""
done
