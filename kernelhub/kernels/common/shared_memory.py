"""The shared memory a Triton tile kernel asks for: the one model every family's constraint uses.

Derived from what the compiler reports (`kernelhub compile`, Triton 3.6 and 3.9, sm_80 and sm_90;
figures in docs/compile.md). A kernel whose loop loads operand tiles for `tl.dot` needs

    need = max(pipeline, epilogue) + STATIC_BYTES
    pipeline = num_stages * stage + resident

- stage: the bytes of one iteration's operand tiles. Software pipelining keeps several copies of
  them in shared memory, filled by asynchronous copies while the dot works on an older one.
  Hopper's warpgroup MMA (`wgmma`) reads its operands from shared memory, so sm_90 keeps
  num_stages copies where it uses wgmma; `mma.sync` (sm_80, and sm_90 for tiles wgmma cannot
  take: BLOCK_M < 64, or float32 operands, which use FMA) first loads a copy into registers and
  keeps num_stages - 1. The model counts num_stages: exact under wgmma, one stage over elsewhere.
  (A loop whose loads cannot be vectorised to at least 4 bytes per thread, e.g. int8 rows whose
  stride is not a multiple of 4, is not pipelined at all: one copy.)
- resident: what stays in shared memory for the whole loop besides the pipeline: a tile loaded
  once before it (the query tile of landmark_topk), scratch of reductions in the loop body.
- epilogue: before the store, the tile changes layout through shared memory, reusing the
  pipeline's buffers (hence the max). Under wgmma a warp converts 16 rows at a time, so the
  scratch is min(rows, 16 * num_warps) rows of the tile (measured exactly: int8 GEMM 128 x 128,
  int32, 8 warps: 64 KiB; 4 warps: 32 KiB); mma.sync and FMA dots need less. Its elements are
  the accumulator's 4 bytes, or 2 where the kernel casts the tile to its 16-bit output first (the
  tensor-core dtypes; float32 output comes from FMA dots, whose conversion needs no more).
- STATIC_BYTES: the 1 KiB of static shared memory Triton's sm_90 kernels carry (cuobjdump's
  SHARED); sm_80 kernels have none.

Example, the int8 GEMM's DEFAULT for large M (128 x 128 x 64, 3 stages, 8 warps): stage = 16 KiB,
pipeline 48 KiB, epilogue 64 KiB, so need = 65 KiB; the compiler says 66560 B on sm_90 (three
copies plus the epilogue's 64 KiB and 1 KiB static) and 32768 B on sm_80 (two copies; its
epilogue scratch is 16 KiB).

The margin, checked by tests/test_compile_agreement.py on sampled configs of every family: the
estimate is never below the compiler's figure on sm_80 or sm_90 in any dtype, and at most
`SharedMemory.margin` above the largest figure over the two targets and the dtypes at which its
terms peak (`peak_dtypes`): where the pipeline decides the estimate, one
stage + the resident scratch allowance + STATIC_BYTES (exact under wgmma); where the epilogue
decides it, three quarters of the epilogue + STATIC_BYTES (mma.sync converts as little as a
quarter of it: int8 128 x 128, 8 warps, sm_80: 16 KiB of 64).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kernelhub.kernels.common.sizes import element_bytes

STATIC_BYTES = 1024  # static shared memory of Triton's sm_90 kernels
ACCUMULATOR_BYTES = 4  # int32 and float32 accumulators alike
ROWS_PER_WARP = 16  # rows of the accumulator one warp converts per pass under wgmma


@dataclass(frozen=True)
class SharedMemory:
    """One kernel's shared-memory estimate, by part (bytes per block)."""

    stage: int  # operand tiles of one loop iteration
    num_stages: int
    resident: int = 0  # kept for the whole loop: tiles loaded once, reduction scratch
    epilogue: int = 0  # the accumulator's layout conversion before the store
    scratch_allowance: int = 0  # the part of `resident` that is an upper bound, not an exact size

    @property
    def pipeline(self) -> int:
        return max(1, self.num_stages) * self.stage + self.resident

    @property
    def bytes(self) -> int:
        """What the constraints compare with a device's limit."""
        return max(self.pipeline, self.epilogue) + STATIC_BYTES

    @property
    def margin(self) -> int:
        """How far `bytes` may lie above the compiler's figure: the pipeline copy mma.sync does not
        keep and the scratch allowance, or, where the epilogue decides, three quarters of it (mma.sync
        converts as few as a quarter of wgmma's rows per pass, and tiles below 64 rows never use
        wgmma), and the 1 KiB static that sm_80 does not reserve."""
        return max(self.stage + self.scratch_allowance, self.epilogue * 3 // 4) + STATIC_BYTES


def epilogue_bytes(rows: int, cols: int, num_warps: int, element_bytes: int = ACCUMULATOR_BYTES) -> int:
    """Scratch of the [rows, cols] tile's layout conversion before the store (see the module
    docstring): the accumulator's 4-byte elements, or `element_bytes` where the kernel casts the
    tile to a narrower output dtype first."""
    return min(rows, ROWS_PER_WARP * num_warps) * cols * element_bytes


def gemm_tiles(block_m: int, block_n: int, block_k: int, *, num_stages: int, num_warps: int, operand_bytes: int,
               output_bytes: int = ACCUMULATOR_BYTES) -> SharedMemory:
    """A loop of `acc += A [block_m, block_k] @ B [block_k, block_n]`: a stage holds both operand
    tiles of `operand_bytes` elements; the epilogue converts the [block_m, block_n] result, of
    `output_bytes` elements (the 4-byte accumulator, or 2 where the kernel casts it to a 16-bit
    output first)."""
    stage = (block_m * block_k + block_k * block_n) * operand_bytes
    return SharedMemory(stage=stage, num_stages=num_stages,
                        epilogue=epilogue_bytes(block_m, block_n, num_warps, output_bytes))


def peak_dtypes(dtypes: Sequence[str]) -> tuple[str, str]:
    """The dtypes of a kernel at which the two terms of its estimate peak: its widest dtype (the
    pipeline's operands, or the int32 output of int8 GEMM) and bfloat16 (tensor cores convert more
    in the epilogue than FMA dots). An estimate's margin is judged on the largest compiler figure
    over them."""
    widest = max(dtypes, key=element_bytes)  # the first of the widest
    return widest, "bfloat16"


def fits(need: SharedMemory, smem_bytes: int) -> str | None:
    """The constraints' wording: why `need` does not fit a device with `smem_bytes` per block, or None."""
    if need.bytes > smem_bytes:
        return f"needs {need.bytes} B of shared memory, device allows {smem_bytes} B"
    return None
