"""`reconstruct_keys`, gather + GEMM + RoPE: search space, DEFAULTs, shape sets, buckets.

Shapes are (B, S, H_kv, n, D, rank): S is the length of the factorised sequence (rows of `a`; it
only changes how the gathered rows sit in cache), n the number of tokens rebuilt per KV head.
H_kv, D and rank are fixed by the model and the ShadowKV setting; B, S and n are bucketed to
powers of two. In the nearest-bucket rule (space.py) a doubling of S counts `S_WEIGHT` only: it
moves no work, it only spreads the gathered rows.
"""

from __future__ import annotations

from collections.abc import Mapping

from kernelhub.kernels.common.buckets import doubling_distance, pow2_bucket
from kernelhub.kernels.common.constraints import MIN_DOT, blocks_fit_problem, registers_fit
from kernelhub.kernels.common.shared_memory import SharedMemory, epilogue_bytes, fits
from kernelhub.kernels.common.sizes import element_bytes, next_pow2
from kernelhub.kernels.lowrank_keys.space import (CONTEXTS, DTYPES, GLM4_9B, LLAMA3_8B, MAX_DOUBLINGS,  # noqa: F401
                                                  OPERAND_BYTES, SHADOWKV_BUDGET, SHADOWKV_RANK, YI_9B)
from kernelhub.space import SearchSpace

SHAPE_NAMES = ("B", "S", "H_kv", "n", "D", "rank")

PARAMS = {
    "BLOCK_N": (16, 32, 64, 128),  # tokens per program
    "BLOCK_R": (16, 32, 64, 128),  # reduction step over the rank
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4),
}

S_WEIGHT = 0.125
SMALL_N = 64  # up to this many tokens per head the small-tile DEFAULT applies
WIDE_HEAD = 128  # above this head dimension too (its smaller tiles fit shared memory for any D <= 256)


def half_block(head_dim: int) -> int:
    """Columns of each RoPE half as the kernel tiles them: D / 2 padded to a power of two >= 16."""
    return next_pow2(head_dim // 2, minimum=MIN_DOT)


def shared_memory(config: Mapping[str, int], shape: tuple[int, ...]) -> SharedMemory:
    """Shared memory per block of `reconstruct_keys_kernel` (kernels/common/shared_memory.py's
    model): a stage holds the gathered rows of a [BLOCK_N, BLOCK_R] and the two basis halves
    [BLOCK_R, D/2]; the epilogue converts the two float32 accumulators [BLOCK_N, D/2] for RoPE and
    the store. Measured (Triton 3.9, BLOCK_N 64, BLOCK_R 32, 3 stages, 4 warps, bfloat16, D 128):
    37888 B on sm_90 (three copies + 1 KiB static), 24576 B on sm_80 (two)."""
    half = half_block(shape[4])
    per_stage = config["BLOCK_N"] * config["BLOCK_R"] + 2 * config["BLOCK_R"] * half
    return SharedMemory(stage=per_stage * OPERAND_BYTES, num_stages=config["num_stages"],
                        epilogue=epilogue_bytes(config["BLOCK_N"], half, config["num_warps"]))


def _fits_shared_memory(config, shape, smem_bytes):
    return fits(shared_memory(config, shape), smem_bytes)


SPACE = SearchSpace(
    params=PARAMS,
    constraints=(_fits_shared_memory,
                 registers_fit("two float32 accumulators [BLOCK_N, D/2]",
                               lambda config, shape: config["BLOCK_N"] * 2 * half_block(shape[4])),
                 blocks_fit_problem(PARAMS, lambda shape: {"BLOCK_N": shape[3], "BLOCK_R": shape[5]})),
)

DEFAULT_SMALL = {"BLOCK_N": 16, "BLOCK_R": 32, "num_warps": 4, "num_stages": 2}
DEFAULT_LARGE = {"BLOCK_N": 64, "BLOCK_R": 32, "num_warps": 4, "num_stages": 3}
# float32 (FMA dots, operand fragments in registers): the 16-bit tile spills 392 B per thread on
# sm_80; a shorter rank step over twice the warps needs 116 registers on both targets.
DEFAULT_LARGE_FP32 = {"BLOCK_N": 64, "BLOCK_R": 16, "num_warps": 8, "num_stages": 3}
DEFAULTS = (DEFAULT_SMALL, DEFAULT_LARGE, DEFAULT_LARGE_FP32)


def default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    """The untuned fallback: correct for any shape, within every GPU's limits for D <= 256, no
    spills on sm_80 or sm_90 in any dtype (`kernelhub compile`)."""
    n, head_dim = shape[3], shape[4]
    if n <= SMALL_N or head_dim > WIDE_HEAD:
        return dict(DEFAULT_SMALL)
    return dict(DEFAULT_LARGE_FP32 if dtype == "float32" else DEFAULT_LARGE)


def bucket(shape: tuple[int, ...]) -> tuple[int, ...]:
    """B, S and n rounded up to powers of two; H_kv, D and rank exact."""
    return pow2_bucket(shape, axes=(0, 1, 3))


def bucket_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float | None:
    """Doublings of B and n (plus S_WEIGHT per doubling of S) between buckets of the same H_kv, D
    and rank; None if not reusable."""
    return doubling_distance(a, b, axes=(0, 3), weights={1: S_WEIGHT}, max_doublings=MAX_DOUBLINGS)


def flops(shape: tuple[int, ...]) -> int:
    """The GEMM, 2 * B * H_kv * n * rank * D (RoPE adds 3 per output element, not counted)."""
    batch, _, heads, n, head_dim, rank = shape
    return 2 * batch * heads * n * rank * head_dim


def bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    """Gathered rows of a, the basis, int64 positions, gathered cos and sin rows, the output."""
    batch, _, heads, n, head_dim, rank = shape
    size = element_bytes(dtype)
    tokens = batch * heads * n
    return (tokens * rank * size + batch * rank * heads * head_dim * size + tokens * 8
            + 2 * tokens * head_dim * 4 + tokens * head_dim * size)


SHAPE_SETS = {
    # Rank never a power of two; n from a single token to a partial block; interpreter-sized.
    "smoke": [(1, 7, 1, 1, 64, 5), (2, 63, 2, 7, 64, 24), (1, 129, 1, 33, 128, 40),
              (2, 100, 4, 33, 64, 48), (1, 200, 4, 17, 64, 160)],
    "tune": [(b, s, LLAMA3_8B[0], SHADOWKV_BUDGET, LLAMA3_8B[1], SHADOWKV_RANK) for b in (1, 8) for s in CONTEXTS],
    "bench": ([(b, s, LLAMA3_8B[0], SHADOWKV_BUDGET, LLAMA3_8B[1], SHADOWKV_RANK)
               for b in (1, 8, 32) for s in CONTEXTS]
              + [(1, s, h, SHADOWKV_BUDGET, d, SHADOWKV_RANK) for (h, d) in (YI_9B, GLM4_9B) for s in (32768, 131072)]),
}
