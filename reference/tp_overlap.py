"""Reference tensor-parallel GEMM collectives (Flux): the collective, then the GEMM, in sequence.

These are the specification of `kernelhub.ops.all_gather_gemm` and `gemm_reduce_scatter`, which
compute the same results while overlapping the communication with the GEMM. Both run on every
rank of `group` (default: the world group) with any torch.distributed backend.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_gemm(a: torch.Tensor, b: torch.Tensor, *, group=None,
                    return_gathered: bool = False):
    """`all_gather(a) @ b`: the column-parallel layer's forward.

    a: [M_local, K], this rank's rows; b: [K, N]. Returns [W * M_local, N] (rank r's rows at
    r * M_local), and the gathered `a` [W * M_local, K] too when `return_gathered`. Equivalent to::

        gathered = torch.empty(W * M_local, K, dtype=a.dtype, device=a.device)
        dist.all_gather_into_tensor(gathered, a.contiguous(), group=group)
        out = gathered @ b
    """
    world = dist.get_world_size(group)
    gathered = torch.empty(world * a.shape[0], a.shape[1], dtype=a.dtype, device=a.device)
    dist.all_gather_into_tensor(gathered, a.contiguous(), group=group)
    out = gathered @ b
    return (out, gathered) if return_gathered else out


def gemm_reduce_scatter(a: torch.Tensor, b: torch.Tensor, *, group=None) -> torch.Tensor:
    """This rank's rows of `sum over ranks of a @ b`: the row-parallel layer's forward.

    a: [M, K_local], b: [K_local, N], with M divisible by W. Returns [M / W, N]: rows
    r * M / W ... (r + 1) * M / W of the sum, on rank r. Equivalent to::

        partial = a @ b
        out = torch.empty(M // W, N, dtype=partial.dtype, device=partial.device)
        dist.reduce_scatter_tensor(out, partial, group=group)
    """
    world = dist.get_world_size(group)
    partial = a @ b
    out = torch.empty(a.shape[0] // world, b.shape[1], dtype=partial.dtype, device=partial.device)
    _reduce_scatter_tensor(out, partial, group=group)
    return out


# torch 2.13 renamed reduce_scatter_tensor to reduce_scatter_single (the old name warns); the
# GPU machines' torch 2.11 has only the old name.
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a [M, K] @ b [K, N]`, accumulated in float32, rounded once to a's dtype: the chunk GEMM."""
    return (a.float() @ b.float()).to(a.dtype)
