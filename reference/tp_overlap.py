"""Reference tensor-parallel GEMM collectives (Flux): the collective, then the GEMM, in sequence.

These are the specification of `kernelhub.ops.all_gather_gemm` and `gemm_reduce_scatter`, which
compute the same results while overlapping the communication with the GEMM. Both run on every
rank of `group` (default: the world group) with any torch.distributed backend. The collectives are
spelled as torch 2.13 names them (`all_gather_single`, `reduce_scatter_single`); on older torch
they are `all_gather_into_tensor` and `reduce_scatter_tensor`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# The single-tensor collectives, under the names torch prefers: torch 2.13 renamed
# all_gather_into_tensor and reduce_scatter_tensor to all_gather_single and reduce_scatter_single
# (the old names warn FutureWarning); the GPU machines' torch 2.11 has only the old names. The
# signature exchange of kernelhub.kernels.tp_overlap.ops and the benchmarks use these too.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_gemm(a: torch.Tensor, b, *, group=None, return_gathered: bool = False):
    """`all_gather(a) @ b`: the column-parallel layer's forward.

    a: [M_local, K], this rank's rows; b: [K, N], or a list of [K, N_i] that share one gather
    (a fused QKV or gate + up projection). Returns [W * M_local, N] (rank r's rows at
    r * M_local), or the list of [W * M_local, N_i] for a list, and the gathered `a`
    [W * M_local, K] too when `return_gathered`. Equivalent to::

        gathered = torch.empty(W * M_local, K, dtype=a.dtype, device=a.device)
        dist.all_gather_single(gathered, a.contiguous(), group=group)
        out = gathered @ b                      # a list: [gathered @ b_i for b_i in b]
    """
    world = dist.get_world_size(group)
    gathered = torch.empty(world * a.shape[0], a.shape[1], dtype=a.dtype, device=a.device)
    all_gather_single(gathered, a.contiguous(), group=group)
    out = gathered @ b if isinstance(b, torch.Tensor) else [gathered @ b_i for b_i in b]
    return (out, gathered) if return_gathered else out


def gemm_reduce_scatter(a: torch.Tensor, b: torch.Tensor, *, group=None) -> torch.Tensor:
    """This rank's rows of `sum over ranks of a @ b`: the row-parallel layer's forward.

    a: [M, K_local], b: [K_local, N], with M divisible by W. Returns [M / W, N]: rows
    r * M / W ... (r + 1) * M / W of the sum, on rank r. Equivalent to::

        partial = a @ b
        out = torch.empty(M // W, N, dtype=partial.dtype, device=partial.device)
        dist.reduce_scatter_single(out, partial, group=group)
    """
    world = dist.get_world_size(group)
    partial = a @ b
    out = torch.empty(a.shape[0] // world, b.shape[1], dtype=partial.dtype, device=partial.device)
    reduce_scatter_single(out, partial, group=group)
    return out


def gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a [M, K] @ b [K, N]`, accumulated in float32, rounded once to a's dtype: the chunk GEMM."""
    return (a.float() @ b.float()).to(a.dtype)
