"""The public kernels: `kernelhub.ops.*`.

Each op reads straight through: validate the arguments (clear errors, before any launch) ->
choose the backend -> on the Triton path, look up the best stored config for (device, shape
bucket, dtype) -> launch.

Each family's ops live beside its kernels (`kernelhub/kernels/<family>/ops.py`); this module is
the index of what users import. Backends are chosen per call by `KERNELHUB_BACKEND`
(`kernelhub.backend`): `auto`, `triton` or `reference`.

Every op is also registered with `torch.library` (namespace `kernelhub`, with fake
implementations), so `torch.compile(fullgraph=True)` traces functions that call them without
graph breaks. Eager calls skip the dispatcher and run the implementation directly.
"""

from __future__ import annotations

from kernelhub.kernels.int8_gemm.ops import int8_gemm, int8_scaled_gemm, quantize_int8
from kernelhub.kernels.landmark_topk.ops import landmark_topk, landmarks, outlier_chunks
from kernelhub.kernels.lowrank_keys.ops import lowrank_keys, reconstruct_keys
from kernelhub.kernels.rmsnorm_quant.ops import rmsnorm_quantize_int8
from kernelhub.kernels.sparse_gather.ops import sparse_gather
from kernelhub.kernels.tp_overlap.ops import all_gather_gemm, gemm_reduce_scatter

__all__ = [
    # NGEMM: int8 GEMM, and the RMSNorm + quantisation that feeds it
    "int8_gemm", "int8_scaled_gemm", "quantize_int8", "rmsnorm_quantize_int8",
    # ShadowKV: low-rank keys, landmark chunk selection, sparse value gather
    "lowrank_keys", "reconstruct_keys", "landmarks", "outlier_chunks", "landmark_topk", "sparse_gather",
    # Flux: tensor-parallel GEMM collectives with overlapped communication (torch.distributed)
    "all_gather_gemm", "gemm_reduce_scatter",
]
