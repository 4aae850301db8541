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

Shared-memory estimates follow kernels/common/shared_memory.py's model (pipeline stages or the
epilogue's layout conversion, whichever is larger, + 1 KiB static) with 4-byte (float32)
operands, the widest dtype of both kernels, so a config the constraints accept runs in every
dtype: the space has no dtype axis. Margin, held against the compiler on sm_80 and sm_90 by
tests/test_compile_agreement.py: never below its figure; at most one stage + 1 KiB above it where
the stages decide, three quarters of the epilogue + 1 KiB where that does.

DEFAULTs depend on the dtype where float32's FMA dots would spill with the 16-bit tiling.

The projection `a_b = K_b @ V_r` of `lowrank_keys` is not tuned (not a registered spec): it uses
`PROJECT_CONFIG`, a plain GEMM tiling that fits every GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from kernelhub.kernels.common.shared_memory import SharedMemory, epilogue_bytes, fits
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


def gram_shared_memory(config: Mapping[str, int]) -> SharedMemory:
    """Shared memory per block of `gram_kernel` (kernels/common/shared_memory.py's model): a stage
    holds the tiles K[s, cols_m]^T and K[s, cols_n], [BLOCK_HD, BLOCK_S] each; the epilogue converts
    the float32 [BLOCK_HD, BLOCK_HD] accumulator for its two (mirrored) stores. Measured (Triton
    3.9, BLOCK_HD 128, BLOCK_S 32, 3 stages, 8 warps, bfloat16): 66560 B on sm_90, 65536 B on sm_80,
    both the epilogue's 64 KiB (+ 1 KiB static on sm_90)."""
    stage = 2 * config["BLOCK_S"] * config["BLOCK_HD"] * OPERAND_BYTES
    return SharedMemory(stage=stage, num_stages=config["num_stages"],
                        epilogue=epilogue_bytes(config["BLOCK_HD"], config["BLOCK_HD"], config["num_warps"]))


def gram_shared_memory_bytes(config: Mapping[str, int]) -> int:
    return gram_shared_memory(config).bytes


def _gram_fits_shared_memory(config, shape, smem_bytes):
    return fits(gram_shared_memory(config), smem_bytes)


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
# float32 keys multiply on FMA units, whose dot holds operand fragments in registers: with
# BLOCK_S 32 that is 255 registers and 312 B of spills per thread on sm_80; 16 keeps it at 192.
GRAM_DEFAULT_LONG_FP32 = dict(GRAM_DEFAULT_LONG, BLOCK_S=16)
GRAM_DEFAULTS = (GRAM_DEFAULT_SHORT, GRAM_DEFAULT_LONG, GRAM_DEFAULT_LONG_FP32)


def gram_default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    """The untuned fallback: correct for any shape (extra splits just add zero partials); no
    spills on sm_80 or sm_90 in any dtype (`kernelhub compile`)."""
    if shape[2] <= LONG_S:
        return dict(GRAM_DEFAULT_SHORT)
    return dict(GRAM_DEFAULT_LONG_FP32 if dtype == "float32" else GRAM_DEFAULT_LONG)


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


def reconstruct_shared_memory(config: Mapping[str, int], head_dim: int) -> SharedMemory:
    """Shared memory per block of `reconstruct_keys_kernel` (kernels/common/shared_memory.py's
    model): a stage holds the gathered rows of a [BLOCK_N, BLOCK_R] and the two basis halves
    [BLOCK_R, D/2]; the epilogue converts the two float32 accumulators [BLOCK_N, D/2] for RoPE and
    the store. Measured (Triton 3.9, BLOCK_N 64, BLOCK_R 32, 3 stages, 4 warps, bfloat16, D 128):
    37888 B on sm_90 (three copies + 1 KiB static), 24576 B on sm_80 (two)."""
    per_stage = config["BLOCK_N"] * config["BLOCK_R"] + 2 * config["BLOCK_R"] * half_block(head_dim)
    return SharedMemory(stage=per_stage * OPERAND_BYTES, num_stages=config["num_stages"],
                        epilogue=epilogue_bytes(config["BLOCK_N"], half_block(head_dim), config["num_warps"]))


def reconstruct_shared_memory_bytes(config: Mapping[str, int], head_dim: int) -> int:
    return reconstruct_shared_memory(config, head_dim).bytes


def _reconstruct_fits_shared_memory(config, shape, smem_bytes):
    return fits(reconstruct_shared_memory(config, shape[4]), smem_bytes)


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
# float32 (FMA dots, operand fragments in registers): the 16-bit tile spills 392 B per thread on
# sm_80; a shorter rank step over twice the warps needs 116 registers on both targets.
RECONSTRUCT_DEFAULT_LARGE_FP32 = {"BLOCK_N": 64, "BLOCK_R": 16, "num_warps": 8, "num_stages": 3}
RECONSTRUCT_DEFAULTS = (RECONSTRUCT_DEFAULT_SMALL, RECONSTRUCT_DEFAULT_LARGE, RECONSTRUCT_DEFAULT_LARGE_FP32)


def reconstruct_default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    """The untuned fallback: correct for any shape, within every GPU's limits for D <= 256, no
    spills on sm_80 or sm_90 in any dtype (`kernelhub compile`)."""
    n, head_dim = shape[3], shape[4]
    if n <= SMALL_N or head_dim > WIDE_HEAD:
        return dict(RECONSTRUCT_DEFAULT_SMALL)
    return dict(RECONSTRUCT_DEFAULT_LARGE_FP32 if dtype == "float32" else RECONSTRUCT_DEFAULT_LARGE)


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

# One tiling for every dtype: 3 stages of (64 x 32 + 32 x 64) float32 tiles, 48 KiB, within the
# smallest GPU; tensor cores for 16-bit keys (mma.sync, wgmma). BLOCK_C 64 spilled 512 B per thread
# in float32 on sm_80 (FMA dot); 32 needs 210 registers there, 162 on sm_90.
PROJECT_CONFIG = {"BLOCK_S": 64, "BLOCK_R": 64, "BLOCK_C": 32, "num_warps": 4, "num_stages": 3}


def project_shared_memory(config: Mapping[str, int]) -> SharedMemory:
    """Shared memory per block of `project_kernel`: a stage holds K [BLOCK_S, BLOCK_C] and the
    basis [BLOCK_C, BLOCK_R] (float32 at most); the epilogue converts the float32 [BLOCK_S, BLOCK_R]
    accumulator. PROJECT_CONFIG: 25600 B on sm_90 in 16-bit dtypes, 33792 B in float32."""
    stage = (config["BLOCK_S"] + config["BLOCK_R"]) * config["BLOCK_C"] * OPERAND_BYTES
    return SharedMemory(stage=stage, num_stages=config["num_stages"],
                        epilogue=epilogue_bytes(config["BLOCK_S"], config["BLOCK_R"], config["num_warps"]))


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
