#!/usr/bin/env bash
# Reproduces BENCHMARKS.md's migration and backup figures: seeds ENTRIES entries (384-d
# vectors supplied, so seeding does not wait for the model), then times
#   - `reindex` to the local model (all-MiniLM-L6-v2),
#   - `backup` to MinIO on loopback (scripts/services.sh) and `restore` into an empty directory.
# Usage: scripts/bench-migration.sh [ENTRIES] (default 20000). BIN overrides the binary
# (default: the debug build `make test` makes; the model's crates are optimised there too).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semantis/target}"
entries="${1:-20000}"
bin="${BIN:-$CARGO_TARGET_DIR/debug/semantis-dataplane}"
work="${SEMANTIS_BENCH_DIR:-/tmp/semantis-bench-migration}"
url="http://127.0.0.1:8091"
export SEMANTIS_BENCH_API_KEY=bench-key

rm -rf "$work"
mkdir -p "$work"
# The bench config with the model swapped for supplied vectors, then with the local model as
# the migration target.
sed -e 's/^provider = "local"/provider = "none"\ndimension = 384/' \
    -e "s#^data_dir = .*#data_dir = \"$work/data\"#" \
    -e 's/^listen = .*/listen = "127.0.0.1:8091"/' \
    dataplane/examples/bench.toml >"$work/active.toml"
cp "$work/active.toml" "$work/migrate.toml"
printf '\n[target_embedder]\nprovider = "local"\ncache_entries = 0\n' >>"$work/migrate.toml"

# A server left on this port would answer the readiness wait below and be measured
# instead of the one started here.
if curl -sf "$url/readyz" >/dev/null 2>&1; then
  echo "something already answers on $url: stop it first" >&2
  exit 1
fi
"$bin" serve --config "$work/active.toml" 2>"$work/serve.log" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
until curl -sf "$url/readyz" >/dev/null; do
  kill -0 "$server" 2>/dev/null || { echo "server died; see $work/serve.log" >&2; exit 1; }
  sleep 0.05
done
"$bin" bench --url "$url" --scenario exact-hit --seed "$entries" --duration 1s --warmup 0s >/dev/null
kill -TERM "$server"; wait "$server" || true   # graceful: the tail is flushed into LanceDB
echo "seeded $entries entries; table: $(du -sh "$work/data/lance" | cut -f1)"

t0=$(date +%s%N)
"$bin" reindex --config "$work/migrate.toml" 2>"$work/reindex.log"
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
echo "reindex: $entries entries in $ms ms ($(( entries * 1000 / ms )) entries/s)"

eval "$(bash scripts/services.sh minio bench | sed 's/^/export /')"
export AWS_ENDPOINT_URL="$SEMANTIS_TEST_S3_ENDPOINT" AWS_REGION=us-east-1
bucket="bench-$(date +%s)"
curl -sf -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
  "$AWS_ENDPOINT_URL/$bucket" >/dev/null
bytes=$(du -sb "$work/data/lance" | cut -f1)
t0=$(date +%s%N)
"$bin" backup --config "$work/migrate.toml" --to "s3://$bucket/bench" 2>"$work/backup.log" >/dev/null
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
echo "backup: $(( bytes / 1000000 )) MB on disk (both versions; the active one is uploaded) in $ms ms"
grep -o 'bytes=[0-9]*' "$work/backup.log" | tail -1 | sed "s/^/  uploaded /"

sed "s#^data_dir = .*#data_dir = \"$work/restored\"#" "$work/active.toml" >"$work/restore.toml"
t0=$(date +%s%N)
"$bin" restore --config "$work/restore.toml" --from "s3://$bucket/bench" 2>"$work/restore.log" >/dev/null
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
echo "restore: $(du -sb "$work/restored/lance" | cut -f1) bytes in $ms ms"
grep -o 'mb_per_sec=[0-9.]*' "$work/backup.log" "$work/restore.log" | sed 's/^/  /'
