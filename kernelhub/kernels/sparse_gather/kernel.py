"""Sparse gather of value chunks in Triton (ShadowKV's value fetch), with reuse of the previous step's chunks.

Equivalent to the following PyTorch code (`kernelhub.reference.sparse_gather`):

    b = torch.arange(B)[:, None, None]
    h = torch.arange(H_kv)[None, :, None]
    out[:] = values[b, h, chunk_idx].flatten(2, 3)     # [B, H_kv, k, chunk, D] -> [B, H_kv, k*chunk, D]

that is, `out[b, h, i*chunk + t, :] = values[b, h, chunk_idx[b, h, i], t, :]`.

Each program copies BLOCK_CHUNKS consecutive slots i of one (b, h) as one tile of
BLOCK_CHUNKS * BLOCK_T rows (row r: slot r // BLOCK_T, token r % BLOCK_T) by BLOCK_D columns, and
loops over token and column blocks when a chunk is longer than BLOCK_T or D wider than BLOCK_D
(for ShadowKV's 8 x 128 chunks each loop runs once). The grid is 1-D: B * H_kv * cdiv(k, BLOCK_CHUNKS).

Reuse. `resident_slot [B, H_kv, k]` (from `resident_slots`) says, for each selected chunk, the slot j
of the previous step's gather `resident [B, H_kv, k_prev*chunk, D]` that already holds it, or -1.
Every row is loaded from exactly one source: `values` where the slot is -1, `resident` otherwise
(the other load is masked off, so it moves no bytes), and both sources hold the same numbers, so
the result does not depend on the hit map. Only the misses cross PCIe when `values` lives in host
memory.

`values` may be a pinned host tensor while `out` is on the GPU: under unified virtual addressing a
pinned buffer's address is valid on the device, and the loads of the misses go over PCIe
(zero-copy). Offsets are int64: a 128K-token cache is B * H_kv * C * chunk * D = 2**27 elements per
batch row, and the product of an index with a stride can pass 2**31.

An index outside [0, C) is never dereferenced: its rows are written as NaN. (The public op rejects
such indices on CPU before launching; on the GPU it does not check, which would need a sync.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernelhub.kernels.common.triton_helpers import LAUNCH_OPTIONS
from kernelhub.kernels.sparse_gather.space import block_d, block_t


@triton.jit
def sparse_gather_kernel(
    # Pointers: values [B, H_kv, C, CHUNK, D], chunk_idx int [B, H_kv, K], resident_slot int32
    # [B * H_kv, K] contiguous (read only when HAS_RESIDENT), resident [B, H_kv, K_prev * CHUNK, D]
    # (likewise), out [B, H_kv, K * CHUNK, D].
    values_ptr, idx_ptr, slot_ptr, resident_ptr, out_ptr,
    # Sizes.
    H, C, CHUNK, D, K,
    # Strides, in elements.
    stride_vb, stride_vh, stride_vc, stride_vt, stride_vd,
    stride_ib, stride_ih, stride_ik,
    stride_rb, stride_rh, stride_rt, stride_rd,
    stride_ob, stride_oh, stride_ot, stride_od,
    # Meta-parameters.
    BLOCK_CHUNKS: tl.constexpr,  # slots per program
    BLOCK_T: tl.constexpr,  # rows per slot in a tile: power of two, covers CHUNK or loops over it
    BLOCK_D: tl.constexpr,  # columns of a tile: power of two, covers D or loops over it
    HAS_RESIDENT: tl.constexpr,
):
    pid = tl.program_id(axis=0)
    num_blocks = tl.cdiv(K, BLOCK_CHUNKS)
    pid_bh = pid // num_blocks
    pid_blk = pid % num_blocks
    pid_b = (pid_bh // H).to(tl.int64)
    pid_h = (pid_bh % H).to(tl.int64)

    offs_r = tl.arange(0, BLOCK_CHUNKS * BLOCK_T)  # [ROWS]
    slot = pid_blk * BLOCK_CHUNKS + offs_r // BLOCK_T  # [ROWS] slot i of each row
    mask_slot = slot < K
    idx = tl.load(idx_ptr + (pid_b * stride_ib + pid_h * stride_ih + slot.to(tl.int64) * stride_ik),
                  mask=mask_slot, other=0).to(tl.int64)  # [ROWS]
    from_values = mask_slot & (idx >= 0) & (idx < C)
    if HAS_RESIDENT:
        src = tl.load(slot_ptr + (pid_bh.to(tl.int64) * K + slot), mask=mask_slot, other=-1).to(tl.int64)  # [ROWS]
        from_resident = mask_slot & (src >= 0)
        from_values = from_values & (src < 0)

    values_base = values_ptr + (pid_b * stride_vb + pid_h * stride_vh)
    out_base = out_ptr + (pid_b * stride_ob + pid_h * stride_oh)
    resident_base = resident_ptr + (pid_b * stride_rb + pid_h * stride_rh)
    for t_start in range(0, CHUNK, BLOCK_T):
        tok = (t_start + offs_r % BLOCK_T).to(tl.int64)  # [ROWS] token t within the chunk
        mask_tok = tok < CHUNK
        values_rows = idx * stride_vc + tok * stride_vt  # [ROWS]
        out_rows = (slot.to(tl.int64) * CHUNK + tok) * stride_ot  # [ROWS]
        for d_start in range(0, D, BLOCK_D):
            offs_d = d_start + tl.arange(0, BLOCK_D)  # [BLOCK_D]
            mask_d = offs_d < D
            cols = offs_d.to(tl.int64)
            mask_v = (from_values & mask_tok)[:, None] & mask_d[None, :]  # [ROWS, BLOCK_D]
            x = tl.load(values_base + (values_rows[:, None] + cols[None, :] * stride_vd), mask=mask_v,
                        other=float("nan"))  # [ROWS, BLOCK_D]
            if HAS_RESIDENT:
                resident_rows = (src * CHUNK + tok) * stride_rt  # [ROWS]
                mask_r = (from_resident & mask_tok)[:, None] & mask_d[None, :]  # [ROWS, BLOCK_D]
                r = tl.load(resident_base + (resident_rows[:, None] + cols[None, :] * stride_rd), mask=mask_r)
                x = tl.where(from_resident[:, None], r, x)
            mask_o = (mask_slot & mask_tok)[:, None] & mask_d[None, :]  # [ROWS, BLOCK_D]
            tl.store(out_base + (out_rows[:, None] + cols[None, :] * stride_od), x, mask=mask_o)


def resident_slots(chunk_idx: torch.Tensor, resident_idx: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """The hit map: int32 `[B, H_kv, k]`, for each `chunk_idx[b, h, i]` a slot j with
    `resident_idx[b, h, j] == chunk_idx[b, h, i]`, or -1 where there is none.

    Sort-based, with torch ops on the indices' device (no sync): sort each head's resident indices,
    binary-search every selected index in them, keep the positions that hold it. O(k log k_prev)
    time and O(k + k_prev) memory per head. Indices outside [0, num_chunks) never hit, so a slot
    marked empty with -1 is never read, nor is a bad index turned into a resident read.
    """
    batch, heads, k = chunk_idx.shape
    k_prev = resident_idx.shape[-1]
    if k_prev == 0 or k == 0:
        return torch.full((batch, heads, k), -1, dtype=torch.int32, device=chunk_idx.device)
    idx = chunk_idx.to(torch.int64).contiguous()
    sorted_resident, order = resident_idx.to(torch.int64).sort(dim=-1)  # [B, H_kv, k_prev]
    sorted_resident = sorted_resident.contiguous()  # sort keeps a view's strides; searchsorted wants rows
    pos = torch.searchsorted(sorted_resident, idx).clamp_(max=k_prev - 1)  # [B, H_kv, k]
    hit = (sorted_resident.gather(-1, pos) == idx) & (idx >= 0) & (idx < num_chunks)
    return torch.where(hit, order.gather(-1, pos), -1).to(torch.int32)


def sparse_gather_triton(values: torch.Tensor, chunk_idx: torch.Tensor, *, config: dict, out: torch.Tensor,
                         resident_idx: torch.Tensor | None = None,
                         resident: torch.Tensor | None = None) -> torch.Tensor:
    """Gather `values [B, H_kv, C, chunk, D]` at `chunk_idx [B, H_kv, k]` into `out [B, H_kv, k*chunk, D]`
    and return `out`; chunks named in `resident_idx [B, H_kv, k_prev]` are copied from
    `resident [B, H_kv, k_prev*chunk, D]` instead.

    `chunk_idx`, `resident_idx`, `resident` and `out` share a device; `values` is on it too, or in
    pinned host memory when that device is a GPU. Any strides. `config` holds BLOCK_CHUNKS and
    num_warps; inputs are assumed validated by the caller (`sparse_gather.ops`).
    """
    batch, heads, num_chunks, chunk, d = values.shape
    k = chunk_idx.shape[-1]
    assert chunk_idx.shape == (batch, heads, k) and out.shape == (batch, heads, k * chunk, d), \
        (values.shape, chunk_idx.shape, out.shape)
    assert (resident_idx is None) == (resident is None), "resident_idx and resident go together"
    if out.numel() == 0:
        return out

    has_resident = resident_idx is not None
    if has_resident:
        slot = resident_slots(chunk_idx, resident_idx, num_chunks)
    else:  # unused pointers still need a tensor to point at; HAS_RESIDENT keeps them from being read
        slot, resident = chunk_idx, out
    block_chunks = config["BLOCK_CHUNKS"]
    grid = (batch * heads * triton.cdiv(k, block_chunks),)
    sparse_gather_kernel[grid](
        values, chunk_idx, slot, resident, out,
        heads, num_chunks, chunk, d, k,
        *values.stride(),
        *chunk_idx.stride(),
        *resident.stride(),
        *out.stride(),
        BLOCK_CHUNKS=block_chunks, BLOCK_T=block_t(chunk), BLOCK_D=block_d(d), HAS_RESIDENT=has_resident,
        num_warps=config["num_warps"], num_stages=1, **LAUNCH_OPTIONS,  # nothing to pipeline (see space.py)
    )
    return out
