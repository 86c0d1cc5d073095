#!/bin/sh
# Installs olmocr-serve (the directory $1, default /src) into the Python environment that already holds
# vLLM, without changing any package that environment has: every installed package is pinned as a
# constraint, so pip may add olmocr-serve's own dependencies but never up- or downgrade vLLM's (a
# conflict fails the build, loudly, instead of a broken vLLM at run time). The Dockerfile runs it;
# docs/kubernetes.md shows the same command for a venv.
set -eu
src=${1:-/src}
python=${PYTHON:-python3}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# name==version for every installed distribution (pip freeze would print URLs for some)
"$python" -m pip list --format=freeze --disable-pip-version-check > "$constraints"
"$python" -m pip install --no-cache-dir --disable-pip-version-check --constraint "$constraints" "$src"
# The entry point runs (imports the whole server half).
"$python" -m olmocr.vllm_server_manager --help > /dev/null
