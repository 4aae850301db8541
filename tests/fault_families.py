"""Test-only families, registered in any process that sets KERNELHUB_FAMILIES=fault_families
(with tests/ on the Python path): the tuner's worker processes and `kernelhub tune` subprocesses.

Both compute out = 2 * x on a tiny int32 vector, on the CPU for real (`tunes_on_cpu`):
- `test_faults`: the FAULT tunable picks how a config goes wrong (FAULTS names each value);
- `test_naps`: always right; a launch sleeps NAP_MS milliseconds, so configs differ in speed.
"""

import ctypes
import os
import time

from doubling import doubling_family
from kernelhub.registry import register
from kernelhub.space import SearchSpace

NONE, WRONG, RAISE, SEGFAULT, ABORT, HANG = range(6)
FAULTS = {NONE: "none", WRONG: "wrong", RAISE: "raise", SEGFAULT: "segfault", ABORT: "abort", HANG: "hang"}


def _faulty_launch(inputs, config, out):
    fault = config["FAULT"]
    if fault == SEGFAULT:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    elif fault == ABORT:
        os.abort()
    elif fault == HANG:
        time.sleep(3600)
    elif fault == RAISE:
        raise RuntimeError("injected launch failure")
    out.copy_(inputs["x"] * (3 if fault == WRONG else 2))
    return out


def _napping_launch(inputs, config, out):
    time.sleep(config["NAP_MS"] / 1000)
    out.copy_(inputs["x"] * 2)
    return out


FAULTY = register(doubling_family("test_faults", SearchSpace({"FAULT": tuple(FAULTS)}), {"FAULT": NONE},
                                   _faulty_launch))
NAPPING = register(doubling_family("test_naps", SearchSpace({"NAP_MS": (0, 2, 5, 10, 20)}), {"NAP_MS": 10},
                                    _napping_launch))
