"""`all_gather_gemm`: chunking and order of the overlapped gather (space.py has the family's
overview and the collectives' buckets)."""

from __future__ import annotations

from kernelhub.kernels.common.sizes import element_bytes
from kernelhub.kernels.tp_overlap import gemm_space
from kernelhub.kernels.tp_overlap.space import (CHUNK_CHOICES, DTYPES, LLAMA3_70B_TP8_COLUMN,  # noqa: F401
                                                chunks_fit_rows, world_size)
from kernelhub.kernels.tp_overlap.space import collective_bucket as bucket  # noqa: F401
from kernelhub.kernels.tp_overlap.space import collective_bucket_distance as bucket_distance  # noqa: F401
from kernelhub.space import SearchSpace

SHAPE_NAMES = ("W", "M_local", "N", "K")
# ORDER, the order in which rank r consumes the other ranks' chunks (overlap.all_gather_gemm):
# PEER_MAJOR = every chunk of rank r-1, then of r-2, ... (the ring order); CHUNK_MAJOR = chunk 0
# of every other rank, then chunk 1, ...
PEER_MAJOR, CHUNK_MAJOR = ORDER_CHOICES = (0, 1)


def _order_matters(config, shape, smem_bytes):
    world = shape[0]
    if config["ORDER"] == CHUNK_MAJOR and (world <= 2 or config["CHUNKS"] == 1):
        return "ORDER=1 (chunk-major) is the same schedule as ORDER=0 with one peer or one chunk"
    return None


SPACE = SearchSpace(params={"CHUNKS": CHUNK_CHOICES, "ORDER": ORDER_CHOICES},
                    constraints=(chunks_fit_rows(lambda shape: shape[1]), _order_matters))

DEFAULT = {"CHUNKS": 2, "ORDER": PEER_MAJOR}
# Every distinct DEFAULT: one row per rank leaves a single chunk.
DEFAULTS = (DEFAULT, dict(DEFAULT, CHUNKS=1))


def default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    """Two chunks per rank, ring order: overlaps on every shape, and fits any M_local."""
    return dict(DEFAULT, CHUNKS=min(DEFAULT["CHUNKS"], shape[1]))


def flops(shape: tuple[int, ...]) -> int:
    """One rank's GEMM: [W * M_local, K] @ [K, N]."""
    world, m_local, n, k = shape
    return 2 * world * m_local * n * k


def bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    """One rank's memory traffic: its GEMM's operands and output, plus the rows it receives."""
    world, m_local, n, k = shape
    return gemm_space.bytes_moved((world * m_local, n, k), dtype) + element_bytes(dtype) * (world - 1) * m_local * k


SHAPE_SETS = {
    # Odd sizes (M_local, N, K never multiples of a block), W = 2 and 3, run on local ranks.
    "smoke": [(2, 7, 13, 24), (3, 5, 33, 17), (2, 1, 63, 9)],
    # CPU/gloo scale, where one rank's GEMM and its communication take similar time (see
    # benchmarks/cpu_tp_overlap.py); `kernelhub tune --gpu cpu` tunes these.
    "tune": [(2, 256, 64, 1024), (2, 512, 64, 2048)],
    "bench": [(8, m // 8, n, k) for (n, k) in LLAMA3_70B_TP8_COLUMN.values() for m in (512, 4096)],
}
