#!/usr/bin/env bash
# Run by tests/run.sh after the test suite: `kernelhub compile` (the DEFAULTs, sm_90) under
# Triton 3.6, the version the lent GPU machines carry (CI's own is newer). Triton 3.6 goes into a
# throwaway directory put first on PYTHONPATH, so the same torch and kernelhub run with the older
# compiler; compiling needs no GPU. Exit code: kernelhub compile's (non-zero when a DEFAULT fails
# to compile, exceeds the target's limits or spills).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TRITON_VERSION=3.6.0

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
echo "kernelhub compile under triton $TRITON_VERSION (sm_90, DEFAULTs)"
"$PYTHON" -m pip install --quiet --no-deps --target "$dir/site" "triton==$TRITON_VERSION"
PYTHONPATH="$dir/site${PYTHONPATH:+:$PYTHONPATH}" KERNELHUB_COMPILE_CACHE="$dir/compile-cache" \
    TRITON_CACHE_DIR="$dir/triton-cache" \
    "$PYTHON" -m kernelhub compile --target sm_90 --configs 0 --json "$dir/compile.json" > "$dir/table.txt"
"$PYTHON" - "$dir/compile.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
records = doc["records"]
print(f"triton {doc['triton_version']}: {len(records)} kernels, {sum(r['ok'] for r in records)} ok, "
      f"{sum(bool(r['spills']) for r in records)} spilling")
PY
