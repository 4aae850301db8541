"""Landmark top-k in Triton: score every chunk's landmark against the query, keep the best k per KV head.

Equivalent to the following PyTorch code (`kernelhub.reference.landmark_topk`), with g = H_q // H_kv:

    s = einsum("bhgd,bhcd->bhgc", q.view(B, H_kv, g, D).float(), landmarks.float()) / sqrt(D)
    s = s.masked_fill(exclude[:, :, None, :], -inf)             # excluded chunks leave the softmax
    score = softmax(s, dim=-1).amax(dim=2)                      # [B, H_kv, C]: max over the group
    out[:] = topk(score.masked_fill(exclude, -inf), k).indices  # by descending score

The [B, H_q, C] probabilities are never written (C is 16K at a 128K context). One program handles
a range of chunks of one (batch, KV head) and all g query heads of its group at once: a
[G_PAD, BLOCK_C] logit tile is one tl.dot of the group's queries [G_PAD, D] with a landmark block
transposed [D, BLOCK_C] (G_PAD = g padded to >= 16 rows, which are masked out of the result).

Pass 1, online softmax statistics: for each query head j, over the blocks,
    m_j <- max(m_j, max_c s_jc),   l_j <- l_j * exp(m_j_old - m_j) + sum_c exp(s_jc - m_j)
so that l_j = sum_c exp(s_jc - m_j) at the end. With SPLIT_C > 1 the chunks of a KV head are cut
into SPLIT_C contiguous ranges, one program each (grid axis 1); a first kernel writes each range's
(m, l), and the second combines them, M_j = max m, L_j = sum l * exp(m - M_j), before its pass 2.
Excluded chunks have s = -inf and add exp(-inf) = 0; a range with nothing left keeps m = -inf,
l = 0, which the combination ignores (exponents are taken against a finite stand-in for -inf, so
no -inf - (-inf) can arise).

Pass 2 recomputes the logits block by block (reading the landmarks a second time: cheaper than
storing g * C logits), normalises, p_jc = exp(s_jc - M_j) / L_j, takes the group maximum
score_c = max_j p_jc and writes it to score [B, H_kv, C] (float32, -inf for excluded chunks): H_kv
rows, not H_q, 512 KB at a 128K context for Llama-3-8B. torch.topk then picks the k best per row.

Why the top-k is not fused: a program could keep its best TOPK_BUF = next_pow2(k) chunks in
registers as int64 keys (score bits << 32 | index) and merge each block into them with tl.sort
(a bitonic half-cleaner, then a re-sort; that version was written and matched the reference). But
a block must be merged whenever it holds a key better than the kept k-th, which in random order
happens to block b with probability about min(1, k / b): at k = 256 with 64-chunk blocks, every
block of a 128K context. Two bitonic sorts of 256 keys per 64 chunks cost more than loading the
chunks, the merge forbids splitting C across programs (8 programs per batch for Llama-3-8B), and
each tl.sort takes 30 to 300 ms in the interpreter. torch.topk reads 512 KB of scores, 1/64 of
the landmark bytes, but costs a few launches of its own; no GPU was at hand to measure it against
the scoring kernels. If a profile shows it matters, the next step is a fused radix select over
the score row (histogram rounds on the L2-resident scores, then rank and scatter), not a sort.

The logits' dot is the toolbox's `float32_dot` (kernels/common/triton_helpers.py): float32
inputs use input_precision="ieee", never TF32, and under Triton's interpreter (CPU tensors)
16-bit operands are upcast to float32 first, as its bfloat16 dot is wrong.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernelhub.kernels.common.triton_helpers import LAUNCH_OPTIONS, dot_flags, float32_dot
from kernelhub.kernels.landmark_topk.space import padded_group, padded_head_dim


@triton.jit
def _load_group_queries(q_ptr, b, h, G, D, stride_qb, stride_qh, stride_qd,
                        G_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """The group's query rows [G_PAD, D_PAD]; padded rows and columns are zero."""
    offs_g = tl.arange(0, G_PAD)  # [G_PAD]
    offs_d = tl.arange(0, D_PAD)  # [D_PAD]
    heads = h * G + offs_g
    ptrs = (q_ptr + b.to(tl.int64) * stride_qb + heads.to(tl.int64)[:, None] * stride_qh
            + offs_d.to(tl.int64)[None, :] * stride_qd)  # [G_PAD, D_PAD]
    return tl.load(ptrs, mask=(offs_g < G)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _block_logits(q, lmk_head_ptr, excl_head_ptr, block, C, D, sm_scale,
                  stride_lc, stride_ld, stride_ec,
                  G_PAD: tl.constexpr, BLOCK_C: tl.constexpr, D_PAD: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
                  IEEE_FP32: tl.constexpr, UPCAST_TO_FP32: tl.constexpr):
    """Logits [G_PAD, BLOCK_C] of block `block` (-inf where a chunk is excluded or past C), with the
    block's chunk indices [BLOCK_C] and which of them take part [BLOCK_C]."""
    offs_c = block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    offs_d = tl.arange(0, D_PAD)  # [D_PAD]
    mask_c = offs_c < C
    ptrs = (lmk_head_ptr + offs_c.to(tl.int64)[None, :] * stride_lc
            + offs_d.to(tl.int64)[:, None] * stride_ld)  # [D_PAD, BLOCK_C]
    lmk_t = tl.load(ptrs, mask=(offs_d < D)[:, None] & mask_c[None, :], other=0.0)
    s = float32_dot(q, lmk_t, tl.zeros((G_PAD, BLOCK_C), dtype=tl.float32),
                    IEEE_FP32, UPCAST_TO_FP32) * sm_scale  # [G_PAD, BLOCK_C]
    keep = mask_c
    if HAS_EXCLUDE:
        excluded = tl.load(excl_head_ptr + offs_c.to(tl.int64) * stride_ec, mask=mask_c, other=1)
        keep = keep & (excluded == 0)
    s = tl.where(keep[None, :], s, float("-inf"))
    return s, offs_c, keep


@triton.jit
def _finite_or_zero(m):
    """m where finite, 0 where -inf: the reference point of exp(s - m) for an empty range."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _softmax_statistics(q, lmk_head_ptr, excl_head_ptr, block_start, block_end, C, D, sm_scale,
                        stride_lc, stride_ld, stride_ec,
                        G_PAD: tl.constexpr, BLOCK_C: tl.constexpr, D_PAD: tl.constexpr,
                        HAS_EXCLUDE: tl.constexpr, IEEE_FP32: tl.constexpr, UPCAST_TO_FP32: tl.constexpr):
    """Running max m [G_PAD] and sum l [G_PAD] of exp(s - m) over blocks [block_start, block_end)."""
    m = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l = tl.zeros([G_PAD], dtype=tl.float32)
    for block in range(block_start, block_end):
        s, _, _ = _block_logits(q, lmk_head_ptr, excl_head_ptr, block, C, D, sm_scale,
                                stride_lc, stride_ld, stride_ec,
                                G_PAD, BLOCK_C, D_PAD, HAS_EXCLUDE, IEEE_FP32, UPCAST_TO_FP32)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_ref = _finite_or_zero(m_new)
        l = l * tl.exp(m - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), axis=1)
        m = m_new
    return m, l


@triton.jit
def _program_head(q_ptr, lmk_ptr, excl_ptr, H_kv, G, D, stride_qb, stride_qh, stride_qd, stride_lb, stride_lh,
                  stride_eb, stride_eh, G_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """This program's (batch, KV head) on grid axis 0, as (pid_bh, b, h), with the group's queries
    [G_PAD, D_PAD] and the head's rows of landmarks and exclude."""
    pid_bh = tl.program_id(axis=0)
    b = pid_bh // H_kv
    h = pid_bh % H_kv
    q = _load_group_queries(q_ptr, b, h, G, D, stride_qb, stride_qh, stride_qd, G_PAD, D_PAD)
    lmk_head_ptr = lmk_ptr + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    excl_head_ptr = excl_ptr + b.to(tl.int64) * stride_eb + h.to(tl.int64) * stride_eh
    return pid_bh, b, h, q, lmk_head_ptr, excl_head_ptr


@triton.jit
def _split_range(C, SPLIT_C: tl.constexpr, BLOCK_C: tl.constexpr):
    """Blocks [start, end) of this program's range of chunks (empty when C has too few blocks)."""
    num_blocks = tl.cdiv(C, BLOCK_C)
    per_split = tl.cdiv(num_blocks, SPLIT_C)
    start = tl.program_id(axis=1) * per_split
    end = tl.minimum(start + per_split, num_blocks)
    return start, end


@triton.jit
def landmark_stats_kernel(
    # Pointers: q [B, H_q, D], landmarks [B, H_kv, C, D], exclude uint8 [B, H_kv, C] (if HAS_EXCLUDE),
    # m_part and l_part float32 [B * H_kv, SPLIT_C, G_PAD] (written).
    q_ptr, lmk_ptr, excl_ptr, m_part_ptr, l_part_ptr,
    # Sizes.
    H_kv, G, C, D, sm_scale,
    # Strides, in elements.
    stride_qb, stride_qh, stride_qd,
    stride_lb, stride_lh, stride_lc, stride_ld,
    stride_eb, stride_eh, stride_ec,
    # Meta-parameters.
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_C: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr, IEEE_FP32: tl.constexpr, UPCAST_TO_FP32: tl.constexpr,
):
    """Pass 1 of a split KV head: (m, l) of every query head of the group over this program's range."""
    pid_bh, b, h, q, lmk_head_ptr, excl_head_ptr = _program_head(
        q_ptr, lmk_ptr, excl_ptr, H_kv, G, D, stride_qb, stride_qh, stride_qd, stride_lb, stride_lh,
        stride_eb, stride_eh, G_PAD, D_PAD)
    block_start, block_end = _split_range(C, SPLIT_C, BLOCK_C)
    m, l = _softmax_statistics(q, lmk_head_ptr, excl_head_ptr, block_start, block_end, C, D, sm_scale,
                               stride_lc, stride_ld, stride_ec,
                               G_PAD, BLOCK_C, D_PAD, HAS_EXCLUDE, IEEE_FP32, UPCAST_TO_FP32)
    offs_part = (pid_bh.to(tl.int64) * SPLIT_C + tl.program_id(axis=1)) * G_PAD + tl.arange(0, G_PAD)
    tl.store(m_part_ptr + offs_part, m)
    tl.store(l_part_ptr + offs_part, l)


@triton.jit
def landmark_scores_kernel(
    # Pointers: q [B, H_q, D], landmarks [B, H_kv, C, D], exclude uint8 [B, H_kv, C] (if HAS_EXCLUDE),
    # m_part and l_part float32 [B * H_kv, SPLIT_C, G_PAD] (read if SPLIT_C > 1), score float32
    # [B, H_kv, C] (written).
    q_ptr, lmk_ptr, excl_ptr, m_part_ptr, l_part_ptr, score_ptr,
    # Sizes.
    H_kv, G, C, D, sm_scale,
    # Strides, in elements.
    stride_qb, stride_qh, stride_qd,
    stride_lb, stride_lh, stride_lc, stride_ld,
    stride_eb, stride_eh, stride_ec,
    stride_sb, stride_sh, stride_sc,
    # Meta-parameters.
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_C: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr, IEEE_FP32: tl.constexpr, UPCAST_TO_FP32: tl.constexpr,
):
    """Pass 2 (and pass 1 when SPLIT_C == 1): the group-max probability of every chunk in the range."""
    pid_bh, b, h, q, lmk_head_ptr, excl_head_ptr = _program_head(
        q_ptr, lmk_ptr, excl_ptr, H_kv, G, D, stride_qb, stride_qh, stride_qd, stride_lb, stride_lh,
        stride_eb, stride_eh, G_PAD, D_PAD)
    block_start, block_end = _split_range(C, SPLIT_C, BLOCK_C)
    offs_g = tl.arange(0, G_PAD)  # [G_PAD]

    if SPLIT_C == 1:
        m, l = _softmax_statistics(q, lmk_head_ptr, excl_head_ptr, 0, block_end, C, D, sm_scale,
                                   stride_lc, stride_ld, stride_ec,
                                   G_PAD, BLOCK_C, D_PAD, HAS_EXCLUDE, IEEE_FP32, UPCAST_TO_FP32)
    else:
        offs_part = ((pid_bh.to(tl.int64) * SPLIT_C + tl.arange(0, SPLIT_C)[:, None]) * G_PAD
                     + offs_g[None, :])  # [SPLIT_C, G_PAD]
        m_part = tl.load(m_part_ptr + offs_part)
        l_part = tl.load(l_part_ptr + offs_part)
        m = tl.max(m_part, axis=0)  # [G_PAD]
        l = tl.sum(l_part * tl.exp(m_part - _finite_or_zero(m)[None, :]), axis=0)
    m_ref = _finite_or_zero(m)
    l_safe = tl.where(l > 0.0, l, 1.0)  # l == 0 only in a row with no chunk left (ops forbids it)
    is_head = offs_g < G

    score_row_ptr = score_ptr + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    for block in range(block_start, block_end):
        s, offs_c, keep = _block_logits(q, lmk_head_ptr, excl_head_ptr, block, C, D, sm_scale,
                                        stride_lc, stride_ld, stride_ec,
                                        G_PAD, BLOCK_C, D_PAD, HAS_EXCLUDE, IEEE_FP32, UPCAST_TO_FP32)
        p = tl.exp(s - m_ref[:, None]) / l_safe[:, None]  # [G_PAD, BLOCK_C]
        score = tl.max(tl.where(is_head[:, None], p, 0.0), axis=0)  # [BLOCK_C]
        tl.store(score_row_ptr + offs_c.to(tl.int64) * stride_sc, tl.where(keep, score, float("-inf")),
                 mask=offs_c < C)


def landmark_topk_triton(q: torch.Tensor, landmarks: torch.Tensor, k: int, *, config: dict,
                         out: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The k best chunks per KV head into int64 `out [B, H_kv, k]`, by descending score; returns `out`.

    q [B, H_q, D] and landmarks [B, H_kv, C, D] of one float dtype, exclude bool [B, H_kv, C] or
    None, any strides. `config` holds BLOCK_C, SPLIT_C, num_warps, num_stages. Inputs are assumed
    validated by the caller (`kernelhub.kernels.landmark_topk.ops`), including
    1 <= k <= the chunks left after `exclude` in every row.
    """
    b, h_q, d = q.shape
    _, h_kv, c, _ = landmarks.shape
    g = h_q // h_kv
    assert out.shape == (b, h_kv, k) and out.dtype == torch.int64, (out.shape, out.dtype)
    if b == 0 or h_kv == 0:
        return out
    split_c = config["SPLIT_C"]
    shape = (b, h_q, h_kv, c, d, k)
    meta = dict(G_PAD=padded_group(shape), D_PAD=padded_head_dim(shape), BLOCK_C=config["BLOCK_C"],
                SPLIT_C=split_c, HAS_EXCLUDE=exclude is not None, **dot_flags(q),
                num_warps=config["num_warps"], num_stages=config["num_stages"], **LAUNCH_OPTIONS)
    sm_scale = 1.0 / math.sqrt(d)
    score = torch.empty(b, h_kv, c, dtype=torch.float32, device=q.device)
    # Unused pointers still need a tensor to point at; the flags keep them from being read.
    excl = exclude.view(torch.uint8) if exclude is not None else score
    excl_strides = excl.stride() if exclude is not None else (0, 0, 0)
    grid = (b * h_kv, split_c)
    sizes = (h_kv, g, c, d, sm_scale)
    strides = (*q.stride(), *landmarks.stride(), *excl_strides)

    if split_c > 1:
        m_part = torch.empty(b * h_kv, split_c, meta["G_PAD"], dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        landmark_stats_kernel[grid](q, landmarks, excl, m_part, l_part, *sizes, *strides, **meta)
    else:
        m_part = l_part = score
    landmark_scores_kernel[grid](q, landmarks, excl, m_part, l_part, score, *sizes, *strides, *score.stride(),
                                 **meta)
    values = torch.empty(b, h_kv, k, dtype=torch.float32, device=q.device)
    torch.topk(score, k, dim=-1, sorted=True, out=(values, out))
    return out
