"""ShadowKV's low-rank key cache in Triton: the Gram matrix, the projection, and the fused
gather + reconstruct + RoPE of decode.

Notation: k [B, H_kv, S, D] pre-RoPE keys; the merged key matrix of sequence b is read in place,

    K_b[s, c] = k[b, c // D, s, c % D]        c = h * D + d in [0, HD),  HD = H_kv * D

(no copy of K_b is ever made: every kernel turns a column c into the offset
`(c // D) * stride_h + (c % D) * stride_d`).

1. `gram_kernel`: G_b = K_b^T K_b, float32 [HD, HD]. Equivalent to

       K = k[b].transpose(0, 1).reshape(S, HD).float();  G[b] = K.T @ K

   Each program owns one square [BLOCK_HD, BLOCK_HD] tile (pid_m, pid_n) of G. G is symmetric, so
   only tiles with pid_m <= pid_n run; a tile is stored at (m, n) for m <= n and mirrored to (n, m)
   for m < n, so every element is written once and G is exactly symmetric. The reduction over S
   is split round-robin over SPLIT_S programs (grid axis 1): S tiles pid_s, pid_s + SPLIT_S, ...
   Each split writes its float32 partial into its own slice of a [B, SPLIT_S, HD, HD] buffer and
   the host sums the slices (`torch.sum` over that axis, a fixed-order reduction): deterministic,
   no float atomics. With SPLIT_S == 1 the tile goes straight into G.

2. `project_kernel`: a_b = K_b @ basis_b^T, [S, r] in k.dtype, float32 accumulation. Equivalent to

       a[b] = (K.float() @ basis[b].float().T).to(k.dtype)

   a plain tiled GEMM whose A operand is K_b read in place.

3. `reconstruct_keys_kernel`: for p = positions[b, h, i] and q = rope_positions[b, h, i] (= p by default),

       x = a[b, p, :].float() @ basis[b, :, h*D:(h+1)*D].float()          # [D]
       out[b, h, i] = x * cos[q] + rotate_half(x) * sin[q]                 # rotate_half(x) = [-x2, x1]

   One program handles BLOCK_N tokens of one (b, h): it gathers their rows of a, multiplies them
   by the two halves of the head's basis slice into two float32 accumulators x1 = x[:D/2] and
   x2 = x[D/2:], and applies RoPE in the epilogue: out1 = x1 * cos1 - x2 * sin1,
   out2 = x2 * cos2 + x1 * sin2. The post-RoPE keys never exist outside registers before the store.

Every dot is the toolbox's `float32_dot` (kernels/common/triton_helpers.py): float32 operands use
`input_precision="ieee"` (a TF32 dot would round them to 10 mantissa bits); float16/bfloat16
products are exact in float32, and every dot accumulates in float32. (In Triton's interpreter a
float32 -> bfloat16 store truncates where a GPU rounds to nearest: the families' tolerances allow
one unit in the last place of the output dtype.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernelhub.kernels.common.triton_helpers import LAUNCH_OPTIONS, dot_flags, float32_dot, grouped_tile
from kernelhub.kernels.lowrank_keys.reconstruct_space import half_block


@triton.jit
def _key_column_offsets(offs_c, stride_kh, stride_kd, HEAD_DIM: tl.constexpr):
    """Offsets of merged-key columns c = h * D + d in k: h * stride_h + d * stride_d (int64)."""
    return (offs_c // HEAD_DIM).to(tl.int64) * stride_kh + (offs_c % HEAD_DIM).to(tl.int64) * stride_kd


@triton.jit
def gram_kernel(
    # Pointers: k [B, H_kv, S, D] (any float dtype), g float32 [B, SPLIT_S, HD, HD] partials (or G itself).
    k_ptr, g_ptr,
    # Sizes.
    S, HD,
    # Strides, in elements.
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_gb, stride_gsplit, stride_gm, stride_gn,
    # Meta-parameters.
    HEAD_DIM: tl.constexpr,
    BLOCK_HD: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_S: tl.constexpr,
    IEEE_FP32: tl.constexpr, UPCAST_TO_FP32: tl.constexpr,  # dot_flags
):
    pid_split = tl.program_id(axis=1)
    pid_b = tl.program_id(axis=2)
    pid_m, pid_n = grouped_tile(tl.program_id(axis=0), HD, HD, BLOCK_HD, BLOCK_HD, 1)  # row-major
    if pid_m > pid_n:  # below the diagonal: mirrored from tile (pid_n, pid_m)
        return

    offs_m = pid_m * BLOCK_HD + tl.arange(0, BLOCK_HD)  # [BLOCK_HD]
    offs_n = pid_n * BLOCK_HD + tl.arange(0, BLOCK_HD)  # [BLOCK_HD]
    # Columns past HD are masked, not wrapped around with `% HD`: a runtime modulus hides from the
    # compiler that a tile's columns are contiguous in k, and its loads were then neither vectorised
    # nor software-pipelined (one shared-memory copy of each tile, scalar loads).
    mask_m = offs_m < HD
    mask_n = offs_n < HD
    cols_m = _key_column_offsets(offs_m, stride_kh, stride_kd, HEAD_DIM)  # [BLOCK_HD]
    cols_n = _key_column_offsets(offs_n, stride_kh, stride_kd, HEAD_DIM)  # [BLOCK_HD]
    k_base = k_ptr + pid_b.to(tl.int64) * stride_kb

    acc = tl.zeros((BLOCK_HD, BLOCK_HD), dtype=tl.float32)  # [BLOCK_HD, BLOCK_HD]
    for s_tile in range(pid_split, tl.cdiv(S, BLOCK_S), SPLIT_S):
        offs_s = s_tile * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        mask_s = offs_s < S
        rows = offs_s.to(tl.int64) * stride_ks  # [BLOCK_S]
        # [BLOCK_HD, BLOCK_S] = K[tile_s, cols_m]^T and [BLOCK_S, BLOCK_HD] = K[tile_s, cols_n]
        k_mt = tl.load(k_base + (cols_m[:, None] + rows[None, :]), mask=mask_m[:, None] & mask_s[None, :],
                       other=0.0)
        k_sn = tl.load(k_base + (rows[:, None] + cols_n[None, :]), mask=mask_s[:, None] & mask_n[None, :],
                       other=0.0)
        acc = float32_dot(k_mt, k_sn, acc, IEEE_FP32, UPCAST_TO_FP32)

    g_base = g_ptr + pid_b.to(tl.int64) * stride_gb + pid_split.to(tl.int64) * stride_gsplit
    row_m = offs_m.to(tl.int64)[:, None]  # [BLOCK_HD, 1]
    col_n = offs_n.to(tl.int64)[None, :]  # [1, BLOCK_HD]
    in_bounds = mask_m[:, None] & mask_n[None, :]  # [BLOCK_HD, BLOCK_HD]
    tl.store(g_base + (row_m * stride_gm + col_n * stride_gn), acc, mask=in_bounds & (row_m <= col_n))
    tl.store(g_base + (col_n * stride_gm + row_m * stride_gn), acc, mask=in_bounds & (row_m < col_n))


@triton.jit
def project_kernel(
    # Pointers: k [B, H_kv, S, D], basis [B, r, HD] (k's dtype), a [B, S, r] (k's dtype).
    k_ptr, basis_ptr, a_ptr,
    # Sizes.
    S, HD, RANK,
    # Strides, in elements.
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_bb, stride_br, stride_bc,
    stride_ab, stride_as, stride_ar,
    # Meta-parameters.
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    IEEE_FP32: tl.constexpr, UPCAST_TO_FP32: tl.constexpr,  # dot_flags
):
    pid_b = tl.program_id(axis=1)
    # Row-major: neighbouring programs share one block of K rows (all rank tiles of it), read once from memory.
    pid_s, pid_r = grouped_tile(tl.program_id(axis=0), S, RANK, BLOCK_S, BLOCK_R, 1)

    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    mask_s = offs_s < S
    mask_r = offs_r < RANK
    rows = offs_s.to(tl.int64) * stride_ks  # [BLOCK_S]
    k_base = k_ptr + pid_b.to(tl.int64) * stride_kb
    basis_base = basis_ptr + pid_b.to(tl.int64) * stride_bb + offs_r.to(tl.int64)[None, :] * stride_br

    acc = tl.zeros((BLOCK_S, BLOCK_R), dtype=tl.float32)  # [BLOCK_S, BLOCK_R]
    for c0 in range(0, HD, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
        mask_c = offs_c < HD
        cols = _key_column_offsets(offs_c, stride_kh, stride_kd, HEAD_DIM)  # [BLOCK_C]
        k_tile = tl.load(k_base + (rows[:, None] + cols[None, :]),
                         mask=mask_s[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_S, BLOCK_C]
        basis_t = tl.load(basis_base + offs_c.to(tl.int64)[:, None] * stride_bc,
                          mask=mask_c[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_C, BLOCK_R]
        acc = float32_dot(k_tile, basis_t, acc, IEEE_FP32, UPCAST_TO_FP32)

    a_ptrs = (a_ptr + pid_b.to(tl.int64) * stride_ab + offs_s.to(tl.int64)[:, None] * stride_as
              + offs_r.to(tl.int64)[None, :] * stride_ar)
    tl.store(a_ptrs, acc.to(a_ptr.dtype.element_ty), mask=mask_s[:, None] & mask_r[None, :])


@triton.jit
def reconstruct_keys_kernel(
    # Pointers: a [B, S, r], basis [B, r, H_kv * D] (same dtype), positions and rope_positions
    # int32/int64 [B, H_kv, n], cos, sin float32 [P, D], out [B, H_kv, n, D] (a's dtype).
    a_ptr, basis_ptr, pos_ptr, rope_pos_ptr, cos_ptr, sin_ptr, out_ptr,
    # Sizes.
    N, RANK,
    # Strides, in elements.
    stride_ab, stride_as, stride_ar,
    stride_bb, stride_br, stride_bc,
    stride_pb, stride_ph, stride_pn,
    stride_qb, stride_qh, stride_qn,
    stride_cp, stride_cd,
    stride_sp, stride_sd,
    stride_ob, stride_oh, stride_on, stride_od,
    # Meta-parameters.
    HEAD_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # D / 2 padded to a power of two >= 16
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE_FP32: tl.constexpr, UPCAST_TO_FP32: tl.constexpr,  # dot_flags
):
    pid_n = tl.program_id(axis=0)
    pid_h = tl.program_id(axis=1)
    pid_b = tl.program_id(axis=2)
    HALF: tl.constexpr = HEAD_DIM // 2

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_n = offs_n < N
    pos_ptrs = (pos_ptr + pid_b.to(tl.int64) * stride_pb + pid_h.to(tl.int64) * stride_ph
                + offs_n.to(tl.int64) * stride_pn)
    # Tokens past n read position 0: a valid row whose results are never stored.
    pos = tl.load(pos_ptrs, mask=mask_n, other=0).to(tl.int64)  # [BLOCK_N]
    rope_pos_ptrs = (rope_pos_ptr + pid_b.to(tl.int64) * stride_qb + pid_h.to(tl.int64) * stride_qh
                     + offs_n.to(tl.int64) * stride_qn)
    rope_pos = tl.load(rope_pos_ptrs, mask=mask_n, other=0).to(tl.int64)  # [BLOCK_N]: rows of cos and sin

    offs_d = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
    mask_d = offs_d < HALF
    a_rows = a_ptr + pid_b.to(tl.int64) * stride_ab + pos[:, None] * stride_as  # [BLOCK_N, 1]
    cols_1 = (pid_h * HEAD_DIM + offs_d).to(tl.int64) * stride_bc  # [BLOCK_HALF]: first half of head h
    cols_2 = (pid_h * HEAD_DIM + HALF + offs_d).to(tl.int64) * stride_bc  # second half
    basis_base = basis_ptr + pid_b.to(tl.int64) * stride_bb

    x1 = tl.zeros((BLOCK_N, BLOCK_HALF), dtype=tl.float32)  # [BLOCK_N, BLOCK_HALF]
    x2 = tl.zeros((BLOCK_N, BLOCK_HALF), dtype=tl.float32)  # [BLOCK_N, BLOCK_HALF]
    for r0 in range(0, RANK, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        mask_r = offs_r < RANK
        rows_r = offs_r.to(tl.int64)[:, None] * stride_br  # [BLOCK_R, 1]
        a_tile = tl.load(a_rows + offs_r.to(tl.int64)[None, :] * stride_ar,
                         mask=mask_r[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        mask_rd = mask_r[:, None] & mask_d[None, :]
        basis_1 = tl.load(basis_base + (rows_r + cols_1[None, :]), mask=mask_rd, other=0.0)  # [BLOCK_R, BLOCK_HALF]
        basis_2 = tl.load(basis_base + (rows_r + cols_2[None, :]), mask=mask_rd, other=0.0)  # [BLOCK_R, BLOCK_HALF]
        x1 = float32_dot(a_tile, basis_1, x1, IEEE_FP32, UPCAST_TO_FP32)
        x2 = float32_dot(a_tile, basis_2, x2, IEEE_FP32, UPCAST_TO_FP32)

    mask_nd = mask_n[:, None] & mask_d[None, :]
    cos_rows = cos_ptr + rope_pos[:, None] * stride_cp  # [BLOCK_N, 1]
    sin_rows = sin_ptr + rope_pos[:, None] * stride_sp
    d_1 = offs_d.to(tl.int64)[None, :]  # [1, BLOCK_HALF]
    d_2 = (HALF + offs_d).to(tl.int64)[None, :]
    cos_1 = tl.load(cos_rows + d_1 * stride_cd, mask=mask_nd, other=0.0)  # [BLOCK_N, BLOCK_HALF]
    cos_2 = tl.load(cos_rows + d_2 * stride_cd, mask=mask_nd, other=0.0)
    sin_1 = tl.load(sin_rows + d_1 * stride_sd, mask=mask_nd, other=0.0)
    sin_2 = tl.load(sin_rows + d_2 * stride_sd, mask=mask_nd, other=0.0)
    out_1 = x1 * cos_1 - x2 * sin_1  # rope: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
    out_2 = x2 * cos_2 + x1 * sin_2

    out_rows = (out_ptr + pid_b.to(tl.int64) * stride_ob + pid_h.to(tl.int64) * stride_oh
                + offs_n.to(tl.int64)[:, None] * stride_on)  # [BLOCK_N, 1]
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_rows + d_1 * stride_od, out_1.to(out_ty), mask=mask_nd)
    tl.store(out_rows + d_2 * stride_od, out_2.to(out_ty), mask=mask_nd)


# ------------------------------------------------------------------------------------------------
# Host wrappers: inputs are assumed validated by the caller (kernelhub.kernels.lowrank_keys.ops).
# ------------------------------------------------------------------------------------------------

def gram_triton(k: torch.Tensor, *, config: dict, out: torch.Tensor) -> torch.Tensor:
    """G_b = K_b^T K_b of `k [B, H_kv, S, D]` (any strides) into float32 `out [B, HD, HD]`; returns `out`.

    `config` holds BLOCK_HD, BLOCK_S, SPLIT_S, num_warps, num_stages.
    """
    batch, heads, seq, head_dim = k.shape
    hd = heads * head_dim
    assert out.shape == (batch, hd, hd) and out.dtype == torch.float32, (k.shape, out.shape, out.dtype)
    if batch == 0 or hd == 0:
        return out
    block_hd, block_s = config["BLOCK_HD"], config["BLOCK_S"]
    # More splits than S tiles would only add all-zero partials.
    split = max(1, min(config["SPLIT_S"], triton.cdiv(seq, block_s)))
    if split == 1:
        g, stride_gsplit = out, 0
    else:
        g = torch.empty((batch, split, hd, hd), dtype=torch.float32, device=out.device)
        stride_gsplit = g.stride(1)
    num_tiles = triton.cdiv(hd, block_hd)
    gram_kernel[(num_tiles * num_tiles, split, batch)](
        k, g,
        seq, hd,
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        g.stride(0), stride_gsplit, g.stride(-2), g.stride(-1),
        HEAD_DIM=head_dim, BLOCK_HD=block_hd, BLOCK_S=block_s, SPLIT_S=split,
        **dot_flags(k),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **LAUNCH_OPTIONS,
    )
    if split > 1:
        torch.sum(g, dim=1, out=out)
    return out


def project_triton(k: torch.Tensor, basis: torch.Tensor, *, config: dict, out: torch.Tensor) -> torch.Tensor:
    """a_b = K_b @ basis_b^T of `k [B, H_kv, S, D]` and `basis [B, r, HD]` (k's dtype) into
    `out [B, S, r]` (k's dtype), float32 accumulation; returns `out`.

    `config` holds BLOCK_S, BLOCK_R, BLOCK_C, num_warps, num_stages.
    """
    batch, heads, seq, head_dim = k.shape
    rank, hd = basis.shape[1], basis.shape[2]
    assert hd == heads * head_dim and basis.shape[0] == batch and out.shape == (batch, seq, rank)
    assert basis.dtype == k.dtype, (basis.dtype, k.dtype)
    if batch == 0 or seq == 0 or rank == 0:
        return out
    block_s, block_r = config["BLOCK_S"], config["BLOCK_R"]
    grid = (triton.cdiv(seq, block_s) * triton.cdiv(rank, block_r), batch)
    project_kernel[grid](
        k, basis, out,
        seq, hd, rank,
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        basis.stride(0), basis.stride(1), basis.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=head_dim, BLOCK_S=block_s, BLOCK_R=block_r, BLOCK_C=config["BLOCK_C"],
        **dot_flags(k),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **LAUNCH_OPTIONS,
    )
    return out


def reconstruct_keys_triton(a: torch.Tensor, basis: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, *, config: dict, out: torch.Tensor,
                            rope_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Post-RoPE keys `out [B, H_kv, n, D]` (a's dtype) of the tokens at `positions [B, H_kv, n]`
    from `a [B, S, r]` and `basis [B, r, H_kv * D]`, RoPE rows of cos/sin at `rope_positions`
    (default: `positions`); returns `out`. Any strides.

    `config` holds BLOCK_N, BLOCK_R, num_warps, num_stages.
    """
    batch, heads, n = positions.shape
    rank = a.shape[2]
    head_dim = basis.shape[2] // heads
    assert out.shape == (batch, heads, n, head_dim), (out.shape, positions.shape, head_dim)
    assert basis.dtype == a.dtype and head_dim % 2 == 0
    if batch == 0 or heads == 0 or n == 0 or head_dim == 0:
        return out
    if rank == 0:  # no terms: x = 0, and so is its rotation
        return out.zero_()
    if rope_positions is None:
        rope_positions = positions
    block_n = config["BLOCK_N"]
    reconstruct_keys_kernel[(triton.cdiv(n, block_n), heads, batch)](
        a, basis, positions, rope_positions, cos, sin, out,
        n, rank,
        a.stride(0), a.stride(1), a.stride(2),
        basis.stride(0), basis.stride(1), basis.stride(2),
        positions.stride(0), positions.stride(1), positions.stride(2),
        rope_positions.stride(0), rope_positions.stride(1), rope_positions.stride(2),
        cos.stride(0), cos.stride(1),
        sin.stride(0), sin.stride(1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        HEAD_DIM=head_dim, BLOCK_HALF=half_block(head_dim), BLOCK_N=block_n, BLOCK_R=config["BLOCK_R"],
        **dot_flags(a),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **LAUNCH_OPTIONS,
    )
    return out
