#!/usr/bin/env bash
# The README's test command: set up a fresh machine, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install.sh test
exec "${PYTHON:-python3}" -m pytest "$@"
