"""`gemm_reduce_scatter`: chunking of the overlapped reduce-scatter (space.py has the family's
overview and the collectives' buckets)."""

from __future__ import annotations

from kernelhub.kernels.common.sizes import element_bytes
from kernelhub.kernels.tp_overlap import gemm_space
from kernelhub.kernels.tp_overlap.space import (CHUNK_CHOICES, DTYPES, LLAMA3_70B_TP8_ROW,  # noqa: F401
                                                chunks_fit_rows, world_size)
from kernelhub.kernels.tp_overlap.space import collective_bucket as bucket  # noqa: F401
from kernelhub.kernels.tp_overlap.space import collective_bucket_distance as bucket_distance  # noqa: F401
from kernelhub.space import SearchSpace

SHAPE_NAMES = ("W", "M", "N", "K_local")

SPACE = SearchSpace(params={"CHUNKS": CHUNK_CHOICES},
                    constraints=(chunks_fit_rows(lambda shape: shape[1] // shape[0]),))

DEFAULT = {"CHUNKS": 2}
# Every distinct DEFAULT: one row per destination leaves a single chunk.
DEFAULTS = (DEFAULT, dict(DEFAULT, CHUNKS=1))


def default_config(shape: tuple[int, ...], dtype: str) -> dict[str, int]:
    """Two chunks per destination: overlaps on every shape, and fits any M / W."""
    return dict(DEFAULT, CHUNKS=min(DEFAULT["CHUNKS"], shape[1] // shape[0]))


def flops(shape: tuple[int, ...]) -> int:
    world, m, n, k_local = shape
    return 2 * m * n * k_local


def bytes_moved(shape: tuple[int, ...], dtype: str) -> int:
    """One rank's memory traffic: its GEMM's operands and output, plus the partials it receives."""
    world, m, n, k_local = shape
    return gemm_space.bytes_moved((m, n, k_local), dtype) + element_bytes(dtype) * (world - 1) * (m // world) * n


SHAPE_SETS = {
    "smoke": [(2, 14, 13, 24), (3, 15, 33, 17), (2, 2, 63, 9)],
    "tune": [(2, 512, 1024, 64), (2, 1024, 2048, 64)],
    "bench": [(8, m, n, k) for (n, k) in LLAMA3_70B_TP8_ROW.values() for m in (512, 4096)],
}
