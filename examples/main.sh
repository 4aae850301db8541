#!/usr/bin/env bash
# The README's main command. On a GPU machine: check every kernel, tune, show what was stored.
# Anywhere: compile every kernel's DEFAULTs for sm_80 and sm_90 and report what the compiler says.
# Without a GPU: check every kernel in the Triton interpreter, tune the families whose CPU path is
# real (the tensor-parallel collectives, on 2 local gloo processes), demonstrate the ops on the
# CPU path, show what is stored (the Triton kernels need a GPU to tune: interpreter timings are
# never recorded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install.sh
PYTHON=${PYTHON:-python3}

"$PYTHON" -m kernelhub gpus
"$PYTHON" -m kernelhub check
"$PYTHON" -m kernelhub compile --configs 0
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PYTHON" -m kernelhub tune --shapes tune --dtype int32 --dtype bfloat16 --trials "${KERNELHUB_TRIALS:-40}"
else
    "$PYTHON" -m kernelhub tune --gpu cpu --shapes tune --dtype float32 --trials "${KERNELHUB_TRIALS:-8}"
fi
"$PYTHON" examples/demo_ops.py
"$PYTHON" -m kernelhub show
