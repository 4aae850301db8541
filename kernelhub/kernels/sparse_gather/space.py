"""Sparse gather: search space, DEFAULTs, shape sets, shape buckets.

Shapes are (B, H_kv, C, chunk, D, k): `values [B, H_kv, C, chunk, D]` gathered at
`chunk_idx [B, H_kv, k]`. The work is B * H_kv * k chunks of chunk * D elements; C only says how far
apart they may lie. The database buckets k and C by powers of two and keeps B, H_kv, chunk and D
exact (they are fixed by the model and the serving batch).

Nearest-bucket rule (when no config is stored for a call's own bucket): among tuned buckets with
the same B, H_kv, chunk and D, the one with the fewest doublings of k, at most `MAX_K_DOUBLINGS`;
doublings of C cost a tenth as much and are never disqualifying. On a tie, the larger k.

Each program copies BLOCK_CHUNKS chunks as one tile of BLOCK_CHUNKS * BLOCK_T rows by BLOCK_D
columns (BLOCK_T = next power of two >= chunk, at most MAX_BLOCK_T; BLOCK_D likewise for D, at most
MAX_BLOCK_D), looping over token and column blocks when chunk or D is larger, so any shape runs.

num_stages is not tuned: the kernel has no loads for the software pipeliner to stage (its PTX is
the same for num_stages 1, 2 and 3, sm_90, Triton 3.9), and it uses no shared memory; the launcher
passes num_stages=1.
"""

from __future__ import annotations

from kernelhub.kernels.common.buckets import doubling_distance, pow2_bucket
from kernelhub.kernels.common.constraints import blocks_fit_problem, registers_fit
from kernelhub.kernels.common.sizes import element_bytes, next_pow2
from kernelhub.space import SearchSpace

SHAPE_NAMES = ("B", "H_kv", "C", "chunk", "D", "k")
DTYPES = ("float16", "bfloat16", "float32")

MAX_BLOCK_T = 32
MAX_BLOCK_D = 256
MAX_K_DOUBLINGS = 2
# Elements of the copied tile per thread. The resident path holds two loads of the tile (values
# and resident) before selecting, so in float32 this is up to 128 registers per thread.
MAX_ELEMENTS_PER_THREAD = 64

PARAMS = {
    "BLOCK_CHUNKS": (1, 2, 4, 8, 16, 32),
    "num_warps": (1, 2, 4, 8),
}


def block_t(chunk: int) -> int:
    """Rows of one chunk in a tile: the token block."""
    return min(next_pow2(chunk), MAX_BLOCK_T)


def block_d(d: int) -> int:
    """Columns of a tile: the head-dimension block."""
    return min(next_pow2(d), MAX_BLOCK_D)


def tile_elements(block_chunks: int, shape: tuple[int, ...]) -> int:
    _, _, _, chunk, d, _ = shape
    return block_chunks * block_t(chunk) * block_d(d)


SPACE = SearchSpace(
    params=PARAMS,
    constraints=(registers_fit("the copied tile", lambda config, shape: tile_elements(config["BLOCK_CHUNKS"], shape),
                               limit=MAX_ELEMENTS_PER_THREAD, unit="elements"),
                 blocks_fit_problem(PARAMS, lambda shape: {"BLOCK_CHUNKS": shape[5]}, what="padded number of chunks")),
)

# Four chunks of 8 x 128 per program: 32 elements per thread, four 16-byte loads in 16-bit dtypes
# (eight in float32). One chunk per program where k < 4 or a chunk is large.
DEFAULT = {"BLOCK_CHUNKS": 4, "num_warps": 4}
DEFAULT_ONE_CHUNK = {"BLOCK_CHUNKS": 1, "num_warps": 4}
DEFAULTS = (DEFAULT, DEFAULT_ONE_CHUNK)


def default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    """The untuned fallback: correct for any shape; feasible under SPACE's constraints for any shape
    (one chunk per program is at most MAX_BLOCK_T * MAX_BLOCK_D = 8192 elements, 64 per thread)."""
    if SPACE.infeasibility(DEFAULT, shape, smem_bytes=0) is None:  # the kernel uses no shared memory
        return dict(DEFAULT)
    return dict(DEFAULT_ONE_CHUNK)


def bucket(shape: tuple[int, ...]) -> tuple[int, ...]:
    """C and k rounded up to powers of two; B, H_kv, chunk and D exact."""
    return pow2_bucket(shape, axes=(2, 5))


def bucket_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float | None:
    """Doublings of k (+ a tenth per doubling of C) between buckets of the same B, H_kv, chunk, D;
    None if not reusable. The tie-break towards the larger k is a small bonus (below a tenth)."""
    return doubling_distance(a, b, axes=(5,), weights={2: 0.1}, max_doublings=MAX_K_DOUBLINGS, bonus=0.05)


def has_resident(shape: tuple[int, ...]) -> bool:
    """Whether `make_inputs` adds a previous step's gather (resident set) for this shape: for every
    k >= 4, which includes all model shapes, since a decode step after the first always has one."""
    return shape[5] >= 4


# Llama-3-8B and -70B: 8 KV heads of dimension 128. ShadowKV: chunks of 8 tokens, a budget of
# 2048 tokens = 256 chunks per head and step.
LLAMA3_KV = {"H_kv": 8, "D": 128}
SHADOWKV_CHUNK = 8
SHADOWKV_K = 256


def _decode_shapes(seq_lens: tuple[int, ...], batches: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [(b, LLAMA3_KV["H_kv"], s // SHADOWKV_CHUNK, SHADOWKV_CHUNK, LLAMA3_KV["D"], SHADOWKV_K)
            for s in seq_lens for b in batches]


SHAPE_SETS = {
    # Odd sizes: C never a power of two, k in {1, 7, C}, D in {64, 128, 72}, an odd chunk;
    # small enough for the Triton interpreter.
    "smoke": [
        (1, 1, 13, 8, 64, 1),
        (2, 8, 13, 8, 128, 7),
        (1, 8, 11, 8, 72, 11),
        (2, 1, 37, 8, 72, 7),
        (1, 1, 9, 5, 64, 9),
    ],
    "tune": _decode_shapes((8192, 32768, 131072), (1, 8)),
    "bench": _decode_shapes((8192, 16384, 32768, 65536, 131072), (1, 8)),
}


def flops(shape: tuple[int, ...]) -> int:
    return 0


def bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    """Every selected chunk read once (from `values` or `resident`) and written once, plus the int64
    indices (`chunk_idx`, and `resident_idx` where the inputs have a resident set)."""
    b, h, _, chunk, d, k = shape
    payload = b * h * k * chunk * d * element_bytes(dtype)
    indices = 8 * b * h * k * (2 if has_resident(shape) else 1)
    return 2 * payload + indices
