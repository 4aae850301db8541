"""What the contract suite and the family tests share: ids, the backend fixture, device limits,
local ranks for collectives, and the reference check of one config.

Import the fixtures into a test module to use them (`from helpers import backend  # noqa: F401`).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from kernelhub.checking import check_config  # noqa: E402
from kernelhub.compiler.targets import target  # noqa: E402
from kernelhub.local_world import LocalWorld, LocalWorldError  # noqa: E402
from kernelhub.tuning.collective import check_on_rank  # noqa: E402

# Where the Triton kernels run: the interpreter on CPU tensors unless a GPU runs them for real.
DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" or not torch.cuda.is_available() else "cuda"
# Shared memory per block of the smallest GPU kernelhub tunes for (sm_86 / sm_89: 99 KiB), and of an H100.
SMALLEST_SMEM_BYTES = target("sm_86").shared_per_block
H100_SMEM_BYTES = target("h100").shared_per_block
BACKENDS = ["cpu-auto", "triton", "reference"]


def dtype_id(dtype) -> str:
    """`torch.bfloat16` or `"bfloat16"` -> `"bfloat16"`."""
    return str(dtype).removeprefix("torch.")


def config_id(config: dict) -> str:
    """`{"BLOCK_M": 16, "num_warps": 4}` -> `"BLOCK_M16-num_warps4"`."""
    return "-".join(f"{name}{value}" for name, value in config.items())


def kernel_shape_id(kernel, shape) -> str:
    """A spec's (or fixed kernel's) shape as its database text: `"int8_gemm-M=1,N=63,K=96"`."""
    return f"{kernel.name}-{kernel.format_shape(shape)}"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each public op test once per KERNELHUB_BACKEND: the CPU path (`auto` on CPU tensors), the
    Triton kernels (in the interpreter without a GPU), the reference."""
    if request.param != "cpu-auto":
        monkeypatch.setenv("KERNELHUB_BACKEND", request.param)
    return request.param


@pytest.fixture(scope="module")
def local_worlds():
    """world_size -> a LocalWorld of gloo ranks, started on first use and kept for the module
    (starting ranks costs seconds), closed after it."""
    started: dict[int, LocalWorld] = {}

    def get(world_size: int) -> LocalWorld:
        if world_size not in started or not started[world_size].alive:
            started[world_size] = LocalWorld(world_size, job_timeout_s=300)
        return started[world_size]

    yield get
    for world in started.values():
        world.close(force=True)  # ranks keep nothing worth a graceful exit; saves seconds


def reference_problem(spec, shape, dtype: str, config: dict, *, seed: int, worlds=None) -> str | None:
    """None if `config` matches `spec`'s reference at `shape` on fresh inputs into a poisoned output
    (`kernelhub.checking.check_config`), else what is wrong. A collective runs on every rank of a
    local world from `worlds` (the `local_worlds` fixture)."""
    if spec.world_size is None:
        return check_config(spec, shape, dtype, config, device=DEVICE, seed=seed).problem
    try:
        problems = worlds(spec.world_size(shape)).run(check_on_rank, spec.name, shape, dtype, config, seed, "gloo")
    except LocalWorldError as exc:
        return str(exc)
    return "; ".join(f"rank {rank}: {p}" for rank, p in enumerate(problems) if p is not None) or None
