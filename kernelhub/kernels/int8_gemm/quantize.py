"""Per-row symmetric int8 quantisation in Triton, bit-exact with `kernelhub.reference.int8_gemm`.

Equivalent to the following PyTorch code (`reference.int8_gemm.quantize_int8`):

    absmax = x.abs().amax(dim=-1).float()                      # [M]
    scale = absmax / 127                                       # IEEE float32 division
    q = torch.round(x.float() / scale[:, None])                # round half to even
    q = torch.where(scale[:, None] > 0, q, 0).clamp(-127, 127).to(torch.int8)

One program per row, two passes over K in BLOCK_K chunks: the row's absmax, then the quantised
values. Bit-exactness needs two things Triton does not give by default:

- IEEE division. On NVIDIA GPUs Triton lowers float32 `/` to an approximate division (`div.full.f32`,
  up to 2 ulp off), so both divisions use `tl.math.div_rn`, the correctly rounded one.
- Round half to even without libdevice. For |v| < 2**22, `(v + 1.5 * 2**23) - 1.5 * 2**23` is exactly
  v rounded to the nearest integer, ties to even: the sum lies in [2**23, 2**24), where float32 values
  are exactly the integers, so the addition rounds v to an integer under the default
  round-to-nearest-even mode (1.5 * 2**23 is even, so the parity of the result is that of the
  integer chosen), and the subtraction is exact. Here |v| <= absmax / scale, which is 127 up to
  rounding, and below 191 even when absmax / 127 rounds to a subnormal scale: far inside the range.
  Without fast-math flags the compiler may not fold `(v + c) - c` into v.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 1.5 * 2**23: adding and then subtracting it rounds a float32 |v| < 2**22 to an integer, ties to even.
_ROUNDING_MAGIC = 12582912.0


@triton.jit
def quantize_int8_kernel(
    # Pointers: x float [M, K], q int8 [M, K], scale float32 [M].
    x_ptr, q_ptr, scale_ptr,
    # Sizes.
    K,
    # Strides, in elements.
    stride_xm, stride_xk,
    stride_qm, stride_qk,
    stride_scale,
    # Meta-parameters.
    BLOCK_K: tl.constexpr,
    ROUNDING_MAGIC: tl.constexpr,
):
    pid_m = tl.program_id(axis=0)
    x_row_ptr = x_ptr + pid_m.to(tl.int64) * stride_xm
    q_row_ptr = q_ptr + pid_m.to(tl.int64) * stride_qm

    # Pass 1: absmax of the row. |x| and max are exact, so the order does not matter.
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)  # [BLOCK_K]
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        mask_k = offs_k < K
        x = tl.load(x_row_ptr + offs_k.to(tl.int64) * stride_xk, mask=mask_k, other=0.0)  # [BLOCK_K]
        absmax = tl.maximum(absmax, tl.abs(x.to(tl.float32)))
    row_absmax = tl.max(absmax, axis=0)

    scale = tl.math.div_rn(row_absmax, 127.0)
    tl.store(scale_ptr + pid_m.to(tl.int64) * stride_scale, scale)
    is_nonzero = scale > 0.0  # also false when absmax / 127 underflows to 0, as in the reference
    safe_scale = tl.where(is_nonzero, scale, 1.0)

    # Pass 2: q = clamp(round_half_even(x / scale), -127, 127), or 0 for an all-zero row.
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        mask_k = offs_k < K
        x = tl.load(x_row_ptr + offs_k.to(tl.int64) * stride_xk, mask=mask_k, other=0.0)  # [BLOCK_K]
        v = tl.math.div_rn(x.to(tl.float32), safe_scale)  # [BLOCK_K]
        v = (v + ROUNDING_MAGIC) - ROUNDING_MAGIC
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        v = tl.where(is_nonzero, v, 0.0)
        tl.store(q_row_ptr + offs_k.to(tl.int64) * stride_qk, v.to(tl.int8), mask=mask_k)


def quantize_int8_triton(x: torch.Tensor, *, q_out: torch.Tensor,
                         scale_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise float `x [M, K]` (float32, float16 or bfloat16, any strides) per row into int8
    `q_out [M, K]` and float32 `scale_out [M]`; returns `(q_out, scale_out)`.

    `scale_out[m] = max|x[m]| / 127` and `q_out[m] = clamp(round_half_even(x[m] / scale_out[m]), -127, 127)`
    (0 for a row whose scale is 0), bit for bit as `reference.int8_gemm.quantize_int8`. With K == 0
    the scales are 0.
    """
    m, k = x.shape
    assert q_out.shape == (m, k) and q_out.dtype == torch.int8, (q_out.shape, q_out.dtype)
    assert scale_out.shape == (m,) and scale_out.dtype == torch.float32, (scale_out.shape, scale_out.dtype)
    if m == 0:
        return q_out, scale_out
    if k == 0:
        scale_out.zero_()
        return q_out, scale_out
    block_k = min(max(triton.next_power_of_2(k), 16), 1024)
    num_warps = 4 if block_k >= 512 else 1 if block_k <= 64 else 2
    quantize_int8_kernel[(m,)](
        x, q_out, scale_out,
        k,
        x.stride(0), x.stride(1),
        q_out.stride(0), q_out.stride(1),
        scale_out.stride(0),
        BLOCK_K=block_k, ROUNDING_MAGIC=_ROUNDING_MAGIC,
        num_warps=num_warps,
    )
    return q_out, scale_out
