"""Low-rank key cache: search spaces, DEFAULTs, shape sets and buckets of its two tuned kernels.

`lowrank_gram` (the Gram matrix G_b = K_b^T K_b of the merged keys) has shape (B, H_kv, S, D),
the shape of `k`. H_kv and D are fixed by the model; B and S vary per prefill, so the database
buckets B and S to powers of two and keeps H_kv and D exact.

`reconstruct_keys` (gather + GEMM + RoPE) has shape (B, S, H_kv, n, D, rank): S is the length
of the factorised sequence (rows of `a`; it only changes how the gathered rows sit in cache), n
the number of tokens rebuilt per KV head. H_kv, D and rank are fixed by the model and the ShadowKV
setting; B, S and n are bucketed to powers of two.

Nearest-bucket rule (when no config is stored for a call's own bucket): among tuned buckets with
the same exact axes and dtype, take the one fewest doublings away on the axes that set the
amount of parallel work (B and S for the Gram, B and n for the reconstruction), at most
`MAX_DOUBLINGS` in total; on a tie, the larger one (its tiles and splits were chosen for more
work, which wastes less on a smaller problem than the reverse). For the reconstruction a doubling
of S counts `S_WEIGHT` only: it moves no work, it only spreads the gathered rows.

Shared-memory estimates assume 4-byte (float32) operands, the widest dtype of both kernels, so a
config the constraints accept runs in every dtype: the space has no dtype axis.

The projection `a_b = K_b @ V_r` of `lowrank_keys` is not tuned (not a registered spec): it uses
`PROJECT_CONFIG`, a plain GEMM tiling that fits every GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from kernelhub.space import SearchSpace

DTYPES = ("float16", "bfloat16", "float32")

MAX_DOUBLINGS = 2
S_WEIGHT = 0.125
# Accumulator registers per thread above which the float32 tile spills.
MAX_ACC_REGS_PER_THREAD = 128
OPERAND_BYTES = 4  # float32, the widest operand dtype
_ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
MIN_DOT = 16  # tl.dot needs every dimension >= 16


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def _doublings(a: int, b: int) -> float:
    return abs(math.log2(a) - math.log2(b))


# ================================================================================================
# lowrank_gram: G_b = K_b^T K_b
# ================================================================================================

GRAM_SHAPE_NAMES = ("B", "H_kv", "S", "D")

GRAM_PARAMS = {
    "BLOCK_HD": (16, 32, 64, 128),  # square output tiles: G is symmetric, only tiles on or above the diagonal run
    "BLOCK_S": (16, 32, 64, 128),  # reduction step over tokens
    "SPLIT_S": (1, 2, 4, 8, 16, 32),  # programs sharing one output tile's reduction over S
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4),
}

LONG_S = 4096  # above this many tokens the split-S DEFAULT applies


def gram_shared_memory_bytes(config: Mapping[str, int]) -> int:
    """Pipelined tiles of K[s, cols_m] and K[s, cols_n], or the [BLOCK_HD, BLOCK_HD] float32
    accumulator when the epilogue converts its layout for the (mirrored) stores, whichever is larger."""
    tiles = config["num_stages"] * 2 * config["BLOCK_S"] * config["BLOCK_HD"] * OPERAND_BYTES
    return max(tiles, config["BLOCK_HD"] ** 2 * 4)


def _gram_fits_shared_memory(config, shape, smem_bytes):
    need = gram_shared_memory_bytes(config)
    if need > smem_bytes:
        return f"needs {need} B of shared memory, device allows {smem_bytes} B"
    return None


def _gram_accumulator_fits_registers(config, shape, smem_bytes):
    per_thread = config["BLOCK_HD"] ** 2 // (32 * config["num_warps"])
    if per_thread > MAX_ACC_REGS_PER_THREAD:
        return (f"float32 accumulator needs {per_thread} registers per thread with {config['num_warps']} "
                f"warps (> {MAX_ACC_REGS_PER_THREAD})")
    return None


def _gram_tiles_fit_problem(config, shape, smem_bytes):
    _, heads, seq, head_dim = shape
    for name, size in (("BLOCK_HD", heads * head_dim), ("BLOCK_S", seq)):
        padded = max(MIN_DOT, _next_pow2(size))
        if config[name] > padded:
            return f"{name}={config[name]} exceeds the padded problem size {padded}"
    return None


def _gram_split_has_work(config, shape, smem_bytes):
    s_tiles = -(-shape[2] // config["BLOCK_S"])
    if config["SPLIT_S"] > max(1, s_tiles):
        return f"SPLIT_S={config['SPLIT_S']} exceeds the {s_tiles} S tiles of S={shape[2]}"
    return None


GRAM_SPACE = SearchSpace(
    params=GRAM_PARAMS,
    constraints=(_gram_fits_shared_memory, _gram_accumulator_fits_registers, _gram_tiles_fit_problem,
                 _gram_split_has_work),
)

GRAM_DEFAULT_SHORT = {"BLOCK_HD": 64, "BLOCK_S": 32, "SPLIT_S": 1, "num_warps": 4, "num_stages": 2}
# 36 upper tiles of a 1024-wide G per sequence are too few programs for a GPU: split S eight ways.
GRAM_DEFAULT_LONG = {"BLOCK_HD": 128, "BLOCK_S": 32, "SPLIT_S": 8, "num_warps": 8, "num_stages": 3}
GRAM_DEFAULTS = (GRAM_DEFAULT_SHORT, GRAM_DEFAULT_LONG)


def gram_default_config(shape: tuple[int, ...]) -> dict[str, int]:
    """The untuned fallback: correct for any shape (extra splits just add zero partials)."""
    return dict(GRAM_DEFAULT_SHORT if shape[2] <= LONG_S else GRAM_DEFAULT_LONG)


def gram_bucket(shape: tuple[int, ...]) -> tuple[int, ...]:
    batch, heads, seq, head_dim = shape
    return (_next_pow2(batch), heads, _next_pow2(seq), head_dim)


def gram_bucket_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float | None:
    """Doublings of B plus doublings of S between buckets of the same H_kv and D; None if not reusable."""
    if (a[1], a[3]) != (b[1], b[3]):
        return None
    doublings = _doublings(a[0], b[0]) + _doublings(a[2], b[2])
    if doublings > MAX_DOUBLINGS:
        return None
    return doublings - (0.25 if b[0] * b[2] > a[0] * a[2] else 0.0)


def gram_flops(shape: tuple[int, ...]) -> int:
    """Nominal 2 * B * S * HD^2 (the kernel computes only the upper triangle, about half of it)."""
    batch, heads, seq, head_dim = shape
    return 2 * batch * seq * (heads * head_dim) ** 2


def gram_bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    """k read once, float32 G written once (split partials not counted)."""
    batch, heads, seq, head_dim = shape
    hd = heads * head_dim
    return batch * seq * hd * _ELEMENT_BYTES[dtype] + batch * hd * hd * 4


# ================================================================================================
# reconstruct_keys: gather rows of a, GEMM with the head's basis slice, RoPE
# ================================================================================================

RECONSTRUCT_SHAPE_NAMES = ("B", "S", "H_kv", "n", "D", "rank")

RECONSTRUCT_PARAMS = {
    "BLOCK_N": (16, 32, 64, 128),  # tokens per program
    "BLOCK_R": (16, 32, 64, 128),  # reduction step over the rank
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4),
}

SMALL_N = 64  # up to this many tokens per head the small-tile DEFAULT applies
WIDE_HEAD = 128  # above this head dimension too (its smaller tiles fit shared memory for any D <= 256)


def half_block(head_dim: int) -> int:
    """Columns of each RoPE half as the kernel tiles them: D / 2 padded to a power of two >= 16."""
    return max(MIN_DOT, _next_pow2(head_dim // 2))


def reconstruct_shared_memory_bytes(config: Mapping[str, int], head_dim: int) -> int:
    """Pipelined gathered rows of a [BLOCK_N, BLOCK_R] and the two basis halves [BLOCK_R, D/2], or
    one float32 accumulator [BLOCK_N, D/2] when the epilogue converts its layout, whichever is larger."""
    per_stage = config["BLOCK_N"] * config["BLOCK_R"] + 2 * config["BLOCK_R"] * half_block(head_dim)
    return max(config["num_stages"] * per_stage * OPERAND_BYTES, config["BLOCK_N"] * half_block(head_dim) * 4)


def _reconstruct_fits_shared_memory(config, shape, smem_bytes):
    need = reconstruct_shared_memory_bytes(config, shape[4])
    if need > smem_bytes:
        return f"needs {need} B of shared memory, device allows {smem_bytes} B"
    return None


def _reconstruct_accumulators_fit_registers(config, shape, smem_bytes):
    per_thread = config["BLOCK_N"] * 2 * half_block(shape[4]) // (32 * config["num_warps"])
    if per_thread > MAX_ACC_REGS_PER_THREAD:
        return (f"two float32 accumulators [BLOCK_N, D/2] need {per_thread} registers per thread with "
                f"{config['num_warps']} warps (> {MAX_ACC_REGS_PER_THREAD})")
    return None


def _reconstruct_tiles_fit_problem(config, shape, smem_bytes):
    _, _, _, n, _, rank = shape
    for name, size in (("BLOCK_N", n), ("BLOCK_R", rank)):
        padded = max(MIN_DOT, _next_pow2(size))
        if config[name] > padded:
            return f"{name}={config[name]} exceeds the padded problem size {padded}"
    return None


RECONSTRUCT_SPACE = SearchSpace(
    params=RECONSTRUCT_PARAMS,
    constraints=(_reconstruct_fits_shared_memory, _reconstruct_accumulators_fit_registers,
                 _reconstruct_tiles_fit_problem),
)

RECONSTRUCT_DEFAULT_SMALL = {"BLOCK_N": 16, "BLOCK_R": 32, "num_warps": 4, "num_stages": 2}
RECONSTRUCT_DEFAULT_LARGE = {"BLOCK_N": 64, "BLOCK_R": 32, "num_warps": 4, "num_stages": 3}
RECONSTRUCT_DEFAULTS = (RECONSTRUCT_DEFAULT_SMALL, RECONSTRUCT_DEFAULT_LARGE)


def reconstruct_default_config(shape: tuple[int, ...]) -> dict[str, int]:
    """The untuned fallback: correct for any shape, within every GPU's limits for D <= 256."""
    n, head_dim = shape[3], shape[4]
    small = n <= SMALL_N or head_dim > WIDE_HEAD
    return dict(RECONSTRUCT_DEFAULT_SMALL if small else RECONSTRUCT_DEFAULT_LARGE)


def reconstruct_bucket(shape: tuple[int, ...]) -> tuple[int, ...]:
    batch, seq, heads, n, head_dim, rank = shape
    return (_next_pow2(batch), _next_pow2(seq), heads, _next_pow2(n), head_dim, rank)


def reconstruct_bucket_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float | None:
    """Doublings of B and n (plus S_WEIGHT per doubling of S) between buckets of the same H_kv, D
    and rank; None if not reusable."""
    if (a[2], a[4], a[5]) != (b[2], b[4], b[5]):
        return None
    doublings = _doublings(a[0], b[0]) + _doublings(a[3], b[3])
    if doublings > MAX_DOUBLINGS:
        return None
    bonus = 0.25 if b[0] * b[3] > a[0] * a[3] else 0.0
    return doublings + S_WEIGHT * _doublings(a[1], b[1]) - bonus


def reconstruct_flops(shape: tuple[int, ...]) -> int:
    """The GEMM, 2 * B * H_kv * n * rank * D (RoPE adds 3 per output element, not counted)."""
    batch, _, heads, n, head_dim, rank = shape
    return 2 * batch * heads * n * rank * head_dim


def reconstruct_bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    """Gathered rows of a, the basis, int64 positions, gathered cos and sin rows, the output."""
    batch, _, heads, n, head_dim, rank = shape
    size = _ELEMENT_BYTES[dtype]
    tokens = batch * heads * n
    return (tokens * rank * size + batch * rank * heads * head_dim * size + tokens * 8
            + 2 * tokens * head_dim * 4 + tokens * head_dim * size)


# ================================================================================================
# The projection a_b = K_b @ V_r (untuned)
# ================================================================================================

# 3 * (64 * 64 + 64 * 64) * 4 B = 96 KiB of float32 tiles: within the smallest GPU limit we target.
PROJECT_CONFIG = {"BLOCK_S": 64, "BLOCK_R": 64, "BLOCK_C": 64, "num_warps": 4, "num_stages": 3}


# ================================================================================================
# Shape sets
# ================================================================================================

# Models ShadowKV was evaluated on, as (H_kv, D): Llama-3-8B-1M / Llama-3.1-8B, Yi-9B-200K and
# Qwen2-7B-128K, GLM-4-9B-1M. ShadowKV's setting: rank 160, sparse budget 2048 tokens per KV head.
LLAMA3_8B = (8, 128)
YI_9B = (4, 128)
GLM4_9B = (2, 128)
SHADOWKV_RANK = 160
SHADOWKV_BUDGET = 2048
CONTEXTS = (8192, 32768, 131072)

GRAM_SHAPE_SETS = {
    # Odd S, one head and several, D = 32/64/128, non-power-of-two H_kv * D; interpreter-sized.
    "smoke": [(1, 1, 1, 64), (2, 2, 7, 64), (1, 3, 63, 64), (2, 1, 129, 128), (1, 4, 97, 32)],
    "tune": [(b, LLAMA3_8B[0], s, LLAMA3_8B[1]) for b in (1, 8) for s in CONTEXTS],
    "bench": ([(b, LLAMA3_8B[0], s, LLAMA3_8B[1]) for b in (1, 8) for s in CONTEXTS]
              + [(1, h, s, d) for (h, d) in (YI_9B, GLM4_9B) for s in (32768, 131072)]),
}

RECONSTRUCT_SHAPE_SETS = {
    # Rank never a power of two; n from a single token to a partial block; interpreter-sized.
    "smoke": [(1, 7, 1, 1, 64, 5), (2, 63, 2, 7, 64, 24), (1, 129, 1, 33, 128, 40),
              (2, 100, 4, 33, 64, 48), (1, 200, 4, 17, 64, 160)],
    "tune": [(b, s, LLAMA3_8B[0], SHADOWKV_BUDGET, LLAMA3_8B[1], SHADOWKV_RANK) for b in (1, 8) for s in CONTEXTS],
    "bench": ([(b, s, LLAMA3_8B[0], SHADOWKV_BUDGET, LLAMA3_8B[1], SHADOWKV_RANK)
               for b in (1, 8, 32) for s in CONTEXTS]
              + [(1, s, h, SHADOWKV_BUDGET, d, SHADOWKV_RANK) for (h, d) in (YI_9B, GLM4_9B) for s in (32768, 131072)]),
}
