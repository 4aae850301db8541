"""RMSNorm + int8 quantisation: search space, DEFAULTs, shape sets, shape buckets.

Shapes are (M, K, residual): `x [M, K]` (tokens by hidden size), and residual 1 when a residual is
added first (the fused add + norm of every transformer block after the first), else 0. The model
fixes K and which norm it is; M varies per call, so the database buckets M by powers of two and
keeps K and residual exact. The dtype axis is x's dtype.

Nearest-bucket rule (when no config is stored for a call's own bucket): among tuned buckets with
the same K, residual and dtype, the one whose M bucket is fewest doublings away, at most
`MAX_M_DOUBLINGS`; on a tie, the larger M.

Tunables (see kernel.py): BLOCK_K columns per step of the second pass (the first always steps
by the reference's LANES = 1024 columns) and num_warps; a program normalises one row (vLLM's
RMSNorm kernels likewise give each token one thread block). num_stages is not tuned: the loops
load no tl.dot operands, which is what Triton's software pipeliner stages, and the launcher
passes num_stages=1. Several rows per program were tried and dropped: at BLOCK_M = 2 and 4 most
configs needed all 255 registers and spilled (Triton 3.9, sm_80 and sm_90), and one row of a
real model (K >= 2048) is two or more LANES steps of work already.

Registers: the first pass keeps two float32 [LANES] accumulators (the lanes' sums of squares and
the max of |h * weight|), the second a [BLOCK_K] tile: at most 16 + 32 values per thread with 4
warps. Every config of the space compiles without spills on sm_80 and sm_90 under Triton 3.9
and 3.6, in every dtype (32 to 64 registers at (8192, 4096, 1), (16, 4096, 1) and (1, 8192, 0)).
Other warp counts were dropped: 2 warps spilled under Triton 3.6 (sm_90, float16 with a
residual, BLOCK_K = 1024: 8 B), 16 on sm_80 whatever the tile (128 registers per thread at
most). Shared memory: only the scratch of layout changes, 5 KiB at most (`shared_memory`).
"""

from __future__ import annotations

from collections.abc import Mapping

from kernelhub.kernels.common.buckets import doubling_distance, pow2_bucket
from kernelhub.kernels.common.constraints import blocks_fit_problem
from kernelhub.kernels.common.shared_memory import SharedMemory, fits
from kernelhub.kernels.common.sizes import element_bytes
from kernelhub.reference.rmsnorm_quant import LANES
from kernelhub.space import SearchSpace

SHAPE_NAMES = ("M", "K", "residual")
DTYPES = ("bfloat16", "float16", "float32")

MAX_M_DOUBLINGS = 2

PARAMS = {
    "BLOCK_K": (256, 512, 1024, 2048, 4096),
    "num_warps": (4, 8),
}


def shared_memory(config: Mapping[str, int], shape: tuple[int, ...] | None = None) -> SharedMemory:
    """Shared memory per block (kernels/common/shared_memory.py's model): no pipeline stages, only
    the scratch of layout changes (the pairwise tree over the lanes, the reductions after pass 1),
    bounded by one float32 copy of the [LANES] accumulator and counted in full as the scratch
    allowance. Measured over every config of the space at (8192, 4096, 1), (16, 4096, 1) and
    (1, 8192, 0), sm_80 and sm_90, every dtype, Triton 3.9 and 3.6: 0.5 to 5 KiB, whatever
    BLOCK_K; the bound, 4 KiB + 1 KiB static, is reached by the DEFAULT in float32 on sm_90."""
    scratch = LANES * 4
    return SharedMemory(stage=0, num_stages=1, resident=scratch, scratch_allowance=scratch)


def _fits_shared_memory(config, shape, smem_bytes):
    return fits(shared_memory(config, shape), smem_bytes)


SPACE = SearchSpace(
    params=PARAMS,
    constraints=(_fits_shared_memory, blocks_fit_problem(PARAMS, lambda shape: {"BLOCK_K": shape[1]})),
)

# 1024 columns per step in both passes, 8 per thread (16-byte loads of 16-bit rows). M programs
# fill a GPU from M of a few hundred on; a decode step's few rows are latency-bound whatever the config.
DEFAULT = {"BLOCK_K": 1024, "num_warps": 4}
DEFAULTS = (DEFAULT,)


def default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    """The untuned fallback: correct for any shape (K is looped over, M spread over programs)."""
    return dict(DEFAULT)


def bucket(shape: tuple[int, ...]) -> tuple[int, ...]:
    """M rounded up to a power of two; K and residual exact."""
    return pow2_bucket(shape, axes=(0,))


def bucket_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float | None:
    """Doublings of M between two buckets of the same K and residual (the larger M wins a tie);
    None if not reusable."""
    return doubling_distance(a, b, axes=(0,), max_doublings=MAX_M_DOUBLINGS)


# Hidden sizes of the models the tune and bench sets use.
LLAMA3_8B_HIDDEN = 4096
LLAMA3_70B_HIDDEN = 8192


def _model_shapes(hidden: int, ms: tuple[int, ...]) -> list[tuple[int, int, int]]:
    return [(m, hidden, residual) for residual in (0, 1) for m in ms]


SHAPE_SETS = {
    # Odd M and K (K of 1, below, at and above one LANES step, not a multiple of it), with and
    # without a residual; small enough for the Triton interpreter.
    "smoke": [(1, 1, 0), (7, 7, 1), (63, 1000, 0), (129, 129, 1), (1, 4096, 1), (5, 4100, 0)],
    "tune": (_model_shapes(LLAMA3_8B_HIDDEN, (1, 16, 128, 1024, 8192))
             + _model_shapes(LLAMA3_70B_HIDDEN, (1, 128, 2048))),
    "bench": (_model_shapes(LLAMA3_8B_HIDDEN, (1, 16, 128, 512, 2048, 8192))
              + _model_shapes(LLAMA3_70B_HIDDEN, (1, 128, 2048))),
}


def flops(shape: tuple[int, ...]) -> int:
    """Per element: the square and its sum, h * weight, * r, the division by the scale (and the add)."""
    m, k, residual = shape
    return (5 + residual) * m * k


def bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    """x (and the residual) read once, h written once with a residual, q and the scales written,
    the weight read once (its second pass and the rows' second reads are cache hits)."""
    m, k, residual = shape
    element = element_bytes(dtype)
    return (1 + 2 * residual) * m * k * element + m * k + 4 * m + k * element
