"""Landmark top-k: search space, DEFAULTs, shape sets, shape buckets.

Shapes are (B, H_q, H_kv, C, D, k): batch, query heads, KV heads, chunks (C = S // chunk_size for a
context of S tokens), head dimension, chunks selected per KV head. The model fixes H_q, H_kv and D,
the serving setup fixes k (ShadowKV's sparse budget); C grows with the context, so the database
buckets C by powers of two and keeps every other size exact.

Nearest-bucket rule (when no config is stored for a call's own bucket): among tuned buckets with
the same B, H_q, H_kv, D and k, take the one whose C bucket is fewest doublings away, at most
`MAX_C_DOUBLINGS`; on a tie, the larger C (its split count was tuned for more work, which costs
little on a shorter context; the reverse can leave most of the GPU idle).

Tunables (see kernel.py for what they do): BLOCK_C chunks per loop step, SPLIT_C programs per
(batch, KV head) along C, num_warps, num_stages.

Constraints see no dtype, so resources are estimated for float32 inputs, the largest element size:
a config they accept fits the GPU for every dtype of the family. DEFAULTs do see it: float32
takes more warps (FLOAT32_WARPS), as its FMA dots spill with four.

Shared memory: kernels/common/shared_memory.py's model via `shared_memory`: the stages of the
landmark tile, the query tile and the reductions' scratch, + 1 KiB static. Margin, held against
the compiler on sm_80 and sm_90 by tests/test_compile_agreement.py: never below its figure, at
most one stage + the scratch allowance + 1 KiB above it.
"""

from __future__ import annotations

from collections.abc import Mapping

from kernelhub import device
from kernelhub.kernels.common.buckets import doubling_distance, pow2_bucket
from kernelhub.kernels.common.constraints import MIN_DOT, blocks_fit_problem, registers_fit, splits_have_work
from kernelhub.kernels.common.shared_memory import SharedMemory, fits
from kernelhub.kernels.common.sizes import element_bytes, next_pow2
from kernelhub.space import SearchSpace

SHAPE_NAMES = ("B", "H_q", "H_kv", "C", "D", "k")
DTYPES = ("float16", "bfloat16", "float32")

MAX_C_DOUBLINGS = 2

PARAMS = {
    "BLOCK_C": (16, 32, 64, 128, 256),  # >= 16: the N dimension of tl.dot
    "SPLIT_C": (1, 2, 4, 8, 16, 32),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4),
}

ELEMENT_BYTES = element_bytes("float32")  # the largest input dtype (constraints see no dtype)
# Registers per thread for the [G_PAD, BLOCK_C] float32 logits (and their exponentials) plus the
# [BLOCK_C, D_PAD] landmark tile, above which the kernel spills.
MAX_REGS_PER_THREAD = 160
# Shared memory every DEFAULT fits: the smallest of the GPUs kernelhub tunes for (sm_86 / sm_89).
DEFAULT_SMEM_BYTES = device.DEFAULT_SMEM_BYTES


def padded_group(shape: tuple[int, ...]) -> int:
    """G_PAD: query heads per KV head, padded to a power of two >= 16 (the M dimension of tl.dot)."""
    _, h_q, h_kv, _, _, _ = shape
    return next_pow2(h_q // max(1, h_kv), minimum=MIN_DOT)


def padded_head_dim(shape: tuple[int, ...]) -> int:
    """D_PAD: the head dimension padded to a power of two >= 16 (the K dimension of tl.dot)."""
    return next_pow2(shape[4], minimum=MIN_DOT)


def shared_memory(config: Mapping[str, int], shape: tuple[int, ...]) -> SharedMemory:
    """Shared memory per block of either kernel (kernels/common/shared_memory.py's model): a stage
    holds one landmark tile [BLOCK_C, D_PAD]; the group's query tile [G_PAD, D_PAD] (the other
    tl.dot operand) stays for the whole loop, and so does the scratch of the loop's reductions
    over the logits (the group max across warps, the row statistics): taken as
    max(BLOCK_C, G_PAD) * num_warps float32, the most measured (2 KiB at BLOCK_C 64 with 8 warps
    and at BLOCK_C 128 with 4; 512 B at G_PAD 64, BLOCK_C 16, 8 warps). Measured (Triton
    3.9, Llama-3-8B: G_PAD 16, D 128, BLOCK_C 64, 2 stages, 4 warps, bfloat16): 20736 B on sm_80,
    21760 B on sm_90 (one landmark copy, as mma.sync keeps num_stages - 1, the query tile, 256 B
    of reduction scratch, 1 KiB static on sm_90)."""
    d_pad = padded_head_dim(shape)
    g_pad = padded_group(shape)
    reductions = max(config["BLOCK_C"], g_pad) * config["num_warps"] * ELEMENT_BYTES
    return SharedMemory(stage=config["BLOCK_C"] * d_pad * ELEMENT_BYTES, num_stages=config["num_stages"],
                        resident=g_pad * d_pad * ELEMENT_BYTES + reductions, scratch_allowance=reductions)


def _fits_shared_memory(config, shape, smem_bytes):
    return fits(shared_memory(config, shape), smem_bytes)


def _register_elements(config: Mapping[str, int], shape: tuple[int, ...]) -> int:
    """32-bit values the logits, their exponentials and the landmark tile hold in registers."""
    return 2 * padded_group(shape) * config["BLOCK_C"] + config["BLOCK_C"] * padded_head_dim(shape)


_fits_registers = registers_fit("logits and landmark tile", _register_elements, limit=MAX_REGS_PER_THREAD)
SPACE = SearchSpace(
    params=PARAMS,
    constraints=(_fits_shared_memory, _fits_registers,
                 blocks_fit_problem(PARAMS, lambda shape: {"BLOCK_C": shape[3]}, what="padded number of chunks"),
                 splits_have_work("SPLIT_C", "BLOCK_C", axis=3, axis_name="C")),
)

# Long contexts are split along C so that B * H_kv programs (8 for Llama-3-8B at batch 1) become
# enough to fill a GPU; short ones are not worth a second launch.
LONG_C = 1024
DEFAULT_SPLIT_LONG = 8
DEFAULT_SHORT = {"BLOCK_C": 64, "SPLIT_C": 1, "num_warps": 4, "num_stages": 2}
DEFAULT_LONG = dict(DEFAULT_SHORT, SPLIT_C=DEFAULT_SPLIT_LONG)
# For large groups or head dims, where a 64-chunk tile would not fit the smallest GPU.
DEFAULT_SHORT_NARROW = dict(DEFAULT_SHORT, BLOCK_C=16)
DEFAULT_LONG_NARROW = dict(DEFAULT_LONG, BLOCK_C=16)
# float32 inputs multiply on FMA units: with 4 warps the statistics pass needs 255 registers and
# spills 152-240 B per thread on sm_90 (Triton 3.9), the SPLIT_C == 1 scores pass 184 B; with 8
# warps no pass spills on sm_80 or sm_90 (40 to 150 registers), in the same shared memory.
FLOAT32_WARPS = 8
DEFAULTS_16BIT = (DEFAULT_SHORT, DEFAULT_LONG, DEFAULT_SHORT_NARROW, DEFAULT_LONG_NARROW)
DEFAULTS = DEFAULTS_16BIT + tuple(dict(c, num_warps=FLOAT32_WARPS) for c in DEFAULTS_16BIT)


def default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    """The untuned fallback: correct for any shape, no spills on sm_80 or sm_90 (`kernelhub compile`).

    BLOCK_C is 64 unless that does not fit the smallest GPU's shared memory or registers (group size
    times head dimension beyond 16 x 128), then 16; with 16 every group of up to 64 query heads
    per KV head fits for D <= 256. SPLIT_C is 8 from C > LONG_C on, else 1. float32 takes
    FLOAT32_WARPS warps (the 16-bit choice of BLOCK_C, which more warps only make fit better).
    """
    long = shape[3] > LONG_C
    config = DEFAULT_LONG if long else DEFAULT_SHORT
    if _fits_shared_memory(config, shape, DEFAULT_SMEM_BYTES) or _fits_registers(config, shape, DEFAULT_SMEM_BYTES):
        config = DEFAULT_LONG_NARROW if long else DEFAULT_SHORT_NARROW
    if dtype == "float32":
        config = dict(config, num_warps=FLOAT32_WARPS)
    return dict(config)


def bucket(shape: tuple[int, ...]) -> tuple[int, ...]:
    """C rounded up to a power of two; every other size exact."""
    return pow2_bucket(shape, axes=(3,))


def bucket_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float | None:
    """Doublings of C between two buckets equal in everything else (the larger C wins a tie); None
    if not reusable."""
    return doubling_distance(a, b, axes=(3,), max_doublings=MAX_C_DOUBLINGS)


# Attention geometry (H_q, H_kv, D) of the models the tune and bench sets use.
LLAMA3_8B = (32, 8, 128)
LLAMA3_70B = (64, 8, 128)
CHUNK_SIZE = 8  # ShadowKV's
CONTEXTS = (8192, 32768, 131072)  # tokens: C = S / 8
SPARSE_BUDGET_CHUNKS = 256  # k: 2048 tokens of 8-token chunks


def _model_shapes(model: tuple[int, int, int], batches: tuple[int, ...]) -> list[tuple[int, ...]]:
    h_q, h_kv, d = model
    return [(b, h_q, h_kv, s // CHUNK_SIZE, d, SPARSE_BUDGET_CHUNKS) for b in batches for s in CONTEXTS]


SHAPE_SETS = {
    # Odd C (never a power of two), MHA and GQA groups of 4 and 8, D 64 and 128, k from 1 to C;
    # small enough for the Triton interpreter.
    "smoke": [(1, 4, 4, 7, 64, 1), (2, 8, 1, 63, 128, 63), (1, 32, 4, 129, 64, 16),
              (2, 8, 2, 1000, 128, 100), (1, 8, 8, 300, 128, 37)],
    "tune": _model_shapes(LLAMA3_8B, (1, 8)),
    "bench": _model_shapes(LLAMA3_8B, (1, 8)) + _model_shapes(LLAMA3_70B, (1, 8)),
}


def flops(shape: tuple[int, ...]) -> int:
    """The logits (one multiply-add per query head, chunk and dimension) and the softmax (about 4 per
    probability); the kernel's second pass over the logits is an implementation detail, not counted."""
    b, h_q, h_kv, c, d, k = shape
    return 2 * b * h_q * c * d + 4 * b * h_q * c


def bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    """Landmarks and queries read once, the int64 indices written once (bytes dominate)."""
    b, h_q, h_kv, c, d, k = shape
    element = element_bytes(dtype)
    return b * h_kv * c * d * element + b * h_q * d * element + 8 * b * h_kv * k
