"""Tensor-parallel overlap registration: `tp_gemm` (the Triton chunk GEMM, tuned per chunk shape
on a GPU) and the collectives `all_gather_gemm` and `gemm_reduce_scatter` (their chunking and
order, tuned on W local ranks; their CPU path is real, so they tune on a CPU machine too). The
collectives' inputs are small integers, so every path is exact against the reference wherever the
sums fit the dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from kernelhub import backend, checking
from kernelhub.kernels.tp_overlap import all_gather_space, gemm_space, overlap, reduce_scatter_space
from kernelhub.kernels.tp_overlap.kernel import gemm_triton
from kernelhub.reference import tp_overlap as ref
from kernelhub.registry import FamilySpec, register

# The schedules are part of the collectives' kernel.
_SCHEDULES = (Path(overlap.__file__),)

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


GEMM_SPEC = register(FamilySpec.from_space(
    gemm_space, name="tp_gemm",
    summary="the chunk GEMM of the tensor-parallel collectives: a [M, K] @ b [K, N], float32 accumulation",
    make_inputs=_gemm_inputs,
    reference=lambda inputs: ref.gemm(inputs["a"], inputs["b"]),
    launch=lambda inputs, config, out: gemm_triton(inputs["a"], inputs["b"], config=config, out=out),
    new_output=lambda inputs: inputs["a"].new_empty((inputs["a"].shape[0], inputs["b"].shape[1])),
    compare=_gemm_compare,
))


# -- the collectives ----------------------------------------------------------------------------

SMALL_INT = 2  # inputs are integers in [-SMALL_INT, SMALL_INT]


def _rank_inputs(shape, dtype: str, device, seed: int) -> dict:
    """This rank's `a [rows, inner]` and `b [inner, N]` of a (W, rows, N, inner) shape: small
    integers, different on every rank."""
    _, rows, n, inner = shape
    rank = dist.get_rank() if dist.is_initialized() else 0
    gen = torch.Generator(device=device).manual_seed(seed * 1009 + rank)
    dt = getattr(torch, dtype)
    draw = lambda *size: torch.randint(-SMALL_INT, SMALL_INT + 1, size, generator=gen, device=device).to(dt)  # noqa: E731
    return {"a": draw(rows, inner), "b": draw(inner, n)}


def _chunk_gemm(a: torch.Tensor) -> overlap.Gemm:
    """The chunk GEMM a call on `a` would run, so that check and tune launch what the ops launch:
    torch's on the CPU path (what `--gpu cpu` tunes), else the Triton kernel."""
    return overlap.chunk_gemm(GEMM_SPEC, a, backend.choose(a))


def _ag_launch(inputs, config, out):
    a, b = inputs["a"], inputs["b"]
    gathered = torch.empty((out.shape[0], a.shape[1]), dtype=a.dtype, device=a.device)
    overlap.all_gather_gemm(a, b, out, gathered, group=None, chunks=config["CHUNKS"], order=config["ORDER"],
                            gemm=_chunk_gemm(a))
    return out


def _rs_launch(inputs, config, out):
    overlap.gemm_reduce_scatter(inputs["a"], inputs["b"], out, group=None, chunks=config["CHUNKS"],
                                gemm=_chunk_gemm(inputs["a"]))
    return out


def _collective_compare(actual, expected, inputs) -> str | None:
    # Exact for small sums; beyond the dtype's integer range, one rounding of each partial and
    # of the result (the reference rounds its running sum at every rank, kernelhub once).
    eps = torch.finfo(expected.dtype).eps
    return checking.mismatch_close(actual, expected, rtol=2 * eps, atol_frac=dist.get_world_size() * eps)


def _register_collective(space, *, name: str, summary: str, reference, launch, output_rows) -> FamilySpec:
    """A collective's spec: small-integer inputs on every rank, its overlapped schedule as the
    launcher, `output_rows(a, world size)` rows of output; tuned on local ranks, on a CPU too."""
    return register(FamilySpec.from_space(
        space, name=name, summary=summary, make_inputs=_rank_inputs,
        reference=lambda inputs: reference(inputs["a"], inputs["b"]), launch=launch,
        new_output=lambda inputs: inputs["a"].new_empty((output_rows(inputs["a"], dist.get_world_size()),
                                                         inputs["b"].shape[1])),
        compare=_collective_compare, extra_sources=_SCHEDULES, tunes_on_cpu=True,
    ))


AG_SPEC = _register_collective(
    all_gather_space, name="all_gather_gemm",
    summary="all_gather(a) @ b with the gather overlapped with the GEMM (column-parallel layer)",
    reference=ref.all_gather_gemm, launch=_ag_launch, output_rows=lambda a, world: world * a.shape[0])
RS_SPEC = _register_collective(
    reduce_scatter_space, name="gemm_reduce_scatter",
    summary="rows of sum over ranks of a @ b, the reduce-scatter overlapped with the GEMM (row-parallel layer)",
    reference=ref.gemm_reduce_scatter, launch=_rs_launch, output_rows=lambda a, world: a.shape[0] // world)
