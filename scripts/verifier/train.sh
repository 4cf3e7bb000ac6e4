#!/usr/bin/env bash
# Reproduce dataplane/verifier/semantis-verifier.safetensors: train the local verifier on the
# QQP dev subset (CPU only), calibrate its thresholds on pairs kept out of training, and
# preview it on the held-out pairs. Writes the file and training.json next to it.
#
#   bash scripts/verifier/train.sh [../shared/data/qqp-dev.jsonl.gz]
#
# PyTorch and friends go into a virtualenv under ~/.cache/semantis/ (several GB, once).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
data="${1:-$root/../shared/data/qqp-dev.jsonl.gz}"
out="$root/dataplane/verifier"
venv="${SEMANTIS_CACHE:-$HOME/.cache/semantis}/train-venv"
model_dir="$("$root/scripts/fetch-model.sh")"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  'torch==2.15.0' 'numpy==2.4.6' 'safetensors==0.8.0' 'tokenizers==0.23.3'

mkdir -p "$out"
"$venv/bin/python" "$here/train.py" --data "$data" --model-dir "$model_dir" \
  --out "$out/semantis-verifier.safetensors" --report "$out/training.json" "${@:2}"
"$venv/bin/python" "$here/calibrate.py" --data "$data" --model-dir "$model_dir" \
  --verifier "$out/semantis-verifier.safetensors" --report "$out/training.json"
"$venv/bin/python" "$here/calibrate.py" --data "$data" --model-dir "$model_dir" \
  --verifier "$out/semantis-verifier.safetensors" --pairs held-out
# Serve the new file from the model directory too.
"$root/scripts/fetch-model.sh" >/dev/null
