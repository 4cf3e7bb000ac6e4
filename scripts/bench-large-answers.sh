#!/usr/bin/env bash
# What a semantic hit on a large answer costs once the answer is kept on disk
# (`storage.resident_response_max_bytes`, BENCHMARKS.md): a release `serve` with
# dataplane/examples/bench.toml pinned to core 0, seeded with N entries whose answers are B
# bytes, flushed to the table, then one connection of `bench --scenario semantic-vector` on
# core 1. Side by side in one run: the default limit (answers read from the table on a hit)
# and a limit above B (answers held in memory, as before the limit existed).
# Usage: scripts/bench-large-answers.sh [N] [B] (default 10000 16000)
#   SEMANTIS_BENCH_BIN=path  measure that binary instead of the release build
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semantis/target}"
n="${1:-10000}"
bytes="${2:-16000}"
bin="${SEMANTIS_BENCH_BIN:-$CARGO_TARGET_DIR/release/semantis-dataplane}"
url="http://127.0.0.1:8090"
export SEMANTIS_BENCH_API_KEY=bench-key

bash scripts/setup.sh
if [ -z "${SEMANTIS_BENCH_BIN:-}" ]; then
  cargo build --release --locked -p semantis-dataplane >&2
fi
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; true' EXIT

echo "| answers held | p50 | p99 | requests/s | hits |"
echo "|---|---|---|---|---|"
for limit in 4096 $((bytes * 2)); do
  data="/tmp/semantis-bench-large"
  rm -rf "$data" "$data.log"
  # Vector lookups carry no prompt for a verifier to read: cosine decides, as it is measured.
  # A server left on this port would answer the readiness wait below and be measured
  # instead of the one started here.
  if curl -sf "$url/readyz" >/dev/null 2>&1; then
    echo "something already answers on $url: stop it first" >&2
    exit 1
  fi
  SEMANTIS_STORAGE__DATA_DIR="$data" SEMANTIS_STORAGE__RESIDENT_RESPONSE_MAX_BYTES="$limit" SEMANTIS_CACHE__VERIFIER=none \
    taskset -c 0 "$bin" serve --config dataplane/examples/bench.toml 2>>"$data.log" &
  server=$!
  until curl -sf "$url/readyz" >/dev/null; do
    kill -0 "$server" 2>/dev/null || { echo "server died; see $data.log" >&2; exit 1; }
    sleep 0.05
  done
  taskset -c 1 "$bin" bench --url "$url" --scenario semantic-vector --seed "$n" \
    --response-bytes "$bytes" --duration 1s --warmup 0s >/dev/null 2>>"$data.log"
  # Measure once every entry is in the table (not the write-ahead tail) and indexed.
  settled() {
    local m
    m=$(curl -s http://127.0.0.1:8091/metrics)
    [ "$(awk '/^semantis_index_resident_pending_entries/ { s += $2 } END { print s + 0 }' <<<"$m")" = 0 ] &&
      [ "$(awk '/^semantis_store_flushed_entries_total/ { s += $2 } END { print s + 0 }' <<<"$m")" -ge "$n" ]
  }
  until settled; do sleep 0.5; done
  result=$(taskset -c 1 "$bin" bench --url "$url" --scenario semantic-vector --seed "$n" --seeded \
    --duration 15s --warmup 3s --connections 1 --json 2>>"$data.log")
  held=$([ "$limit" -lt "$bytes" ] && echo "on disk (limit $limit)" || echo "in memory (limit $limit)")
  python3 - "$result" "$held" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print("| %s | %.3f ms | %.3f ms | %.0f | %.1f%% |" % (
    sys.argv[2], r["p50_ms"], r["p99_ms"], r["throughput_rps"], 100 * r["hit_ratio"]))
PY
  kill "$server"; wait "$server" 2>/dev/null || true; server=""
done
