#!/usr/bin/env bash
# Lookups behind a shared system prompt (BENCHMARKS.md): a release `serve` with
# dataplane/examples/bench.toml and the local verifier, pinned to core 0; two chat prompts
# stored after the same 120-token system prompt, then paraphrases and other questions behind
# it. Prints, per lookup, whether it hit, what it served, the verifier's score and its time.
#   SEMANTIS_BENCH_BIN=path  measure that binary instead of the release build
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/semantis/target}"
bin="${SEMANTIS_BENCH_BIN:-$CARGO_TARGET_DIR/release/semantis-dataplane}"
data="${SEMANTIS_BENCH_DIR:-/tmp/semantis-bench-preamble}"
url="http://127.0.0.1:8090"

bash scripts/setup.sh
if [ -z "${SEMANTIS_BENCH_BIN:-}" ]; then
  cargo build --release --locked -p semantis-dataplane >&2
fi
rm -rf "$data" "$data.log"
# A server left on this port would answer the readiness wait below and be measured
# instead of the one started here.
if curl -sf "$url/readyz" >/dev/null 2>&1; then
  echo "something already answers on $url: stop it first" >&2
  exit 1
fi
SEMANTIS_STORAGE__DATA_DIR="$data" SEMANTIS_CACHE__VERIFIER=local \
  taskset -c 0 "$bin" serve --config dataplane/examples/bench.toml 2>>"$data.log" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
until curl -sf "$url/readyz" >/dev/null; do
  kill -0 "$server" 2>/dev/null || { echo "server died; see $data.log" >&2; exit 1; }
  sleep 0.05
done
python3 - "$url" <<'EOF'
import json, sys, time, urllib.request
url = sys.argv[1]
system = ("You are a helpful assistant for Acme Corporation. Answer questions about our products, "
          "billing, shipping and returns politely and concisely. Always cite the relevant policy "
          "section when you can, never invent order numbers, and escalate to a human agent if the "
          "customer is angry or asks for a refund over the allowed amount. Our store ships to the "
          "United States, Canada and most of Europe. Business hours are Monday to Friday. Keep "
          "answers short and friendly, and use bullet points when listing steps. Do not discuss "
          "competitors or internal processes.\nUser: ")
scope = {"namespace": "preamble", "model": "bench"}
def call(path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer bench-key",
                                          "content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))
for q in ["How do I reset my password?", "How do I cancel my subscription?"]:
    call("/v1/entries", {"prompt": system + q, "scope": scope,
                         "response": {"choices": [{"message": {"content": q}}]}})
print("| lookup (after the system prompt) | hit | served | similarity | verifier score | verifier ms | lookup ms |")
print("|---|---|---|---|---|---|---|")
for q in ["How can I reset my password?", "What should I do to reset my password?",
          "How can I cancel my subscription?", "What is your refund policy?",
          "How do I change my shipping address?", "How do I reset my router?"]:
    started = time.time()
    v = call("/v1/lookup", {"prompt": system + q, "scope": scope})
    took = (time.time() - started) * 1000
    ver = v.get("verifier") or {}
    served = ((v.get("response") or {}).get("choices") or [{}])[0].get("message", {}).get("content")
    score = "%.2f" % ver["score"] if ver.get("score") is not None else "–"
    ms = "%.0f" % ver["elapsed_ms"] if ver.get("elapsed_ms") is not None else "–"
    print("| %s | %s | %s | %.3f | %s | %s | %.0f |" % (
        q, "yes" if v["hit"] else "no", served or "–", v["best_similarity"], score, ms, took))
EOF
