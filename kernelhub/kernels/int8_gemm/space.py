"""int8 GEMM: search space, DEFAULTs, shape sets, shape buckets.

Shapes are (M, N, K) of `[M, K] @ [K, N]`; for a linear layer `y = x W^T` with weight `W [N, K]`,
M is the number of tokens. N and K are fixed by the model, M varies per call, so the database
buckets M by powers of two and keeps N and K exact.

Nearest-bucket rule (used when no config is stored for a call's own bucket): among tuned buckets
with the same N, K and dtype, take the one whose M bucket is fewest doublings away, at most
`MAX_M_DOUBLINGS`; on a tie, the larger M. A large-M config on a smaller M wastes some compute in a
memory-bound regime; a small-M config (tiny tiles, split-K) on a larger M can be many times slower.

Constraints: kernels/common/constraints.py's set for a tiled GEMM (shared memory, the int32
accumulator's registers, blocks against the padded problem), and split-K against the K tiles.

Shared memory: kernels/common/shared_memory.py's model via `shared_memory` (the larger of the
pipeline's stages and the epilogue's layout conversion, + 1 KiB static). Margin, held against the
compiler on sm_80 and sm_90 by tests/test_compile_agreement.py: never below its figure; at most one
stage + 1 KiB above it where the stages decide, three quarters of the epilogue + 1 KiB where that
does. The operands are int8 whatever the output dtype and the epilogue is counted at 4 bytes (the
int32 accumulator), so one estimate holds for all four dtypes.
"""

from __future__ import annotations

from collections.abc import Mapping

from kernelhub.kernels.common.buckets import doubling_distance, pow2_bucket
from kernelhub.kernels.common.constraints import gemm_constraints, splits_have_work
from kernelhub.kernels.common.shared_memory import SharedMemory, gemm_tiles
from kernelhub.kernels.common.sizes import element_bytes
from kernelhub.space import SearchSpace

SHAPE_NAMES = ("M", "N", "K")
# The dtype axis is the output dtype: "int32" is `int8_gemm`, the others `int8_scaled_gemm`.
DTYPES = ("int32", "bfloat16", "float16", "float32")

MAX_M_DOUBLINGS = 2
SMALL_M = 64  # up to this M the small-M DEFAULT applies

PARAMS = {
    "BLOCK_M": (16, 32, 64, 128, 256),
    "BLOCK_N": (32, 64, 128, 256),
    "BLOCK_K": (32, 64, 128, 256),  # int8 tl.dot needs BLOCK_K >= 32
    "GROUP_M": (1, 4, 8, 16),
    "SPLIT_K": (1, 2, 4, 8, 16),
    "num_warps": (2, 4, 8),
    "num_stages": (2, 3, 4, 5),
}


def shared_memory(config: Mapping[str, int], shape: tuple[int, ...] | None = None) -> SharedMemory:
    """Shared memory per block of `int8_gemm_kernel` at any shape (kernels/common/shared_memory.py's model).

    A stage holds the int8 tiles A [BLOCK_M, BLOCK_K] and B [BLOCK_K, BLOCK_N]; the epilogue
    converts the [BLOCK_M, BLOCK_N] int32 accumulator (or its float32 dequantised form), whatever
    the output dtype, so the estimate holds for all four. Measured (Triton 3.9, 128 x 128 x 64,
    3 stages, 8 warps): 66560 B on sm_90 (three copies of A and B, 48 KiB, under the epilogue's
    64 KiB, plus 1 KiB static) and 32768 B on sm_80 (two copies): the estimate, 66560 B, is exact
    for sm_90. The split-K epilogue kernel needs at most 2 KiB.
    """
    return gemm_tiles(config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], num_stages=config["num_stages"],
                      num_warps=config["num_warps"], operand_bytes=1)


SPACE = SearchSpace(
    params=PARAMS,
    constraints=(*gemm_constraints(PARAMS, shared_memory, accumulator="int32"),
                 splits_have_work("SPLIT_K", "BLOCK_K", axis=2, axis_name="K")),
)

DEFAULT_SMALL_M = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "SPLIT_K": 1,
                   "num_warps": 4, "num_stages": 4}
DEFAULT_LARGE_M = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "SPLIT_K": 1,
                   "num_warps": 8, "num_stages": 3}
DEFAULTS = (DEFAULT_SMALL_M, DEFAULT_LARGE_M)


def default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    """The untuned fallback: correct for any shape, reasonable for decode (small M) and prefill."""
    return dict(DEFAULT_SMALL_M if shape[0] <= SMALL_M else DEFAULT_LARGE_M)


def bucket(shape: tuple[int, ...]) -> tuple[int, ...]:
    """M rounded up to a power of two; N and K exact."""
    return pow2_bucket(shape, axes=(0,))


def bucket_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float | None:
    """Doublings of M between two buckets of the same N and K (the larger M wins a tie); None if
    not reusable."""
    return doubling_distance(a, b, axes=(0,), max_doublings=MAX_M_DOUBLINGS)


# Linear layers (N, K) of y = x W^T, W [N, K]: fused QKV, attention output, fused gate+up, down.
LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LLAMA3_70B = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}


def _model_shapes(layers: Mapping[str, tuple[int, int]], ms: tuple[int, ...]) -> list[tuple[int, int, int]]:
    return [(m, n, k) for (n, k) in layers.values() for m in ms]


SHAPE_SETS = {
    # Odd sizes on every axis, every M regime; small enough for the Triton interpreter.
    "smoke": [(1, 63, 96), (7, 129, 33), (33, 17, 257), (128, 96, 130), (257, 65, 63)],
    "tune": _model_shapes(LLAMA3_8B, (1, 16, 128, 1024, 8192)) + _model_shapes(LLAMA3_70B, (1, 128, 2048)),
    "bench": _model_shapes(LLAMA3_8B, (1, 16, 128, 512, 2048, 8192)) + _model_shapes(LLAMA3_70B, (1, 128, 2048)),
}


def flops(shape: tuple[int, ...]) -> int:
    m, n, k = shape
    return 2 * m * n * k


def bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    """A and B read once, C written once (scales and bias are O(M + N), counted too)."""
    m, n, k = shape
    out_bytes = element_bytes(dtype)
    extra = 0 if dtype == "int32" else 4 * (m + n) + out_bytes * n
    return m * k + k * n + out_bytes * m * n + extra
