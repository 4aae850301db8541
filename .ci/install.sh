#!/usr/bin/env bash
# The one set-up step for a fresh machine that has only Python and pip.
# Usage: bash .ci/install.sh [EXTRA]   (EXTRA: "test" adds pytest, pytest-benchmark, hypothesis)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# A GPU machine brings its own CUDA build of torch. Without torch, take the CPU build: an
# unpinned `torch` would pull several GB of CUDA wheels onto a machine that cannot use them.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet torch==2.13.0
fi
"$PYTHON" -m pip install --quiet -e ".${1:+[$1]}"
