#!/usr/bin/env bash
# Reproduces BENCHMARKS.md: starts a release `semantis-dataplane serve` with
# dataplane/examples/bench.toml on a fresh data directory, seeds it, and runs each scenario of
# `semantis-dataplane bench`. Usage: [BENCH_LARGE_ONLY=1] scripts/bench.sh [ENTRIES] (default
# 1000000).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semantis/target}"
entries="${1:-1000000}"
duration="${BENCH_DURATION:-20s}"
bin="$CARGO_TARGET_DIR/release/semantis-dataplane"
data="${SEMANTIS_BENCH_DIR:-/tmp/semantis-bench}"
url="http://127.0.0.1:8090"
export SEMANTIS_BENCH_API_KEY=bench-key

bash scripts/setup.sh
cargo build --release --locked -p semantis-dataplane >&2

# The server gets core 0, the load generator core 1: throughput figures are per server core.
start_server() {
  # A server left on this port would answer the readiness wait below and be measured
  # instead of the one started here.
  if curl -sf "$url/readyz" >/dev/null 2>&1; then
    echo "something already answers on $url: stop it first" >&2
    exit 1
  fi
  SEMANTIS_STORAGE__DATA_DIR="$data" taskset -c 0 "$bin" serve --config dataplane/examples/bench.toml \
    2>>"$data.log" &
  server=$!
  local t0; t0=$(date +%s%N)
  until curl -sf "$url/readyz" >/dev/null; do
    kill -0 "$server" 2>/dev/null || { echo "server died; see $data.log" >&2; exit 1; }
    sleep 0.02
  done
  echo "ready after $(( ($(date +%s%N) - t0) / 1000000 )) ms" >&2
}
stop_server() { kill -TERM "$server"; wait "$server" || true; }
trap 'kill "$server" 2>/dev/null || true' EXIT

rm -rf "$data" "$data.log"
start_server

# run [--duration D] [--warmup W] ARGS...: the load generator on core 1.
run() {
  local d="$duration" w=3s
  [ "${1:-}" = --duration ] && { d="$2"; shift 2; }
  [ "${1:-}" = --warmup ] && { w="$2"; shift 2; }
  echo "## $* (duration $d)"
  taskset -c 1 "$bin" bench --url "$url" --duration "$d" --warmup "$w" "$@"
}

# BENCH_LARGE_ONLY=1 skips to the million-entry part.
if [ -z "${BENCH_LARGE_ONLY:-}" ]; then
echo "## local model, in process, one core"
taskset -c 0 "$bin" bench --scenario embed-local --duration "$duration" --warmup 3s

# Text first: the store flood below leaves the single server core busy flushing for minutes.
run --scenario semantic-text --seed 500 --seed-connections 2 --connections 1
# Small-table scenarios (10k entries), then the large table.
run --scenario exact-hit --seed 10000 --connections 1
run --scenario exact-hit --seed 10000 --seeded --connections 16
run --scenario semantic-vector --seed 10000 --seeded --connections 1
run --scenario miss --connections 1
run --scenario store --connections 8
# Stores at a fixed rate while measuring lookups on another stream.
run --duration 30s --warmup 1s --scenario store --connections 16 --rate 5000 > /tmp/semantis-bench-store.txt &
storer=$!
run --duration 20s --scenario exact-hit --seed 10000 --seeded --connections 1
wait "$storer"; cat /tmp/semantis-bench-store.txt
fi

# The resident index's startup load runs after /readyz; its gauge appears when it is done.
wait_resident() {
  local t0; t0=$(date +%s%N)
  until curl -s "http://127.0.0.1:8091/metrics" | grep -q '^semantis_index_resident_entries{tenant="bench"}'; do
    sleep 0.2
  done
  echo "resident index loaded $(( ($(date +%s%N) - t0) / 1000000 )) ms after that" >&2
}

if [ "$entries" -gt 0 ]; then
  echo "## the resident index alone, in process, $entries entries, one core"
  taskset -c 0 "$bin" bench --scenario ann-recall --seed "$entries" --queries 1000
  # Seeding overwrites nothing: entries 0..N get new ids; 0..10k already existed.
  run --scenario semantic-vector --seed "$entries" --seed-connections 16 --connections 1
  echo "## restart with $entries entries"
  stop_server
  start_server
  # Served by LanceDB while the resident index loads, then from memory.
  run --duration 10s --warmup 0s --scenario semantic-vector --seed "$entries" --seeded --connections 1
  wait_resident
  run --duration 10s --scenario semantic-vector --seed "$entries" --seeded --connections 1
fi
stop_server
