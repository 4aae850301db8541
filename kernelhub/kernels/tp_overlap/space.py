"""Tensor-parallel overlap (Flux): search spaces, DEFAULTs, shape sets and buckets of three specs.

- `tp_gemm`: the Triton chunk GEMM alone, shapes (M, N, K) of `[M, K] @ [K, N]`; its block config
  is tuned per chunk shape, like any GEMM, and the collectives look it up for each chunk they launch.
- `all_gather_gemm`: shapes (W, M_local, N, K), the op's arguments `a [M_local, K]`, `b [K, N]` on
  W ranks; tunables CHUNKS (pieces each rank's rows are sent in) and ORDER (in which order the
  chunks of the other ranks are consumed).
- `gemm_reduce_scatter`: shapes (W, M, N, K_local), the arguments `a [M, K_local]`, `b [K_local, N]`;
  tunable CHUNKS (pieces each destination's partial is computed and sent in).

Buckets keep W, N and K exact and round the row count up to a power of two; a call reuses a
bucket of the same W, N and K at most two doublings of M away (the larger M on a tie).

Shared memory: kernels/common/shared_memory.py's model via `gemm_shared_memory` (the larger of
the pipeline's stages and the epilogue's layout conversion, + 1 KiB static). Margin, held against
the compiler on sm_80 and sm_90 by tests/test_compile_agreement.py: never below its figure; at most
one stage + 1 KiB above it where the stages decide, three quarters of the epilogue + 1 KiB where
that does. Operands are counted as float32, the widest dtype, so a config the space accepts fits in every
dtype; DEFAULTs depend on the dtype where float32's FMA dots need a smaller K step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from kernelhub.kernels.common.shared_memory import SharedMemory, epilogue_bytes, fits
from kernelhub.space import SearchSpace

DTYPES = ("bfloat16", "float16", "float32")
MAX_M_DOUBLINGS = 2

# -- tp_gemm: the chunk GEMM's block config ------------------------------------------------------

GEMM_SHAPE_NAMES = ("M", "N", "K")
GEMM_PARAMS = {
    "BLOCK_M": (16, 32, 64, 128, 256),
    "BLOCK_N": (32, 64, 128, 256),
    "BLOCK_K": (16, 32, 64, 128),  # 16-bit tl.dot needs K >= 16
    "GROUP_M": (1, 8),
    "num_warps": (2, 4, 8),
    "num_stages": (2, 3, 4, 5),
}
# float32 accumulator registers per thread above which the tile spills.
MAX_ACC_REGS_PER_THREAD = 128
# Bytes per operand element the shared-memory constraint assumes: float32, the widest dtype, so a
# config the space accepts fits the device in every dtype (the constraints see no dtype). With 2
# bytes, as before, float32 configs the space accepted needed up to twice the device's limit
# (sm_90: 295936 B of 232448; `kernelhub compile` refused them).
OPERAND_BYTES = 4


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def gemm_shared_memory(config: Mapping[str, int], operand_bytes: int = OPERAND_BYTES) -> SharedMemory:
    """Shared memory per block of `gemm_kernel` (kernels/common/shared_memory.py's model): a stage
    holds A [BLOCK_M, BLOCK_K] and B [BLOCK_K, BLOCK_N]; the epilogue converts the [BLOCK_M, BLOCK_N]
    tile after its cast to the output dtype, 2 bytes where tensor cores computed it. Measured
    (Triton 3.9, 128 x 128 x 32, 3 stages, 8 warps, bfloat16): 50176 B on sm_90 (three copies,
    48 KiB, + 1 KiB static), 32768 B on sm_80 (two)."""
    stage = (config["BLOCK_M"] * config["BLOCK_K"] + config["BLOCK_K"] * config["BLOCK_N"]) * operand_bytes
    epilogue = epilogue_bytes(config["BLOCK_M"], config["BLOCK_N"], config["num_warps"], element_bytes=2)
    return SharedMemory(stage=stage, num_stages=config["num_stages"], epilogue=epilogue)


def gemm_shared_memory_bytes(config: Mapping[str, int], operand_bytes: int = OPERAND_BYTES) -> int:
    return gemm_shared_memory(config, operand_bytes).bytes


def _fits_shared_memory(config, shape, smem_bytes):
    return fits(gemm_shared_memory(config), smem_bytes)


def _accumulator_fits_registers(config, shape, smem_bytes):
    per_thread = config["BLOCK_M"] * config["BLOCK_N"] // (32 * config["num_warps"])
    if per_thread > MAX_ACC_REGS_PER_THREAD:
        return (f"float32 accumulator needs {per_thread} registers per thread with {config['num_warps']} "
                f"warps (> {MAX_ACC_REGS_PER_THREAD})")
    return None


def _tiles_fit_problem(config, shape, smem_bytes):
    m, n, k = shape
    for name, size in (("BLOCK_M", max(16, _next_pow2(m))), ("BLOCK_N", max(32, _next_pow2(n))),
                       ("BLOCK_K", max(16, _next_pow2(k)))):
        if config[name] > size:
            return f"{name}={config[name]} exceeds the padded problem size {size}"
    return None


GEMM_SPACE = SearchSpace(params=GEMM_PARAMS,
                         constraints=(_fits_shared_memory, _accumulator_fits_registers, _tiles_fit_problem))

SMALL_M = 64  # up to this many rows per chunk the small-M DEFAULT applies
GEMM_DEFAULT_SMALL_M = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
GEMM_DEFAULT_LARGE_M = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
# float32 operands multiply on FMA units, whose dot keeps operand fragments in registers: the
# 16-bit tile takes all 255 registers on sm_80 (Triton 3.9); a K step of 16 leaves 228.
GEMM_DEFAULT_LARGE_M_FP32 = dict(GEMM_DEFAULT_LARGE_M, BLOCK_K=16)
GEMM_DEFAULTS = (GEMM_DEFAULT_SMALL_M, GEMM_DEFAULT_LARGE_M, GEMM_DEFAULT_LARGE_M_FP32)


def gemm_default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    """Correct for any shape; within every GPU's shared memory (the estimate is float32's); no
    spills on sm_80 or sm_90 in any dtype (`kernelhub compile`)."""
    if shape[0] <= SMALL_M:
        return dict(GEMM_DEFAULT_SMALL_M)
    return dict(GEMM_DEFAULT_LARGE_M_FP32 if dtype == "float32" else GEMM_DEFAULT_LARGE_M)


def gemm_bucket(shape: tuple[int, ...]) -> tuple[int, ...]:
    m, n, k = shape
    return (_next_pow2(m), n, k)


def _m_distance(a_m: int, b_m: int) -> float | None:
    """Doublings between two row buckets, None beyond MAX_M_DOUBLINGS; the larger wins a tie."""
    doublings = abs(math.log2(a_m) - math.log2(b_m))
    if doublings > MAX_M_DOUBLINGS:
        return None
    return doublings - (0.25 if b_m > a_m else 0.0)


def gemm_bucket_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float | None:
    return _m_distance(a[0], b[0]) if a[1:] == b[1:] else None


def gemm_flops(shape: tuple[int, ...]) -> int:
    m, n, k = shape
    return 2 * m * n * k


ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def gemm_bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    m, n, k = shape
    return ELEMENT_BYTES[dtype] * (m * k + k * n + m * n)


# Tensor-parallel layer shapes (TP = 8) of Llama-3-70B: hidden 8192, fused QKV 10240, MLP 28672.
# Column-parallel (all_gather_gemm): N is the layer's output width / TP, K = hidden.
# Row-parallel (gemm_reduce_scatter): K_local is the input width / TP, N = hidden.
LLAMA3_70B_TP8_COLUMN = {"qkv": (10240 // 8, 8192), "gate_up": (2 * 28672 // 8, 8192)}
LLAMA3_70B_TP8_ROW = {"o": (8192, 8192 // 8), "down": (8192, 28672 // 8)}

GEMM_SHAPE_SETS = {
    "smoke": [(1, 63, 96), (7, 129, 33), (63, 17, 257), (129, 96, 40)],
    # Chunks of the collectives' bench shapes: 4096 tokens over 8 ranks in 1 to 8 chunks per rank.
    "tune": [(m, n, k) for (n, k) in (*LLAMA3_70B_TP8_COLUMN.values(), *LLAMA3_70B_TP8_ROW.values())
             for m in (64, 128, 256, 512)],
    "bench": [(m, n, k) for (n, k) in (*LLAMA3_70B_TP8_COLUMN.values(), *LLAMA3_70B_TP8_ROW.values())
              for m in (64, 512, 4096)],
}

# -- the collectives: chunking and order -------------------------------------------------------

SHAPE_NAMES_AG = ("W", "M_local", "N", "K")
SHAPE_NAMES_RS = ("W", "M", "N", "K_local")
CHUNK_CHOICES = (1, 2, 4, 8)
# ORDER of all_gather_gemm: 0 = peer-major (every chunk of rank r-1, then of r-2, ...: the ring
# order); 1 = chunk-major (chunk 0 of every other rank, then chunk 1, ...).
ORDER_CHOICES = (0, 1)
PEER_MAJOR, CHUNK_MAJOR = ORDER_CHOICES


def _chunks_fit_rows(rows_of):
    def constraint(config, shape, smem_bytes):
        rows = rows_of(shape)
        if config["CHUNKS"] > rows:
            return f"CHUNKS={config['CHUNKS']} exceeds the {rows} rows each rank sends"
        return None
    constraint.__qualname__ = "chunks_fit_rows"
    return constraint


def _order_matters(config, shape, smem_bytes):
    world = shape[0]
    if config["ORDER"] == CHUNK_MAJOR and (world <= 2 or config["CHUNKS"] == 1):
        return "ORDER=1 (chunk-major) is the same schedule as ORDER=0 with one peer or one chunk"
    return None


AG_SPACE = SearchSpace(params={"CHUNKS": CHUNK_CHOICES, "ORDER": ORDER_CHOICES},
                       constraints=(_chunks_fit_rows(lambda shape: shape[1]), _order_matters))
RS_SPACE = SearchSpace(params={"CHUNKS": CHUNK_CHOICES},
                       constraints=(_chunks_fit_rows(lambda shape: shape[1] // shape[0]),))

AG_DEFAULT = {"CHUNKS": 2, "ORDER": PEER_MAJOR}
RS_DEFAULT = {"CHUNKS": 2}
# Every distinct DEFAULT: one row per rank (or per destination) leaves a single chunk.
AG_DEFAULTS = (AG_DEFAULT, dict(AG_DEFAULT, CHUNKS=1))
RS_DEFAULTS = (RS_DEFAULT, dict(RS_DEFAULT, CHUNKS=1))


def ag_default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    """Two chunks per rank, ring order: overlaps on every shape, and fits any M_local."""
    return dict(AG_DEFAULT, CHUNKS=min(AG_DEFAULT["CHUNKS"], shape[1]))


def rs_default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    return dict(RS_DEFAULT, CHUNKS=min(RS_DEFAULT["CHUNKS"], shape[1] // shape[0]))


def collective_bucket(shape: tuple[int, ...]) -> tuple[int, ...]:
    world, rows, n, k = shape
    return (world, _next_pow2(rows), n, k)


def collective_bucket_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float | None:
    same = a[0] == b[0] and a[2:] == b[2:]
    return _m_distance(a[1], b[1]) if same else None


def world_size(shape: tuple[int, ...]) -> int:
    return shape[0]


def ag_flops(shape: tuple[int, ...]) -> int:
    """One rank's GEMM: [W * M_local, K] @ [K, N]."""
    world, m_local, n, k = shape
    return 2 * world * m_local * n * k


def ag_bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    """One rank's memory traffic: its GEMM's operands and output, plus the rows it receives."""
    world, m_local, n, k = shape
    return gemm_bytes_moved((world * m_local, n, k), dtype) + ELEMENT_BYTES[dtype] * (world - 1) * m_local * k


def rs_flops(shape: tuple[int, ...]) -> int:
    world, m, n, k_local = shape
    return 2 * m * n * k_local


def rs_bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    world, m, n, k_local = shape
    return gemm_bytes_moved((m, n, k_local), dtype) + ELEMENT_BYTES[dtype] * (world - 1) * (m // world) * n


# Smoke: odd sizes (M_local, N, K never multiples of a block), W = 2 and 3, run on local ranks.
AG_SHAPE_SETS = {
    "smoke": [(2, 7, 13, 24), (3, 5, 33, 17), (2, 1, 63, 9)],
    # CPU/gloo scale, where one rank's GEMM and its communication take similar time (see
    # benchmarks/cpu_tp_overlap.py); `kernelhub tune --gpu cpu` tunes these.
    "tune": [(2, 256, 64, 1024), (2, 512, 64, 2048)],
    "bench": [(8, m // 8, n, k) for (n, k) in LLAMA3_70B_TP8_COLUMN.values() for m in (512, 4096)],
}
RS_SHAPE_SETS = {
    "smoke": [(2, 14, 13, 24), (3, 15, 33, 17), (2, 2, 63, 9)],
    "tune": [(2, 512, 1024, 64), (2, 1024, 2048, 64)],
    "bench": [(8, m, n, k) for (n, k) in LLAMA3_70B_TP8_ROW.values() for m in (512, 4096)],
}
