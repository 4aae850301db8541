"""Tensor-parallel overlap family (Flux): GEMM + AllGather and GEMM + ReduceScatter over torch.distributed.

Three specs: `tp_gemm` (the Triton chunk GEMM, tuned per chunk shape on a GPU), and the collectives
`all_gather_gemm` and `gemm_reduce_scatter` (their chunking and order, tuned on W local ranks;
their CPU path is real, so they tune on a CPU machine too). The collectives' inputs are small
integers, so every path is exact against the reference wherever the sums fit the dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from kernelhub import checking, configs, validation
from kernelhub.device import device_for_tensor
from kernelhub.kernels.tp_overlap import overlap, space
from kernelhub.kernels.tp_overlap.kernel import gemm_triton
from kernelhub.reference import tp_overlap as ref
from kernelhub.registry import FamilySpec, register

_HERE = Path(__file__).parent
_SOURCES = (_HERE / "kernel.py", _HERE / "space.py", _HERE / "overlap.py")

# -- tp_gemm ----------------------------------------------------------------------------------


def _gemm_inputs(shape, dtype: str, device, seed: int) -> dict:
    """Random normal `a [M, K]`, and `b [K, N]` as the transposed view of a weight [N, K]."""
    m, n, k = shape
    gen = checking.generator(device, seed)
    dt = getattr(torch, dtype)
    return {"a": torch.randn(m, k, dtype=dt, device=device, generator=gen),
            "b": torch.randn(n, k, dtype=dt, device=device, generator=gen).t()}


def _gemm_compare(actual, expected, inputs) -> str | None:
    # One rounding to the output dtype (two ulps: the interpreter truncates), plus float32
    # accumulation-order differences relative to the largest output.
    return checking.mismatch_close(actual, expected, rtol=2 * torch.finfo(expected.dtype).eps, atol_frac=1e-5)


GEMM_SPEC = register(FamilySpec(
    name="tp_gemm",
    summary="the chunk GEMM of the tensor-parallel collectives: a [M, K] @ b [K, N], float32 accumulation",
    shape_names=space.GEMM_SHAPE_NAMES,
    dtypes=space.DTYPES,
    space=space.GEMM_SPACE,
    default_config=space.gemm_default_config,
    defaults=space.GEMM_DEFAULTS,
    make_inputs=_gemm_inputs,
    reference=lambda inputs: ref.gemm(inputs["a"], inputs["b"]),
    launch=lambda inputs, config, out: gemm_triton(inputs["a"], inputs["b"], config=config, out=out),
    new_output=lambda inputs: inputs["a"].new_empty((inputs["a"].shape[0], inputs["b"].shape[1])),
    compare=_gemm_compare,
    shape_sets=space.GEMM_SHAPE_SETS,
    bucket=space.gemm_bucket,
    bucket_distance=space.gemm_bucket_distance,
    flops=space.gemm_flops,
    bytes_moved=space.gemm_bytes_moved,
    source_files=(_HERE / "kernel.py", _HERE / "space.py"),
))


def chunk_gemm(a: torch.Tensor):
    """gemm(x, b, out) for the chunks of a call on `a`'s device: torch's GEMM on the CPU path, else
    the Triton kernel with tp_gemm's best config for each chunk's shape."""
    from kernelhub import backend  # not at the top: kernelhub.backend imports kernelhub.kernels

    path = backend.choose(a.device)
    if path == "cpu":
        return lambda x, b, out: torch.matmul(x, b, out=out)
    dtype, identity = validation.dtype_name(a.dtype), device_for_tensor(a)

    def gemm(x, b, out):
        config = configs.best_config(GEMM_SPEC, (x.shape[0], b.shape[1], x.shape[1]), dtype, identity)
        return gemm_triton(x, b, config=config, out=out)
    return gemm


# -- the collectives ----------------------------------------------------------------------------

SMALL_INT = 2  # inputs are integers in [-SMALL_INT, SMALL_INT]


def _rank_inputs(rows: int, inner: int, n: int, dtype: str, device, seed: int) -> dict:
    """This rank's `a [rows, inner]` and `b [inner, n]`: small integers, different on every rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    gen = torch.Generator(device=device).manual_seed(seed * 1009 + rank)
    dt = getattr(torch, dtype)
    draw = lambda *size: torch.randint(-SMALL_INT, SMALL_INT + 1, size, generator=gen, device=device).to(dt)  # noqa: E731
    return {"a": draw(rows, inner), "b": draw(inner, n)}


def _ag_launch(inputs, config, out):
    a, b = inputs["a"], inputs["b"]
    gathered = torch.empty((out.shape[0], a.shape[1]), dtype=a.dtype, device=a.device)
    overlap.all_gather_gemm(a, b, out, gathered, group=None, chunks=config["CHUNKS"], order=config["ORDER"],
                            gemm=chunk_gemm(a))
    return out


def _rs_launch(inputs, config, out):
    overlap.gemm_reduce_scatter(inputs["a"], inputs["b"], out, group=None, chunks=config["CHUNKS"],
                                gemm=chunk_gemm(inputs["a"]))
    return out


def _collective_compare(actual, expected, inputs) -> str | None:
    # Exact for small sums; beyond the dtype's integer range, one rounding of each partial and
    # of the result (the reference rounds its running sum at every rank, kernelhub once).
    eps = torch.finfo(expected.dtype).eps
    return checking.mismatch_close(actual, expected, rtol=2 * eps, atol_frac=dist.get_world_size() * eps)


AG_SPEC = register(FamilySpec(
    name="all_gather_gemm",
    summary="all_gather(a) @ b with the gather overlapped with the GEMM (column-parallel layer)",
    shape_names=space.SHAPE_NAMES_AG,
    dtypes=space.DTYPES,
    space=space.AG_SPACE,
    default_config=space.ag_default_config,
    defaults=space.AG_DEFAULTS,
    make_inputs=lambda shape, dtype, device, seed: _rank_inputs(shape[1], shape[3], shape[2], dtype, device, seed),
    reference=lambda inputs: ref.all_gather_gemm(inputs["a"], inputs["b"]),
    launch=_ag_launch,
    new_output=lambda inputs: inputs["a"].new_empty((dist.get_world_size() * inputs["a"].shape[0],
                                                     inputs["b"].shape[1])),
    compare=_collective_compare,
    shape_sets=space.AG_SHAPE_SETS,
    bucket=space.collective_bucket,
    bucket_distance=space.collective_bucket_distance,
    flops=space.ag_flops,
    bytes_moved=space.ag_bytes_moved,
    source_files=_SOURCES,
    world_size=space.world_size,
    tunes_on_cpu=True,
))

RS_SPEC = register(FamilySpec(
    name="gemm_reduce_scatter",
    summary="rows of sum over ranks of a @ b, the reduce-scatter overlapped with the GEMM (row-parallel layer)",
    shape_names=space.SHAPE_NAMES_RS,
    dtypes=space.DTYPES,
    space=space.RS_SPACE,
    default_config=space.rs_default_config,
    defaults=space.RS_DEFAULTS,
    make_inputs=lambda shape, dtype, device, seed: _rank_inputs(shape[1], shape[3], shape[2], dtype, device, seed),
    reference=lambda inputs: ref.gemm_reduce_scatter(inputs["a"], inputs["b"]),
    launch=_rs_launch,
    new_output=lambda inputs: inputs["a"].new_empty((inputs["a"].shape[0] // dist.get_world_size(),
                                                     inputs["b"].shape[1])),
    compare=_collective_compare,
    shape_sets=space.RS_SHAPE_SETS,
    bucket=space.collective_bucket,
    bucket_distance=space.collective_bucket_distance,
    flops=space.rs_flops,
    bytes_moved=space.rs_bytes_moved,
    source_files=_SOURCES,
    world_size=space.world_size,
    tunes_on_cpu=True,
))
