"""The overlapped schedules of all_gather_gemm and gemm_reduce_scatter (Flux's idea, over torch.distributed).

Both split the communication into chunks of rows and post every transfer before computing, so the
transport moves chunk i while the GEMM works on chunk i - 1. Transfers are point-to-point
(`batch_isend_irecv`: one send and one receive per (peer step, chunk), so NCCL pairs them in one
group and two ranks sending to each other cannot deadlock); step s sends to rank + s and receives
from rank - s, the ring order.

all_gather_gemm on rank r (a [M_local, K] split into CHUNKS row chunks; b one [K, N] or several
[K, N_i] sharing the gather, as a fused QKV or gate + up projection does):

    post: for step s in 1..W-1, chunk c: send a[c] to r+s, receive chunk c of rank r-s
    out_i[rows of r] = a @ b_i for every i               # local chunks first: nothing to wait for
    for (peer, c) in ORDER:                              # peer-major: r-1, r-2, ...; or chunk-major
        wait for chunk c of peer; out_i[rows of peer, chunk c] = chunk @ b_i for every i

gemm_reduce_scatter on rank r (a [M, K_local]; destination d owns rows d*M/W ... (d+1)*M/W):

    for step s in 1..W-1, chunk c:                       # destination r+1 first, own rows last
        partial = a[rows of r+s, chunk c] @ b; post: send partial to r+s, receive from r-s
    out = a[rows of r] @ b
    wait; out = out + the W-1 received partials          # in float32, rounded once

Partials travel in the output dtype, as `reduce_scatter_tensor` of `a @ b` would send them. On
CUDA the same code overlaps without blocking the host: NCCL's `wait()` only makes the current
stream wait, so every chunk GEMM is queued at once and starts when its chunk lands. Nothing is
left behind between calls (no flags, no persistent buffers), so calls need no reset.

`gemm(x, b, out)` computes one chunk: `out [m, N] = x [m, K] @ b [K, N]` into a row slice;
`chunk_gemm` chooses it for a call (torch's GEMM on the CPU path, the Triton chunk GEMM tuned as
`tp_gemm` otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from kernelhub import configs, validation
from kernelhub.device import device_for_tensor
from kernelhub.errors import CollectiveError
from kernelhub.kernels.tp_overlap.all_gather_space import PEER_MAJOR
from kernelhub.kernels.tp_overlap.kernel import gemm_triton
from kernelhub.registry import FamilySpec

Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]


def chunk_gemm(gemm_spec: FamilySpec, a: torch.Tensor, path: str) -> Gemm:
    """gemm(x, b, out) for the chunks of a call on `a`'s device that runs `path` (the backend the
    call chose): torch's GEMM on the CPU path, else the Triton kernel with `gemm_spec`'s (tp_gemm's)
    best config for each chunk's shape."""
    if path == "cpu":
        return lambda x, b, out: torch.matmul(x, b, out=out)
    dtype, identity = validation.dtype_name(a.dtype), device_for_tensor(a)

    def gemm(x, b, out):
        config = configs.best_config(gemm_spec, (x.shape[0], b.shape[1], x.shape[1]), dtype, identity)
        return gemm_triton(x, b, config=config, out=out)
    return gemm


def chunk_bounds(rows: int, chunks: int) -> list[tuple[int, int]]:
    """`min(chunks, rows)` consecutive (start, stop) row ranges covering `rows`, sizes differing by at most 1."""
    chunks = max(1, min(chunks, rows))
    base, extra = divmod(rows, chunks)
    bounds, start = [], 0
    for i in range(chunks):
        stop = start + base + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


class _Transfer:
    """One posted send + receive pair, and what to say if it fails."""

    def __init__(self, works: list, what: str):
        self.works, self.what = works, what

    def wait(self) -> None:
        for work in self.works:
            try:
                work.wait()
            except Exception as exc:  # a dead, failing or timed-out peer: name what we waited for
                raise CollectiveError(f"{self.what} failed: {type(exc).__name__}: {exc}") from exc


def _exchange(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, group, tag: int) -> list:
    """Post `send` to group rank `dst` and a receive from `src` into `recv`; returns the works."""
    group = group or dist.group.WORLD
    return dist.batch_isend_irecv([
        dist.P2POp(dist.isend, send, dist.get_global_rank(group, dst), group, tag),
        dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, src), group, tag),
    ])


def all_gather_gemm(a: torch.Tensor, b: torch.Tensor | Sequence[torch.Tensor],
                    out: torch.Tensor | Sequence[torch.Tensor], gathered: torch.Tensor, *,
                    group, chunks: int, order: int, gemm: Gemm, op: str = "all_gather_gemm") -> None:
    """out [W*M_local, N] = all_gather(a) @ b, with the gathered rows landing in `gathered` [W*M_local, K].

    b and out may be matching sequences ([K, N_i] and [W*M_local, N_i]): one gather, and every
    chunk multiplied by each b_i as it lands. `gathered`'s own rows are filled too (callers that
    return it need them).
    """
    bs, outs = ([b], [out]) if isinstance(b, torch.Tensor) else (list(b), list(out))
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    m = a.shape[0]
    bounds = chunk_bounds(m, chunks)
    arriving: dict[tuple[int, int], _Transfer] = {}
    for step in range(1, world):
        dst, src = (rank + step) % world, (rank - step) % world
        for c, (lo, hi) in enumerate(bounds):
            works = _exchange(a[lo:hi], dst, gathered[src * m + lo: src * m + hi], src, group, tag=c)
            arriving[(src, c)] = _Transfer(works, f"{op}: rank {rank} exchanging row chunk {c} with ranks {dst}/{src}")

    for lo, hi in bounds:
        for b_i, out_i in zip(bs, outs):
            gemm(a[lo:hi], b_i, out_i[rank * m + lo: rank * m + hi])
    gathered[rank * m: (rank + 1) * m].copy_(a)

    peers = [(rank - step) % world for step in range(1, world)]
    if order == PEER_MAJOR:
        schedule = [(peer, c) for peer in peers for c in range(len(bounds))]
    else:
        schedule = [(peer, c) for c in range(len(bounds)) for peer in peers]
    for peer, c in schedule:
        arriving[(peer, c)].wait()
        lo, hi = bounds[c]
        rows = slice(peer * m + lo, peer * m + hi)
        for b_i, out_i in zip(bs, outs):
            gemm(gathered[rows], b_i, out_i[rows])


def gemm_reduce_scatter(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, group, chunks: int,
                        gemm: Gemm, op: str = "gemm_reduce_scatter") -> None:
    """out [M/W, N] = this rank's rows of the sum over ranks of a [M, K_local] @ b [K_local, N]."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    m_out, n = out.shape
    bounds = chunk_bounds(m_out, chunks)
    sent = torch.empty((world - 1, m_out, n), dtype=out.dtype, device=out.device)
    received = torch.empty_like(sent)
    transfers = []
    for step in range(1, world):
        dst, src = (rank + step) % world, (rank - step) % world
        for c, (lo, hi) in enumerate(bounds):
            gemm(a[dst * m_out + lo: dst * m_out + hi], b, sent[step - 1, lo:hi])
            works = _exchange(sent[step - 1, lo:hi], dst, received[step - 1, lo:hi], src, group, tag=c)
            transfers.append(_Transfer(works, f"{op}: rank {rank} exchanging partial chunk {c} with ranks {dst}/{src}"))

    gemm(a[rank * m_out: (rank + 1) * m_out], b, out)
    for transfer in transfers:
        transfer.wait()
    if out.dtype == torch.float32:
        for partial in received:
            out.add_(partial)
    else:
        total = out.float()
        for partial in received:
            total.add_(partial)
        out.copy_(total)
