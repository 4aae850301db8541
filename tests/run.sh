#!/usr/bin/env bash
# The README's test command: set up a fresh machine, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install.sh test
# A throwaway PostgreSQL server for the tests that share one database between tuner processes;
# it stops when this script exits (an EXIT trap, so pytest is not exec'd).
source .ci/postgres.sh
"${PYTHON:-python3}" -m pytest "$@"
# The whole run (no pytest arguments) also compiles the DEFAULTs under the older Triton the GPU
# machines carry, in a throwaway directory.
if [ $# -eq 0 ]; then
    bash .ci/triton36.sh
fi
