#!/usr/bin/env bash
# Create bench/.upstream-venv with upstream olmOCR 0.4.27 from PyPI, for side-by-side benchmarks.
#
# Upstream's base install (no extras) is all that `python -m olmocr.pipeline WS --server URL` needs:
# torch/vllm/transformers are only in its `gpu` extra and are never imported in --server mode.
# We still pin torch to 2.13.0 *if* something asks for it, so pip never pulls a multi-GB CUDA build.
# Upstream imports huggingface_hub and tqdm without declaring them; we add them.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${UPSTREAM_VENV:-$HERE/.upstream-venv}"
PY="${PYTHON:-python3}"
VERSION="${UPSTREAM_OLMOCR_VERSION:-0.4.27}"

if [ -x "$VENV/bin/python" ] && (cd / && "$VENV/bin/python" - "$VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
assert version("olmocr") == sys.argv[1]
import olmocr.pipeline  # noqa: F401
PYEOF
); then
    echo "upstream venv ready: $VENV (olmocr $VERSION)"
    exit 0
fi

echo "creating upstream venv at $VENV (olmocr $VERSION) ..."
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# A constraints file keeps any transitive torch to the local CPU wheel.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" > "$CONSTRAINTS"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" "olmocr==$VERSION" huggingface_hub tqdm
# Smoke check: the --server code path imports. Run from outside the checkout: the repository's own
# `olmocr/` package would otherwise shadow upstream's (cwd comes first on sys.path).
cd /
"$VENV/bin/python" -c "import olmocr.pipeline, olmocr.version; print('upstream olmocr', olmocr.version.VERSION)"
"$VENV/bin/python" -m olmocr.pipeline --help >/dev/null
echo "upstream venv ready: $VENV"
