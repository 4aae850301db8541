"""`lowrank_gram`, the Gram matrix G_b = K_b^T K_b of the merged keys: search space, DEFAULTs,
shape sets, buckets; and the untuned projection a_b = K_b @ V_r that follows it in `lowrank_keys`.

Shapes are (B, H_kv, S, D), the shape of `k`. H_kv and D are fixed by the model; B and S vary per
prefill, so the database buckets B and S to powers of two and keeps H_kv and D exact (space.py
has the nearest-bucket rule and what the estimates assume).

The projection is not tuned (a fixed kernel, not a spec): it uses `PROJECT_CONFIG`, a plain GEMM
tiling that fits every GPU, at shapes (B, H_kv, S, D, rank).
"""

from __future__ import annotations

from collections.abc import Mapping

from kernelhub.kernels.common.buckets import doubling_distance, pow2_bucket
from kernelhub.kernels.common.constraints import blocks_fit_problem, registers_fit, splits_have_work
from kernelhub.kernels.common.shared_memory import SharedMemory, fits, gemm_tiles
from kernelhub.kernels.common.sizes import element_bytes
from kernelhub.kernels.lowrank_keys.space import (CONTEXTS, DTYPES, GLM4_9B, LLAMA3_8B, MAX_DOUBLINGS,  # noqa: F401
                                                  OPERAND_BYTES, SHADOWKV_RANK, YI_9B)
from kernelhub.space import SearchSpace

SHAPE_NAMES = ("B", "H_kv", "S", "D")

PARAMS = {
    "BLOCK_HD": (16, 32, 64, 128),  # square output tiles: G is symmetric, only tiles on or above the diagonal run
    "BLOCK_S": (16, 32, 64, 128),  # reduction step over tokens
    "SPLIT_S": (1, 2, 4, 8, 16, 32),  # programs sharing one output tile's reduction over S
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4),
}

LONG_S = 4096  # above this many tokens the split-S DEFAULT applies


def shared_memory(config: Mapping[str, int], shape: tuple[int, ...] | None = None) -> SharedMemory:
    """Shared memory per block of `gram_kernel` at any shape (kernels/common/shared_memory.py's
    model): a stage holds the tiles K[s, cols_m]^T and K[s, cols_n], [BLOCK_HD, BLOCK_S] each; the
    epilogue converts the float32 [BLOCK_HD, BLOCK_HD] accumulator for its two (mirrored) stores.
    Measured (Triton 3.9, BLOCK_HD 128, BLOCK_S 32, 3 stages, 8 warps, bfloat16): 66560 B on sm_90,
    65536 B on sm_80, both the epilogue's 64 KiB (+ 1 KiB static on sm_90)."""
    return gemm_tiles(config["BLOCK_HD"], config["BLOCK_HD"], config["BLOCK_S"], num_stages=config["num_stages"],
                      num_warps=config["num_warps"], operand_bytes=OPERAND_BYTES)


def _fits_shared_memory(config, shape, smem_bytes):
    return fits(shared_memory(config, shape), smem_bytes)


SPACE = SearchSpace(
    params=PARAMS,
    constraints=(_fits_shared_memory,
                 registers_fit("float32 accumulator", lambda config, shape: config["BLOCK_HD"] ** 2),
                 blocks_fit_problem(PARAMS, lambda shape: {"BLOCK_HD": shape[1] * shape[3], "BLOCK_S": shape[2]}),
                 splits_have_work("SPLIT_S", "BLOCK_S", axis=2, axis_name="S")),
)

DEFAULT_SHORT = {"BLOCK_HD": 64, "BLOCK_S": 32, "SPLIT_S": 1, "num_warps": 4, "num_stages": 2}
# 36 upper tiles of a 1024-wide G per sequence are too few programs for a GPU: split S eight ways.
DEFAULT_LONG = {"BLOCK_HD": 128, "BLOCK_S": 32, "SPLIT_S": 8, "num_warps": 8, "num_stages": 3}
# float32 keys multiply on FMA units, whose dot holds operand fragments in registers: with
# BLOCK_S 32 that is 255 registers and 312 B of spills per thread on sm_80; 16 keeps it at 192.
DEFAULT_LONG_FP32 = dict(DEFAULT_LONG, BLOCK_S=16)
DEFAULTS = (DEFAULT_SHORT, DEFAULT_LONG, DEFAULT_LONG_FP32)


def default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    """The untuned fallback: correct for any shape (extra splits just add zero partials); no
    spills on sm_80 or sm_90 in any dtype (`kernelhub compile`)."""
    if shape[2] <= LONG_S:
        return dict(DEFAULT_SHORT)
    return dict(DEFAULT_LONG_FP32 if dtype == "float32" else DEFAULT_LONG)


def bucket(shape: tuple[int, ...]) -> tuple[int, ...]:
    """B and S rounded up to powers of two; H_kv and D exact."""
    return pow2_bucket(shape, axes=(0, 2))


def bucket_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float | None:
    """Doublings of B plus doublings of S between buckets of the same H_kv and D; None if not reusable."""
    return doubling_distance(a, b, axes=(0, 2), max_doublings=MAX_DOUBLINGS)


def flops(shape: tuple[int, ...]) -> int:
    """Nominal 2 * B * S * HD^2 (the kernel computes only the upper triangle, about half of it)."""
    batch, heads, seq, head_dim = shape
    return 2 * batch * seq * (heads * head_dim) ** 2


def bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    """k read once, float32 G written once (split partials not counted)."""
    batch, heads, seq, head_dim = shape
    hd = heads * head_dim
    return batch * seq * hd * element_bytes(dtype) + batch * hd * hd * 4


SHAPE_SETS = {
    # Odd S, one head and several, D = 32/64/128, non-power-of-two H_kv * D; interpreter-sized.
    "smoke": [(1, 1, 1, 64), (2, 2, 7, 64), (1, 3, 63, 64), (2, 1, 129, 128), (1, 4, 97, 32)],
    "tune": [(b, LLAMA3_8B[0], s, LLAMA3_8B[1]) for b in (1, 8) for s in CONTEXTS],
    "bench": ([(b, LLAMA3_8B[0], s, LLAMA3_8B[1]) for b in (1, 8) for s in CONTEXTS]
              + [(1, h, s, d) for (h, d) in (YI_9B, GLM4_9B) for s in (32768, 131072)]),
}


# -- The projection a_b = K_b @ V_r (untuned) -------------------------------------------------------

PROJECT_SHAPE_NAMES = ("B", "H_kv", "S", "D", "rank")
# One tiling for every dtype: 3 stages of (64 x 32 + 32 x 64) float32 tiles, 48 KiB, within the
# smallest GPU; tensor cores for 16-bit keys (mma.sync, wgmma). BLOCK_C 64 spilled 512 B per thread
# in float32 on sm_80 (FMA dot); 32 needs 210 registers there, 162 on sm_90.
PROJECT_CONFIG = {"BLOCK_S": 64, "BLOCK_R": 64, "BLOCK_C": 32, "num_warps": 4, "num_stages": 3}
PROJECT_SHAPE_SETS = {
    "smoke": [(1, 1, 7, 64, 5), (2, 2, 63, 64, 24), (1, 4, 129, 32, 40)],
    "tune": [(*shape, SHADOWKV_RANK) for shape in SHAPE_SETS["tune"]],
    "bench": [(*shape, SHADOWKV_RANK) for shape in SHAPE_SETS["bench"]],
}


def project_shared_memory(config: Mapping[str, int], shape: tuple[int, ...] | None = None) -> SharedMemory:
    """Shared memory per block of `project_kernel` at any shape: a stage holds K [BLOCK_S, BLOCK_C]
    and the basis [BLOCK_C, BLOCK_R] (float32 at most); the epilogue converts the float32
    [BLOCK_S, BLOCK_R] accumulator. PROJECT_CONFIG: 25600 B on sm_90 in 16-bit dtypes, 33792 B in float32."""
    return gemm_tiles(config["BLOCK_S"], config["BLOCK_R"], config["BLOCK_C"], num_stages=config["num_stages"],
                      num_warps=config["num_warps"], operand_bytes=OPERAND_BYTES)
