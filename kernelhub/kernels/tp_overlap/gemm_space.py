"""`tp_gemm`, the chunk GEMM of the overlapped collectives: search space, DEFAULTs, shape sets, buckets.

Constraints: kernels/common/constraints.py's set for a tiled GEMM (shared memory, the float32
accumulator's registers, blocks against the padded problem).

Shared memory: kernels/common/shared_memory.py's model via `shared_memory` (the larger of the
pipeline's stages and the epilogue's layout conversion, + 1 KiB static). Margin, held against the
compiler on sm_80 and sm_90 by tests/test_compile_agreement.py: never below its figure; at most
one stage + 1 KiB above it where the stages decide, three quarters of the epilogue + 1 KiB where
that does. Operands are counted as float32, the widest dtype, so a config the space accepts fits
in every dtype; DEFAULTs depend on the dtype where float32's FMA dots need a smaller K step.
"""

from __future__ import annotations

from collections.abc import Mapping

from kernelhub.kernels.common.buckets import doubling_distance, pow2_bucket
from kernelhub.kernels.common.constraints import gemm_constraints
from kernelhub.kernels.common.shared_memory import SharedMemory, gemm_tiles
from kernelhub.kernels.common.sizes import element_bytes
from kernelhub.kernels.tp_overlap.space import DTYPES, LLAMA3_70B_TP8_COLUMN, LLAMA3_70B_TP8_ROW, MAX_M_DOUBLINGS  # noqa: F401
from kernelhub.space import SearchSpace

SHAPE_NAMES = ("M", "N", "K")
PARAMS = {
    "BLOCK_M": (16, 32, 64, 128, 256),
    "BLOCK_N": (32, 64, 128, 256),
    "BLOCK_K": (16, 32, 64, 128),  # 16-bit tl.dot needs K >= 16
    "GROUP_M": (1, 8),
    "num_warps": (2, 4, 8),
    "num_stages": (2, 3, 4, 5),
}
# Bytes per operand element the shared-memory constraint assumes: float32, the widest dtype, so a
# config the space accepts fits the device in every dtype (the constraints see no dtype). With 2
# bytes, as before, float32 configs the space accepted needed up to twice the device's limit
# (sm_90: 295936 B of 232448; `kernelhub compile` refused them).
OPERAND_BYTES = element_bytes("float32")


def shared_memory(config: Mapping[str, int], shape: tuple[int, ...] | None = None) -> SharedMemory:
    """Shared memory per block of `gemm_kernel` at any shape (kernels/common/shared_memory.py's
    model): a stage holds A [BLOCK_M, BLOCK_K] and B [BLOCK_K, BLOCK_N]; the epilogue converts the
    [BLOCK_M, BLOCK_N] tile after its cast to the output dtype, 2 bytes where tensor cores computed
    it. Measured (Triton 3.9, 128 x 128 x 32, 3 stages, 8 warps, bfloat16): 50176 B on sm_90
    (three copies, 48 KiB, + 1 KiB static), 32768 B on sm_80 (two)."""
    return gemm_tiles(config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], num_stages=config["num_stages"],
                      num_warps=config["num_warps"], operand_bytes=OPERAND_BYTES, output_bytes=2)


SPACE = SearchSpace(params=PARAMS, constraints=gemm_constraints(PARAMS, shared_memory, accumulator="float32"))

SMALL_M = 64  # up to this many rows per chunk the small-M DEFAULT applies
DEFAULT_SMALL_M = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
DEFAULT_LARGE_M = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
# float32 operands multiply on FMA units, whose dot keeps operand fragments in registers: the
# 16-bit tile takes all 255 registers on sm_80 (Triton 3.9); a K step of 16 leaves 228.
DEFAULT_LARGE_M_FP32 = dict(DEFAULT_LARGE_M, BLOCK_K=16)
DEFAULTS = (DEFAULT_SMALL_M, DEFAULT_LARGE_M, DEFAULT_LARGE_M_FP32)


def default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    """Correct for any shape; within every GPU's shared memory (the estimate is float32's); no
    spills on sm_80 or sm_90 in any dtype (`kernelhub compile`)."""
    if shape[0] <= SMALL_M:
        return dict(DEFAULT_SMALL_M)
    return dict(DEFAULT_LARGE_M_FP32 if dtype == "float32" else DEFAULT_LARGE_M)


def bucket(shape: tuple[int, ...]) -> tuple[int, ...]:
    """M rounded up to a power of two; N and K exact."""
    return pow2_bucket(shape, axes=(0,))


def bucket_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float | None:
    """Doublings of M between buckets of the same N and K (the larger M wins a tie); None if not reusable."""
    return doubling_distance(a, b, axes=(0,), max_doublings=MAX_M_DOUBLINGS)


def flops(shape: tuple[int, ...]) -> int:
    m, n, k = shape
    return 2 * m * n * k


def bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    m, n, k = shape
    return element_bytes(dtype) * (m * k + k * n + m * n)


SHAPE_SETS = {
    "smoke": [(1, 63, 96), (7, 129, 33), (63, 17, 257), (129, 96, 40)],
    # Chunks of the collectives' bench shapes: 4096 tokens over 8 ranks in 1 to 8 chunks per rank.
    "tune": [(m, n, k) for (n, k) in (*LLAMA3_70B_TP8_COLUMN.values(), *LLAMA3_70B_TP8_ROW.values())
             for m in (64, 128, 256, 512)],
    "bench": [(m, n, k) for (n, k) in (*LLAMA3_70B_TP8_COLUMN.values(), *LLAMA3_70B_TP8_ROW.values())
              for m in (64, 512, 4096)],
}
