#!/usr/bin/env bash
# The official OpenAI Python SDK in a virtualenv outside the clone, for the gateway's tests and
# the README's walk-through. Keyed by the SDK's version; quick when already there. Prints the
# virtualenv's python.
set -euo pipefail
version="3.63.0"
venv="${SEMANTIS_CACHE:-$HOME/.cache/semantis}/sdk-venv-openai-$version"
if ! "$venv/bin/python" -c "import openai" >/dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai==$version" >&2
fi
echo "$venv/bin/python"
