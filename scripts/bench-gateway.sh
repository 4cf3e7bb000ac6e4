#!/usr/bin/env bash
# The gateway's figures in BENCHMARKS.md: a release `serve` with dataplane/examples/bench.toml
# on one core, the fake OpenAI upstream (`semantis-dataplane fake-openai`) and the load
# generator on the other, and `bench --scenario gateway`: a proxied hit beside a direct lookup,
# a proxied miss beside a direct upstream call, interleaved in one run.
# Usage: scripts/bench-gateway.sh [DURATION] (default 20s) [CONNECTIONS] (default 1).
#   SEMANTIS_BENCH_BIN=path  measure that binary instead of the release build
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semantis/target}"
duration="${1:-20s}"
connections="${2:-1}"
bin="${SEMANTIS_BENCH_BIN:-$CARGO_TARGET_DIR/release/semantis-dataplane}"
data="${SEMANTIS_BENCH_DIR:-/tmp/semantis-bench-gateway}"
url="http://127.0.0.1:8090"
export SEMANTIS_BENCH_API_KEY=bench-key

bash scripts/setup.sh
if [ -z "${SEMANTIS_BENCH_BIN:-}" ]; then
  cargo build --release --locked -p semantis-dataplane >&2
fi
server=""
fake=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; [ -n "$fake" ] && kill "$fake" 2>/dev/null; true' EXIT
rm -rf "$data" "$data.log"
taskset -c 1 "$bin" fake-openai --listen 127.0.0.1:8092 2>>"$data.log" &
fake=$!
# The embedding cache as deployed (bench.toml turns it off to measure the model): a miss's
# store embeds the prompt its lookup just embedded.
# A server left on this port would answer the readiness wait below and be measured
# instead of the one started here.
if curl -sf "$url/readyz" >/dev/null 2>&1; then
  echo "something already answers on $url: stop it first" >&2
  exit 1
fi
SEMANTIS_EMBEDDER__CACHE_ENTRIES=100000 SEMANTIS_STORAGE__DATA_DIR="$data" taskset -c 0 "$bin" serve --config dataplane/examples/bench.toml \
  2>>"$data.log" &
server=$!
until curl -sf "$url/readyz" >/dev/null && curl -s -o /dev/null http://127.0.0.1:8092/v1/models; do
  kill -0 "$server" 2>/dev/null || { echo "server died; see $data.log" >&2; exit 1; }
  sleep 0.05
done
echo "## gateway, $connections connection(s) (duration $duration)"
taskset -c 1 "$bin" bench --url "$url" --duration "$duration" --warmup 3s \
  --scenario gateway --upstream-url http://127.0.0.1:8092/v1 --seed 500 --connections "$connections"
