"""The family contract: what a family declares (`FamilySpec`, `FixedKernel`) and `register`.

Every tunable kernel registers one `FamilySpec` (a family folder under `kernelhub/kernels/`
registers one spec per kernel it tunes, usually one) from its `spec.py`; the CLI, `kernelhub check`,
the tuner, the tests and the benchmarks all iterate the registered specs, which
`kernelhub.kernels.loader` loads (built-in families and `KERNELHUB_FAMILIES`). Adding a family
means adding a folder under `kernelhub/kernels/`, a module under `reference/`, and its
`register(...)` call. This module imports no family: the core (configs, the database, the
compiler) takes a spec, or a lookup function, from its caller.

Vocabulary:
- shape: a tuple of ints named by `shape_names`, e.g. (M, N, K) for a GEMM.
- dtype: the family's dtype axis of the database key, as a torch dtype name ("bfloat16").
- bucket: the shape a tuned config is stored under; nearby shapes share one bucket.
- inputs: a dict of tensors from `make_inputs`, passed whole to `reference` and `launch`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from kernelhub.errors import KernelhubError
from kernelhub.space import Config, SearchSpace

Shape = tuple[int, ...]
Inputs = dict[str, Any]  # tensors, plus plain values such as an output dtype

SHAPE_SETS = ("smoke", "tune", "bench")
# The toolbox every family's kernels and spaces are built from: part of every kernel version.
TOOLBOX = Path(__file__).parent / "kernels" / "common"
# A shared-memory estimate (kernels/common/shared_memory.py's `SharedMemory`) of a launch config at a shape.
SharedMemoryEstimate = Callable[[Config, Shape], Any]


class _Shapes:
    """Shape text and shape sets, for the kernel descriptions below (they have `name`,
    `shape_names` and `shape_sets`)."""

    def format_shape(self, shape: Sequence[int]) -> str:
        """`(1, 4096, 4096)` -> `"M=1,N=4096,K=4096"` (also the database's bucket text)."""
        return ",".join(f"{n}={v}" for n, v in zip(self.shape_names, shape, strict=True))

    def parse_shape(self, text: str) -> Shape:
        """Inverse of `format_shape`; raises ValueError on anything else."""
        parts = [p.split("=", 1) for p in text.split(",")]
        if [p[0] for p in parts] != list(self.shape_names) or any(len(p) != 2 for p in parts):
            raise ValueError(f"{text!r} is not a {self.name} shape of the form "
                             + ",".join(f"{n}=<int>" for n in self.shape_names))
        return tuple(int(p[1]) for p in parts)

    def shapes(self, shape_set: str) -> Sequence[Shape]:
        if shape_set not in self.shape_sets:
            raise KernelhubError(f"unknown shape set {shape_set!r} for {self.name}; "
                                 f"expected one of {sorted(self.shape_sets)}")
        return self.shape_sets[shape_set]


@dataclass(frozen=True)
class FamilySpec(_Shapes):
    name: str
    summary: str
    shape_names: tuple[str, ...]
    dtypes: tuple[str, ...]
    space: SearchSpace
    # default_config(shape, dtype): the fallback when nothing is tuned; must handle any shape.
    default_config: Callable[[Shape, str], Config]
    # Every distinct DEFAULT (checked by `kernelhub check`, enqueued first by the tuner).
    defaults: tuple[Config, ...]
    # make_inputs(shape, dtype, device, seed) -> inputs; fresh random data for each seed.
    make_inputs: Callable[[Shape, str, torch.device | str, int], Inputs]
    # The specification: pure PyTorch, readable, slow is fine.
    reference: Callable[[Inputs], torch.Tensor]
    # The Triton launcher: launch(inputs, config, out) writes into `out` and returns it.
    launch: Callable[[Inputs, Config, torch.Tensor], torch.Tensor]
    # An uninitialised output for these inputs (tests and checks poison it before launch).
    new_output: Callable[[Inputs], torch.Tensor]
    # compare(actual, expected, inputs) -> None if within the family's tolerance, else where it
    # failed. `inputs` lets a family judge by meaning (e.g. top-k by the scores it selected).
    compare: Callable[[torch.Tensor, torch.Tensor, Inputs], "str | None"]
    # "smoke" (tests, check), "tune" (tuner), "bench" (benchmarks): real model shapes.
    shape_sets: Mapping[str, Sequence[Shape]]
    bucket: Callable[[Shape], Shape]
    # Distance between two buckets for the nearest-bucket lookup; None = too far to reuse.
    bucket_distance: Callable[[Shape, Shape], "float | None"]
    flops: Callable[[Shape], int]
    bytes_moved: Callable[[Shape, str], int]
    # Files whose text, with the toolbox (TOOLBOX) and the search space, defines the kernel version.
    source_files: tuple[Path, ...]
    # Collective families: how many ranks one run of `shape` takes. `make_inputs`, `reference`
    # and `launch` then run on every rank of an initialised torch.distributed group, and
    # `kernelhub check` / `tune` start that many local processes (`kernelhub.local_world`).
    world_size: Callable[[Shape], int] | None = None
    # True when the family's CPU path is what its config controls (not the Triton interpreter),
    # so `kernelhub tune --gpu cpu` times it for real and stores the winner under the `cpu` key.
    tunes_on_cpu: bool = False
    # shared_memory(config, shape) -> SharedMemory: the estimate behind the shared-memory
    # constraint, which tests/test_compile_agreement.py holds against the compiler (None: the
    # kernel uses none to speak of).
    shared_memory: SharedMemoryEstimate | None = None

    @classmethod
    def from_space(cls, space: ModuleType, *, name: str, summary: str,
                   make_inputs: Callable[[Shape, str, torch.device | str, int], Inputs],
                   reference: Callable[[Inputs], torch.Tensor],
                   launch: Callable[[Inputs, Config, torch.Tensor], torch.Tensor],
                   new_output: Callable[[Inputs], torch.Tensor],
                   compare: Callable[[torch.Tensor, torch.Tensor, Inputs], "str | None"],
                   extra_sources: Sequence[Path] = (), tunes_on_cpu: bool = False) -> "FamilySpec":
        """The spec of the kernel that `space` declares, given what only the registration knows.

        `space` is a family's space module, read by standard names: SHAPE_NAMES, DTYPES, SPACE,
        DEFAULTS, default_config, SHAPE_SETS, bucket, bucket_distance, flops, bytes_moved, and if
        it has them shared_memory and world_size. The kernel version covers the family folder's
        kernel.py, the space module and the space.py beside it (what a family's spaces share),
        `extra_sources`, and the toolbox.
        """
        folder = Path(space.__file__).parent
        sources = dict.fromkeys(p for p in (folder / "kernel.py", folder / "space.py", Path(space.__file__),
                                            *extra_sources) if p.exists())
        return cls(
            name=name, summary=summary, shape_names=space.SHAPE_NAMES, dtypes=space.DTYPES, space=space.SPACE,
            default_config=space.default_config, defaults=space.DEFAULTS, make_inputs=make_inputs,
            reference=reference, launch=launch, new_output=new_output, compare=compare,
            shape_sets=space.SHAPE_SETS, bucket=space.bucket, bucket_distance=space.bucket_distance,
            flops=space.flops, bytes_moved=space.bytes_moved, source_files=tuple(sources),
            world_size=getattr(space, "world_size", None), tunes_on_cpu=tunes_on_cpu,
            shared_memory=getattr(space, "shared_memory", None),
        )

    @functools.cached_property
    def kernel_version(self) -> str:
        """Digest of the kernel sources, the toolbox and the search space: tuned rows of another
        version are stale."""
        digest = hashlib.sha256(self.space.fingerprint().encode())
        for path in (*self.source_files, *sorted(TOOLBOX.glob("*.py"))):
            digest.update(Path(path).read_bytes())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class FixedKernel(_Shapes):
    """A shipped Triton kernel that is not tuned: its launch config follows from the shape (the
    quantize kernel, the projection of `lowrank_keys`). `kernelhub compile` builds it at its
    shape sets like a family's kernels; its tests check it against the reference."""

    name: str  # the op it implements, e.g. "quantize_int8"
    summary: str
    shape_names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shape_sets: Mapping[str, Sequence[Shape]]
    # make_inputs(shape, dtype, device, seed) -> inputs, as a family's (meta tensors included).
    make_inputs: Callable[[Shape, str, torch.device | str, int], Inputs]
    # launch(inputs): the host wrapper with fresh outputs and its own config.
    launch: Callable[[Inputs], object]
    # The launch config a shape gets (what reports show).
    config: Callable[[Shape], Config]
    # shared_memory(config, shape) -> SharedMemory, as a family's (None: none to speak of).
    shared_memory: SharedMemoryEstimate | None = None


# What the families have registered, by name, in registration order (`kernelhub.kernels.loader`
# reads them after importing the families).
_FAMILIES: dict[str, FamilySpec] = {}
_FIXED: dict[str, FixedKernel] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add `spec` to the registry (a family's spec.py calls it on import) and return it; a second
    spec of the same name, missing shape sets or an invalid DEFAULT is a KernelhubError."""
    if spec.name in _FAMILIES and _FAMILIES[spec.name] is not spec:
        raise KernelhubError(f"kernel family {spec.name!r} is registered twice")
    missing = set(SHAPE_SETS) - set(spec.shape_sets)
    if missing:
        raise KernelhubError(f"family {spec.name!r} lacks shape sets {sorted(missing)}")
    for config in spec.defaults:
        spec.space.validate(config, source=f"{spec.name} DEFAULT")
    _FAMILIES[spec.name] = spec
    return spec


def register_fixed(kernel: FixedKernel) -> FixedKernel:
    """Add an untuned kernel to the registry (from its family's spec.py) and return it."""
    if kernel.name in _FIXED and _FIXED[kernel.name] is not kernel:
        raise KernelhubError(f"fixed kernel {kernel.name!r} is registered twice")
    _FIXED[kernel.name] = kernel
    return kernel
