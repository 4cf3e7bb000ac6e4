#!/usr/bin/env bash
# Memory per entry in BENCHMARKS.md: a `serve` with dataplane/examples/bench.toml (embedded,
# 384-d vectors given, resident index on) seeded with N entries whose answers are B bytes,
# side by side for B = 0 (a few bytes) and B = 1500 (a realistic chat answer). Reports the
# growth of the process's resident memory (VmRSS) per entry, and the byte budget's figure
# (`/v1/stats` bytes) per entry beside it.
# Usage: scripts/bench-memory.sh [N] (default 60000; also runs N/3)
#   SEMANTIS_BENCH_ANSWER_BYTES="0 1500 16000"  the answer sizes to compare (default "0 1500")
#   SEMANTIS_BENCH_BIN=path  measure that binary instead of the release build
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semantis/target}"
n="${1:-60000}"
bin="${SEMANTIS_BENCH_BIN:-$CARGO_TARGET_DIR/release/semantis-dataplane}"
url="http://127.0.0.1:8090"
export SEMANTIS_BENCH_API_KEY=bench-key

bash scripts/setup.sh
if [ -z "${SEMANTIS_BENCH_BIN:-}" ]; then
  cargo build --release --locked -p semantis-dataplane >&2
fi
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; true' EXIT
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# One server per (answer size, entry count); the difference of VmRSS between two counts divided
# by the entries between them is what an entry costs, free of the start-up memory (which varies
# by tens of MiB from start to start: the model's pages, allocator arenas).
run() { # bytes entries -> VmRSS in KiB once settled, and the byte budget's figure
  local bytes=$1 n=$2 data="/tmp/semantis-bench-memory"
  rm -rf "$data" "$data.log"
  # A server left on this port would answer the readiness wait below and be measured
  # instead of the one started here.
  if curl -sf "$url/readyz" >/dev/null 2>&1; then
    echo "something already answers on $url: stop it first" >&2
    exit 1
  fi
  SEMANTIS_STORAGE__DATA_DIR="$data" "$bin" serve --config dataplane/examples/bench.toml 2>>"$data.log" &
  server=$!
  until curl -sf "$url/readyz" >/dev/null; do
    kill -0 "$server" 2>/dev/null || { echo "server died; see $data.log" >&2; exit 1; }
    sleep 0.05
  done
  local after budget
  "$bin" bench --url "$url" --scenario semantic-vector --seed "$n" --response-bytes "$bytes" \
    --duration 1s --warmup 0s >/dev/null 2>>"$data.log"
  # Read once every entry is in the table and the resident index's indexer has caught up.
  settled() {
    local m
    m=$(curl -s http://127.0.0.1:8091/metrics)
    [ "$(awk '/^semantis_index_resident_pending_entries/ { s += $2 } END { print s + 0 }' <<<"$m")" = 0 ] &&
      [ "$(awk '/^semantis_store_flushed_entries_total/ { s += $2 } END { print s + 0 }' <<<"$m")" -ge "$n" ]
  }
  until settled; do sleep 0.5; done
  after=$(rss_kib "$server")
  budget=$(curl -s "$url/v1/stats" -H "Authorization: Bearer $SEMANTIS_BENCH_API_KEY" | sed -n 's/.*"bytes":\([0-9]*\).*/\1/p')
  kill "$server"; wait "$server" 2>/dev/null || true; server=""
  echo "$after $budget"
}

small=$((n / 3))
echo "| answer bytes | RSS with $small entries (MiB) | RSS with $n entries (MiB) | memory per entry (bytes) | byte budget per entry (bytes) |"
echo "|---|---|---|---|---|"
for bytes in ${SEMANTIS_BENCH_ANSWER_BYTES:-0 1500}; do
  read -r g1 _ < <(run "$bytes" "$small")
  read -r g2 budget < <(run "$bytes" "$n")
  echo "| $bytes | $((g1 / 1024)) | $((g2 / 1024)) | $(((g2 - g1) * 1024 / (n - small))) | $((budget / n)) |"
done
