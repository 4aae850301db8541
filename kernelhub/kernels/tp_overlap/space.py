"""Tensor-parallel overlap (Flux): what the spaces of its three specs share.

- `tp_gemm` (gemm_space.py): the Triton chunk GEMM alone, shapes (M, N, K) of `[M, K] @ [K, N]`;
  its block config is tuned per chunk shape, like any GEMM, and the collectives look it up for
  each chunk they launch.
- `all_gather_gemm` (all_gather_space.py): shapes (W, M_local, N, K), the op's arguments
  `a [M_local, K]`, `b [K, N]` on W ranks; tunables CHUNKS (pieces each rank's rows are sent in)
  and ORDER (in which order the chunks of the other ranks are consumed).
- `gemm_reduce_scatter` (reduce_scatter_space.py): shapes (W, M, N, K_local), the arguments
  `a [M, K_local]`, `b [K_local, N]`; tunable CHUNKS (pieces each destination's partial is
  computed and sent in).

Buckets keep W, N and K exact and round the row count up to a power of two; a call reuses a
bucket of the same W, N and K at most two doublings of M away (the larger M on a tie).
"""

from __future__ import annotations

from kernelhub.kernels.common.buckets import doubling_distance, pow2_bucket

DTYPES = ("bfloat16", "float16", "float32")
MAX_M_DOUBLINGS = 2

# Tensor-parallel layer shapes (TP = 8) of Llama-3-70B: hidden 8192, fused QKV 10240, MLP 28672.
# Column-parallel (all_gather_gemm): N is the layer's output width / TP, K = hidden.
# Row-parallel (gemm_reduce_scatter): K_local is the input width / TP, N = hidden.
LLAMA3_70B_TP8_COLUMN = {"qkv": (10240 // 8, 8192), "gate_up": (2 * 28672 // 8, 8192)}
LLAMA3_70B_TP8_ROW = {"o": (8192, 8192 // 8), "down": (8192, 28672 // 8)}

# -- the collectives: chunking -------------------------------------------------------------------

CHUNK_CHOICES = (1, 2, 4, 8)


def chunks_fit_rows(rows_of):
    """The constraint that CHUNKS is at most `rows_of(shape)`, the rows each rank sends."""
    def chunks_fit_rows(config, shape, smem_bytes):
        rows = rows_of(shape)
        if config["CHUNKS"] > rows:
            return f"CHUNKS={config['CHUNKS']} exceeds the {rows} rows each rank sends"
        return None
    return chunks_fit_rows


def collective_bucket(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(W, rows, N, K) with the rows rounded up to a power of two."""
    return pow2_bucket(shape, axes=(1,))


def collective_bucket_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float | None:
    """Doublings of the rows between buckets of the same W, N and K; None if not reusable."""
    return doubling_distance(a, b, axes=(1,), max_doublings=MAX_M_DOUBLINGS)


def world_size(shape: tuple[int, ...]) -> int:
    return shape[0]
