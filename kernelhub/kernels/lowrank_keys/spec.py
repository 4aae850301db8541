"""Low-rank key cache registration: the Gram kernel of `lowrank_keys` (`lowrank_gram`) and the fused
gather + reconstruct + RoPE of `reconstruct_keys` (two tuned kernels, two registered specs), and the
untuned projection of `lowrank_keys` (`lowrank_project`).

Tolerances (`compare`), derived for float32 accumulation; u = 2**-24, float32's unit roundoff.

lowrank_gram. Entry (i, j) of G is a sum of S products K_si K_sj, and
Σ_s |K_si K_sj| <= sqrt(G_ii G_jj) <= max|G| (Cauchy-Schwarz), so every entry's rounding error is
measured against max|G|. Products of 16-bit keys are exact in float32. The worst summation is a
tensor core's: it adds >= 16 products per instruction into the float32 accumulator and may
truncate rather than round, up to 2u of the running sum per instruction, all of one sign; over
S / 16 instructions whose running sums grow to max|G| that is at most about (S / 16) * u * max|G|.
float32 keys (ieee FMA chains) round to nearest: their errors are unbiased and grow like
sqrt(S) * u, far inside that. Hence atol = u * (S / 8 + 32) * max|G|: a factor 2 of headroom,
plus a constant for short sums and the reference's own rounding of its float64 sum to float32.

reconstruct_keys. Each value x = Σ_j a_j B_jd is a float32 sum of r terms, so
|error| <= 2 r u M, M = max over outputs of Σ_j |a_j B_jd| (rounding to nearest or truncating per
instruction alike); RoPE mixes two such values with |cos| + |sin| <= sqrt(2) and rounds twice more.
Hence atol = 2 (r + 2) u M, computed from the inputs, and rtol = 2 eps(dtype) for the final
rounding to a.dtype, which may land one unit in the last place from the reference's.
"""

from __future__ import annotations

import torch

from kernelhub import checking
from kernelhub.kernels.lowrank_keys import gram_space, reconstruct_space
from kernelhub.kernels.lowrank_keys.kernel import gram_triton, project_triton, reconstruct_keys_triton
from kernelhub.reference import lowrank_keys as ref
from kernelhub.reference.rope import rope_tables
from kernelhub.registry import FamilySpec, FixedKernel, register, register_fixed

_UNIT_ROUNDOFF = 2.0**-24


# ------------------------------------------------------------------------------------------------
# lowrank_gram
# ------------------------------------------------------------------------------------------------

def make_gram_inputs(shape, dtype: str, device, seed: int) -> dict:
    """Keys `k [B, H_kv, S, D]` of `dtype`: unit Gaussians around a per-channel mean (real keys
    carry large channel offsets, so the Gram's entries are long sums of same-sign products)."""
    batch, heads, seq, head_dim = shape
    gen = checking.generator(device, seed)
    mean = 2.0 * torch.randn(1, heads, 1, head_dim, generator=gen, device=device)
    k = torch.randn(batch, heads, seq, head_dim, generator=gen, device=device) + mean
    return {"k": k.to(getattr(torch, dtype))}


def gram_reference(inputs: dict) -> torch.Tensor:
    return ref.gram(inputs["k"])


def launch_gram(inputs: dict, config: dict, out: torch.Tensor) -> torch.Tensor:
    return gram_triton(inputs["k"], config=config, out=out)


def new_gram_output(inputs: dict) -> torch.Tensor:
    batch, heads, _, head_dim = inputs["k"].shape
    hd = heads * head_dim
    return torch.empty(batch, hd, hd, dtype=torch.float32, device=inputs["k"].device)


def gram_atol_frac(seq: int) -> float:
    """Allowed error of G relative to max|G| for a sum over `seq` tokens (module docstring)."""
    return _UNIT_ROUNDOFF * (seq / 8 + 32)


def compare_gram(actual: torch.Tensor, expected: torch.Tensor, inputs: dict) -> str | None:
    return checking.mismatch_close(actual, expected, rtol=0.0, atol_frac=gram_atol_frac(inputs["k"].shape[2]))


GRAM_SPEC = register(FamilySpec.from_space(
    gram_space, name="lowrank_gram",
    summary="Gram matrix K^T K of the merged pre-RoPE keys (ShadowKV low-rank key cache), float32",
    make_inputs=make_gram_inputs, reference=gram_reference, launch=launch_gram, new_output=new_gram_output,
    compare=compare_gram,
))


# ------------------------------------------------------------------------------------------------
# reconstruct_keys
# ------------------------------------------------------------------------------------------------

def make_reconstruct_inputs(shape, dtype: str, device, seed: int) -> dict:
    """Factors as `lowrank_keys` returns them: `basis [B, rank, H_kv * D]` with orthonormal rows
    (when rank <= H_kv * D),
    `a [B, S, rank]` with decaying column scales; `positions` int64 `[B, H_kv, n]` drawn with
    repeats from [0, S); float32 RoPE tables for S positions."""
    batch, seq, heads, n, head_dim, rank = shape
    torch_dtype = getattr(torch, dtype)
    gen = checking.generator(device, seed)
    on = dict(generator=gen, device=device)
    hd = heads * head_dim
    if rank <= hd:
        basis = torch.linalg.qr(torch.randn(batch, hd, rank, **on))[0].transpose(1, 2)  # orthonormal rows
    else:  # more rows than columns cannot be orthonormal; the kernel does not care
        basis = torch.randn(batch, rank, hd, **on) / hd**0.5
    scales = 20.0 / torch.sqrt(1.0 + torch.arange(rank, device=device, dtype=torch.float32))
    a = torch.randn(batch, seq, rank, **on) * scales
    cos, sin = rope_tables(seq, head_dim, device=device)
    return {
        "a": a.to(torch_dtype),
        "basis": basis.to(torch_dtype),
        "positions": torch.randint(0, seq, (batch, heads, n), **on),
        "cos": cos,
        "sin": sin,
    }


def reconstruct_reference(inputs: dict) -> torch.Tensor:
    return ref.reconstruct_keys(inputs["a"], inputs["basis"], inputs["positions"], inputs["cos"], inputs["sin"],
                                inputs.get("rope_positions"))


def launch_reconstruct(inputs: dict, config: dict, out: torch.Tensor) -> torch.Tensor:
    return reconstruct_keys_triton(inputs["a"], inputs["basis"], inputs["positions"], inputs["cos"], inputs["sin"],
                                   config=config, out=out, rope_positions=inputs.get("rope_positions"))


def new_reconstruct_output(inputs: dict) -> torch.Tensor:
    batch, heads, n = inputs["positions"].shape
    head_dim = inputs["basis"].shape[2] // heads
    return torch.empty(batch, heads, n, head_dim, dtype=inputs["a"].dtype, device=inputs["a"].device)


def reconstruct_abs_bound(inputs: dict) -> float:
    """M = max over outputs of Σ_j |a[b, p, j]| |basis[b, j, h * D + d]|, in float64."""
    identity = torch.ones_like(inputs["cos"]), torch.zeros_like(inputs["sin"])  # cos = 1, sin = 0
    x = ref.reconstruct_keys(inputs["a"].double().abs(), inputs["basis"].double().abs(), inputs["positions"],
                             *identity, inputs.get("rope_positions"))
    return float(x.max()) if x.numel() else 0.0


def compare_reconstruct(actual: torch.Tensor, expected: torch.Tensor, inputs: dict) -> str | None:
    rank = inputs["a"].shape[2]
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    atol = 2 * (rank + 2) * _UNIT_ROUNDOFF * reconstruct_abs_bound(inputs)
    atol_frac = atol / scale if scale > 0 else 0.0
    rtol = 2 * torch.finfo(expected.dtype).eps
    return checking.mismatch_close(actual, expected, rtol=rtol, atol_frac=atol_frac)


RECONSTRUCT_SPEC = register(FamilySpec.from_space(
    reconstruct_space, name="reconstruct_keys",
    summary="post-RoPE keys of chosen tokens from the low-rank factors: gather + GEMM + RoPE, fused",
    make_inputs=make_reconstruct_inputs, reference=reconstruct_reference, launch=launch_reconstruct,
    new_output=new_reconstruct_output, compare=compare_reconstruct,
))


# ------------------------------------------------------------------------------------------------
# the projection a = K @ basis^T of lowrank_keys: untuned (gram_space.PROJECT_CONFIG)
# ------------------------------------------------------------------------------------------------

def _project_inputs(shape, dtype: str, device, seed: int) -> dict:
    """Keys `k [B, H_kv, S, D]` and a `basis [B, rank, H_kv * D]` with orthonormal-scale rows."""
    batch, heads, seq, head_dim, rank = shape
    gen = checking.generator(device, seed)
    dt = getattr(torch, dtype)
    return {"k": torch.randn(batch, heads, seq, head_dim, generator=gen, device=device).to(dt),
            "basis": (torch.randn(batch, rank, heads * head_dim, generator=gen, device=device)
                      / (heads * head_dim) ** 0.5).to(dt)}


def _project(inputs: dict) -> torch.Tensor:
    k, basis = inputs["k"], inputs["basis"]
    out = torch.empty(k.shape[0], k.shape[2], basis.shape[1], dtype=k.dtype, device=k.device)
    return project_triton(k, basis, config=gram_space.PROJECT_CONFIG, out=out)


PROJECT = register_fixed(FixedKernel(
    name="lowrank_project",
    summary="the projection a = K @ basis^T of lowrank_keys (float32 accumulation), one fixed tiling",
    shape_names=gram_space.PROJECT_SHAPE_NAMES,
    dtypes=gram_space.DTYPES,
    shape_sets=gram_space.PROJECT_SHAPE_SETS,
    make_inputs=_project_inputs,
    launch=_project,
    config=lambda shape: dict(gram_space.PROJECT_CONFIG),
    shared_memory=gram_space.project_shared_memory,
))
