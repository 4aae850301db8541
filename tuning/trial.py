"""One trial's measurement, and the runners that decide where it runs.

`measure` is the whole of a trial once its config passed the constraints: run the config on fresh
inputs into a poisoned output, compare with the reference (a wrong answer is a "mismatch", an
exception an "error"), then time it. A runner calls `measure` somewhere: `InProcessRunner` in the
tuner's own process; `kernelhub.tuning.isolation.IsolatedRunner` in a worker process that may
crash or hang without taking the tuner down ("crash", "timeout");
`kernelhub.tuning.collective.LocalWorldRunner` on every rank of a local process group for
collective families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kernelhub.checking import check_config
from kernelhub.registry import FamilySpec, Shape
from kernelhub.space import Config
from kernelhub.tuning.timing import Timing, time_collective, time_launch

# How a trial can fail, besides never being run ("constraint", decided by the tuner):
#   mismatch: the output differs from the reference;  error: compiling, launching or timing raised;
#   crash: the process running it died (signal or exit code);  timeout: no answer in time, killed.
FAILURE_STATES = ("mismatch", "error", "crash", "timeout")


@dataclass(frozen=True)
class TrialOutcome:
    state: str  # "complete" (correct, and timed), or one of FAILURE_STATES
    reason: str | None = None  # what went wrong, for a failure
    timing: Timing | None = None  # for "complete"


def measure(spec: FamilySpec, shape: Shape, dtype: str, config: Config, *, device: torch.device,
            seed: int) -> TrialOutcome:
    """Check `config` against the reference on fresh inputs, then time it.

    For a collective family this runs on every rank of the default process group, and every rank
    returns the same outcome: a failure on any rank fails the trial everywhere (with the first
    failing rank's state and reason), and the timing is the slowest rank's (the op is as slow as
    its slowest rank).
    """
    check = check_config(spec, shape, dtype, config, device=device, seed=seed)
    failure = None if check.ok else ("error" if check.raised else "mismatch", check.problem)
    collective = spec.world_size is not None
    if collective:
        failure = _first_failure_over_ranks(failure)
    if failure is not None:
        return TrialOutcome(*failure)
    inputs = spec.make_inputs(shape, dtype, device, seed)
    out = spec.new_output(inputs)
    run = lambda: spec.launch(inputs, config, out)  # noqa: E731
    if collective:
        return TrialOutcome("complete", timing=time_collective(run, device))
    try:
        return TrialOutcome("complete", timing=time_launch(run, device))
    except Exception as exc:  # passed the check but failed a later launch: still only this config's fault
        return TrialOutcome("error", f"while timing: {type(exc).__name__}: {exc}")


def _first_failure_over_ranks(failure: tuple[str, str] | None) -> tuple[str, str] | None:
    """Gather every rank's (state, reason), None where it passed; the first failing rank's, or None."""
    import torch.distributed as dist

    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    for rank, f in enumerate(failures):
        if f is not None:
            state, reason = f
            return state, f"rank {rank}: {reason}"
    return None


class TrialRunner(Protocol):
    def run(self, spec: FamilySpec, shape: Shape, dtype: str, config: Config, seed: int) -> TrialOutcome: ...

    def close(self) -> None: ...


class InProcessRunner:
    """Runs each trial in the tuner's own process, on `device` (a crash or hang takes the tuner with it)."""

    def __init__(self, device: torch.device):
        self.device = device

    def run(self, spec: FamilySpec, shape: Shape, dtype: str, config: Config, seed: int) -> TrialOutcome:
        return measure(spec, shape, dtype, config, device=self.device, seed=seed)

    def close(self) -> None:
        pass
