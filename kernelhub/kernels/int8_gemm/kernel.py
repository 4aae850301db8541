"""int8 GEMM in Triton: int8 x int8 -> int32, optionally with a fused dequantising epilogue.

Equivalent to the following PyTorch code (`kernelhub.reference.int8_gemm`):

    c = (a.double() @ b.double()).int()              # C = A @ B, exact in int32
    if scale_a is None:
        out[:] = c
    else:
        y = (c.float() * scale_a[:, None]) * scale_b[None, :]
        if bias is not None:
            y = y + bias.float()[None, :]
        out[:] = y.to(out.dtype)                     # rounded once, at the end

Each program computes one [BLOCK_M, BLOCK_N] tile of C with an int32 accumulator:

    acc = sum over K tiles k of  A[tile_m, k] @ B[k, tile_n]       (tl.dot, out_dtype=int32)

Every product is at most 128 * 128 = 2**14 in magnitude, so the int32 sum is exact for K < 2**17,
whatever the order in which tiles are added or K is split.

Tiles are visited in groups of GROUP_M rows of tiles (`grouped_tile`, Triton tutorial 03), so
programs that run at the same time share A rows and B columns in L2.

Split-K (SPLIT_K > 1, for small M where the M x N tiles alone cannot fill the GPU): the K tiles are
dealt round-robin to SPLIT_K programs per output tile (grid axis 1), and each adds its partial int32
sum into a zeroed int32 buffer with `tl.atomic_add`. Integer addition is associative, so the result
is exact and deterministic whatever order the atomics land in. For int32 output that buffer is `out`
itself; for the scaled form it is an int32 workspace, and a second, elementwise kernel applies the
epilogue. With SPLIT_K == 1 the epilogue runs on the accumulator in registers.

The epilogue does the float32 operations in the reference's order, `(acc * scale_a) * scale_b`,
then `+ bias`, and the kernels are launched with `enable_fp_fusion=False` (LAUNCH_OPTIONS) so the compiler cannot
contract the last multiply and add into an FMA (which rounds once instead of twice); float32
results therefore match the reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernelhub.kernels.common.triton_helpers import LAUNCH_OPTIONS, grouped_tile


@triton.jit
def _dequantize(acc, offs_m, offs_n, mask_m, mask_n, scale_a_ptr, scale_b_ptr, bias_ptr,
                stride_scale_a, stride_scale_b, stride_bias, HAS_BIAS: tl.constexpr):
    """`(float32(acc) * scale_a[:, None]) * scale_b[None, :] (+ bias)`, all in float32."""
    scale_a = tl.load(scale_a_ptr + offs_m.to(tl.int64) * stride_scale_a, mask=mask_m, other=0.0)  # [BLOCK_M]
    scale_b = tl.load(scale_b_ptr + offs_n.to(tl.int64) * stride_scale_b, mask=mask_n, other=0.0)  # [BLOCK_N]
    y = (acc.to(tl.float32) * scale_a[:, None]) * scale_b[None, :]  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=mask_n, other=0.0)  # [BLOCK_N]
        bias = bias.to(tl.float32)
        y = y + bias[None, :]
    return y


@triton.jit
def int8_gemm_kernel(
    # Pointers: A int8 [M, K], B int8 [K, N], C [M, N] (int32, or the float output when HAS_SCALES),
    # scale_a float32 [M], scale_b float32 [N], bias [N] (read only when the flags say so).
    a_ptr, b_ptr, c_ptr, scale_a_ptr, scale_b_ptr, bias_ptr,
    # Sizes.
    M, N, K,
    # Strides, in elements.
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_cm, stride_cn,
    stride_scale_a, stride_scale_b, stride_bias,
    # Meta-parameters.
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: atomically add int32 partial sums into a zeroed C
    HAS_SCALES: tl.constexpr,  # apply the dequantising epilogue (only with SPLIT_K == 1)
    HAS_BIAS: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(axis=0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(axis=1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    # Rows and columns past the edge wrap around to valid ones, so A and B loads need no M/N mask;
    # their results land in rows and columns of the tile that are never stored.
    offs_am = (offs_m % M).to(tl.int64) * stride_am  # [BLOCK_M]
    offs_bn = (offs_n % N).to(tl.int64) * stride_bn  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # [BLOCK_M, BLOCK_N]
    for k_tile in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        offs_k = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        mask_k = offs_k < K
        a_ptrs = a_ptr + (offs_am[:, None] + offs_k.to(tl.int64)[None, :] * stride_ak)  # [BLOCK_M, BLOCK_K]
        b_ptrs = b_ptr + (offs_k.to(tl.int64)[:, None] * stride_bk + offs_bn[None, :])  # [BLOCK_K, BLOCK_N]
        a = tl.load(a_ptrs, mask=mask_k[None, :], other=0)  # [BLOCK_M, BLOCK_K]
        b = tl.load(b_ptrs, mask=mask_k[:, None], other=0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_c = mask_m[:, None] & mask_n[None, :]  # [BLOCK_M, BLOCK_N]
    c_ptrs = c_ptr + (offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn)
    if SPLIT_K > 1:
        tl.atomic_add(c_ptrs, acc, mask=mask_c, sem="relaxed")
    elif HAS_SCALES:
        y = _dequantize(acc, offs_m, offs_n, mask_m, mask_n, scale_a_ptr, scale_b_ptr, bias_ptr,
                        stride_scale_a, stride_scale_b, stride_bias, HAS_BIAS)
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_c)
    else:
        tl.store(c_ptrs, acc, mask=mask_c)


@triton.jit
def int8_dequantize_kernel(
    # Pointers: C int32 [M, N] (the split-K sums), out [M, N], scale_a [M], scale_b [N], bias [N].
    c_ptr, out_ptr, scale_a_ptr, scale_b_ptr, bias_ptr,
    # Sizes.
    M, N,
    # Strides, in elements.
    stride_cm, stride_cn,
    stride_om, stride_on,
    stride_scale_a, stride_scale_b, stride_bias,
    # Meta-parameters.
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(axis=0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_c = mask_m[:, None] & mask_n[None, :]  # [BLOCK_M, BLOCK_N]
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)[None, :]
    acc = tl.load(c_ptr + (rows * stride_cm + cols * stride_cn), mask=mask_c, other=0)  # [BLOCK_M, BLOCK_N]
    y = _dequantize(acc, offs_m, offs_n, mask_m, mask_n, scale_a_ptr, scale_b_ptr, bias_ptr,
                    stride_scale_a, stride_scale_b, stride_bias, HAS_BIAS)
    tl.store(out_ptr + (rows * stride_om + cols * stride_on), y.to(out_ptr.dtype.element_ty), mask=mask_c)


def int8_gemm_triton(a: torch.Tensor, b: torch.Tensor, *, config: dict, out: torch.Tensor,
                     scale_a: torch.Tensor | None = None, scale_b: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """`a @ b` of int8 `a [M, K]` and `b [K, N]` into `out [M, N]`, and returns `out`.

    Without scales `out` is int32 and receives the exact product. With `scale_a` (float32 [M]) and
    `scale_b` (float32 [N]) it is float32, float16 or bfloat16 and receives
    `(C * scale_a[:, None]) * scale_b[None, :] (+ bias [N])` computed in float32.
    Any strides are accepted (pass `w.t()` for a weight `w [N, K]`: no copy is made). `config`
    holds BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K, num_warps, num_stages; inputs are assumed
    validated by the caller (`kernelhub.ops`).
    """
    m, k = a.shape
    n = b.shape[1]
    assert b.shape[0] == k and out.shape == (m, n), (a.shape, b.shape, out.shape)
    has_scales = scale_a is not None
    assert has_scales == (scale_b is not None), "scale_a and scale_b go together"
    assert has_scales or bias is None, "bias needs scales"
    if m == 0 or n == 0:
        return out
    if k == 0:  # C is all zeros; the epilogue is done the reference's way on the host
        if not has_scales:
            return out.zero_()
        y = (torch.zeros(m, n, dtype=torch.float32, device=out.device) * scale_a[:, None]) * scale_b[None, :]
        if bias is not None:
            y = y + bias.to(torch.float32)[None, :]
        return out.copy_(y)

    block_m, block_n, group_m = config["BLOCK_M"], config["BLOCK_N"], config["GROUP_M"]
    split_k = config["SPLIT_K"]
    launch_options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"], **LAUNCH_OPTIONS)
    num_tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)

    if split_k == 1:
        c = out
    elif has_scales:
        c = torch.zeros(m, n, dtype=torch.int32, device=out.device)
    else:
        c = out.zero_()
    # Unused pointers still need a tensor to point at; the HAS_* flags keep them from being read.
    scale_a_arg = scale_a if has_scales else c
    scale_b_arg = scale_b if has_scales else c
    bias_arg = bias if bias is not None else scale_a_arg
    # The vectors are read through their strides too: a slice or an expand of a scale is fine.
    vector_strides = (scale_a_arg.stride(0) if has_scales else 0, scale_b_arg.stride(0) if has_scales else 0,
                      bias.stride(0) if bias is not None else 0)
    fused_epilogue = has_scales and split_k == 1

    int8_gemm_kernel[(num_tiles, split_k)](
        a, b, c, scale_a_arg, scale_b_arg, bias_arg,
        m, n, k,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        c.stride(0), c.stride(1),
        *vector_strides,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=config["BLOCK_K"], GROUP_M=group_m, SPLIT_K=split_k,
        HAS_SCALES=fused_epilogue, HAS_BIAS=fused_epilogue and bias is not None,
        **launch_options,
    )
    if has_scales and split_k > 1:
        int8_dequantize_kernel[(num_tiles,)](
            c, out, scale_a, scale_b, bias_arg,
            m, n,
            c.stride(0), c.stride(1),
            out.stride(0), out.stride(1),
            *vector_strides,
            BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=group_m, HAS_BIAS=bias is not None,
            **launch_options,
        )
    return out
