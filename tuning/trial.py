"""One trial's measurement, and the runners that decide where it runs.

`measure` is the whole of a trial once its config passed the constraints: run the config on fresh
inputs into a poisoned output, compare with the reference (a wrong or crashing config is FAILED),
then time it. A runner calls `measure` somewhere: `InProcessRunner` in the tuner's own process;
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


@dataclass(frozen=True)
class TrialOutcome:
    state: str  # "complete", or "failed" (wrong answer, or could not launch)
    reason: str | None = None
    timing: Timing | None = None


def measure(spec: FamilySpec, shape: Shape, dtype: str, config: Config, *, device: torch.device,
            seed: int) -> TrialOutcome:
    """Check `config` against the reference on fresh inputs, then time it.

    For a collective family this runs on every rank of the default process group, and every rank
    returns the same outcome: a failure on any rank fails the trial everywhere, and the timing is
    the slowest rank's (the op is as slow as its slowest rank).
    """
    problem = check_config(spec, shape, dtype, config, device=device, seed=seed).problem
    collective = spec.world_size is not None
    if collective:
        problem = _first_problem_over_ranks(problem)
    if problem is not None:
        return TrialOutcome("failed", problem)
    inputs = spec.make_inputs(shape, dtype, device, seed)
    out = spec.new_output(inputs)
    run = lambda: spec.launch(inputs, config, out)  # noqa: E731
    timing = time_collective(run, device) if collective else time_launch(run, device)
    return TrialOutcome("complete", timing=timing)


def _first_problem_over_ranks(problem: str | None) -> str | None:
    import torch.distributed as dist

    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    for rank, p in enumerate(problems):
        if p is not None:
            return f"rank {rank}: {p}"
    return None


class TrialRunner(Protocol):
    def run(self, spec: FamilySpec, shape: Shape, dtype: str, config: Config, seed: int) -> TrialOutcome: ...

    def close(self) -> None: ...


class InProcessRunner:
    """Runs each trial in the tuner's own process, on `device`."""

    def __init__(self, device: torch.device):
        self.device = device

    def run(self, spec: FamilySpec, shape: Shape, dtype: str, config: Config, seed: int) -> TrialOutcome:
        return measure(spec, shape, dtype, config, device=self.device, seed=seed)

    def close(self) -> None:
        pass
