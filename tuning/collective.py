"""Checking every family (`check_families`: what `kernelhub check` runs), and checking and tuning
collective families (`FamilySpec.world_size`) on W local ranks.

A trial of a collective family runs on every rank of a `LocalWorld` (gloo on the CPU, one GPU per
rank with nccl): each rank checks the config against the reference and times it, and `measure`
makes every rank agree on the outcome (any rank's failure fails it; the slowest rank's time is
the time). One world per W is kept while healthy; a failed job (a raise, a dead rank, a timeout)
shuts that world down, and the next trial starts a fresh one. Ranks are separate processes, so a
crashing or hanging config never takes the tuner down.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernelhub.checking import check_config
from kernelhub.kernels.loader import get_family
from kernelhub.local_world import LocalWorld, LocalWorldError
from kernelhub.registry import FamilySpec, Shape
from kernelhub.space import Config
from kernelhub.tuning.trial import TrialOutcome, TrialRunner, measure


def rank_device(backend: str) -> torch.device:
    """The device a rank of a `backend` world computes on."""
    import torch.distributed as dist

    return torch.device("cuda", dist.get_rank()) if backend == "nccl" else torch.device("cpu")


def measure_on_rank(family: str, shape: Shape, dtype: str, config: Config, seed: int, backend: str) -> TrialOutcome:
    return measure(get_family(family), shape, dtype, config, device=rank_device(backend), seed=seed)


def check_on_rank(family: str, shape: Shape, dtype: str, config: Config, seed: int, backend: str) -> str | None:
    return check_config(get_family(family), shape, dtype, config, device=rank_device(backend), seed=seed).problem


def world_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def cannot_run_here(spec: FamilySpec, shape: Shape, device: torch.device) -> str | None:
    """Why this machine cannot run `shape`'s ranks (one GPU per rank), or None (CPU ranks: any number)."""
    if spec.world_size is None or device.type != "cuda":
        return None
    needed, available = spec.world_size(shape), torch.cuda.device_count()
    return f"needs {needed} GPUs, this machine has {available}" if needed > available else None


class LocalWorldRunner:
    """Runs trials of collective families on local ranks; other families go to `inner`."""

    def __init__(self, device: torch.device, inner: TrialRunner, *, trial_timeout_s: float = 600.0):
        self.device, self.inner, self.trial_timeout_s = device, inner, trial_timeout_s
        self.backend = world_backend(device)
        self._worlds: dict[int, LocalWorld] = {}

    def run(self, spec: FamilySpec, shape: Shape, dtype: str, config: Config, seed: int) -> TrialOutcome:
        if spec.world_size is None:
            return self.inner.run(spec, shape, dtype, config, seed)
        world_size = spec.world_size(shape)
        world = self._worlds.get(world_size)
        if world is None or not world.alive:
            world = self._worlds[world_size] = LocalWorld(
                world_size, backend=self.backend, group_timeout_s=self.trial_timeout_s / 2,
                job_timeout_s=self.trial_timeout_s)
        try:
            return world.run(measure_on_rank, spec.name, shape, dtype, config, seed, self.backend)[0]
        except LocalWorldError as exc:  # the world is shut down; the next trial starts another
            return TrialOutcome("error", str(exc))

    def close(self) -> None:
        for world in self._worlds.values():
            world.close()
        self._worlds.clear()
        self.inner.close()


class FamilyChecker:
    """`check_config` for one family: in this process, or on local ranks for a collective family."""

    def __init__(self, spec: FamilySpec, device: torch.device):
        self.spec, self.device = spec, device
        self.backend = world_backend(device)
        self._worlds: dict[int, LocalWorld] = {}

    def problem(self, shape: Shape, dtype: str, config: Config, *, seed: int) -> str | None:
        """None if `config` matches the reference on fresh inputs (on every rank), else what went wrong."""
        if self.spec.world_size is None:
            return check_config(self.spec, shape, dtype, config, device=self.device, seed=seed).problem
        world_size = self.spec.world_size(shape)
        world = self._worlds.get(world_size)
        if world is None or not world.alive:
            world = self._worlds[world_size] = LocalWorld(world_size, backend=self.backend)
        try:
            problems = world.run(check_on_rank, self.spec.name, shape, dtype, config, seed, self.backend)
        except LocalWorldError as exc:
            return str(exc)
        return "; ".join(f"rank {r}: {p}" for r, p in enumerate(problems) if p is not None) or None

    def close(self) -> None:
        for world in self._worlds.values():
            world.close()
        self._worlds.clear()

    def __enter__(self) -> "FamilyChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_families(specs: list[FamilySpec], device, *, samples: int, seed: int,
                   report: Callable[[str], None]) -> int:
    """`kernelhub check`: every family's DEFAULTs and `samples` sampled configs, on each smoke shape
    and dtype, against the reference on fresh inputs; returns the number of mismatches.

    `device` is the machine's DeviceIdentity; `report` gets one line per failure or skipped shape
    and one summary line per family.
    """
    failures = 0
    for spec in specs:
        runs = family_failures = 0
        with FamilyChecker(spec, device.torch_device) as checker:
            for shape in spec.shapes("smoke"):
                skip = cannot_run_here(spec, shape, device.torch_device)
                if skip:
                    report(f"  skip {spec.name} {spec.format_shape(shape)}: {skip}")
                    continue
                sampled = spec.space.sample(samples, shape, device.shared_memory_bytes, seed=seed)
                configs = list(spec.defaults) + [c for c in sampled if c not in spec.defaults]
                for dtype in spec.dtypes:
                    for i, config in enumerate(configs):
                        problem = checker.problem(shape, dtype, config, seed=seed + i)
                        runs += 1
                        if problem is not None:
                            family_failures += 1
                            report(f"  FAIL {spec.name} {spec.format_shape(shape)} {dtype} {config}: {problem}")
        report(f"{spec.name}: {runs} runs against the reference, "
               f"{f'{family_failures} mismatches' if family_failures else 'all match'}")
        failures += family_failures
    return failures
