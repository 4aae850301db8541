"""Per-row symmetric int8 quantisation in Triton, bit-exact with `kernelhub.reference.int8_gemm`.

Equivalent to the following PyTorch code (`reference.int8_gemm.quantize_int8`):

    absmax = x.abs().amax(dim=-1).float()                      # [M]; NaN if the row holds one, 0 if K == 0
    scale = absmax / 127                                       # IEEE float32 division
    q = torch.round(x.float() / scale[:, None]).clamp(-127, 127)   # round half to even; NaN stays NaN
    q = torch.where((scale[:, None] > 0) & ~q.isnan(), q, 0).to(torch.int8)

so a row holding a NaN gets scale NaN, one holding +-Inf scale +Inf, and q is 0 throughout both
(every quotient of a NaN row is NaN, an Inf row's are +-0 and Inf / Inf = NaN); an all-zero row
gets scale 0 and q 0.

One program per row, two passes over K in BLOCK_K chunks: the row's absmax, then the quantised
values. Bit-exactness needs three things Triton does not give by default:

- IEEE division. On NVIDIA GPUs Triton lowers float32 `/` to an approximate division (`div.full.f32`,
  up to 2 ulp off), so both divisions use `tl.math.div_rn`, the correctly rounded one.
- Round half to even without libdevice. For |v| < 2**22, `(v + 1.5 * 2**23) - 1.5 * 2**23` is exactly
  v rounded to the nearest integer, ties to even: the sum lies in [2**23, 2**24), where float32 values
  are exactly the integers, so the addition rounds v to an integer under the default
  round-to-nearest-even mode (1.5 * 2**23 is even, so the parity of the result is that of the
  integer chosen), and the subtraction is exact. Here |v| <= absmax / scale, which is 127 up to
  rounding, and below 191 even when absmax / 127 rounds to a subnormal scale: far inside the range.
  Without fast-math flags the compiler may not fold `(v + c) - c` into v.
- NaN that survives max and clamp. `tl.maximum` and `tl.minimum` return the other operand where one
  is NaN (they lower to IEEE maxNum / minNum), which made a NaN row's absmax finite and a NaN
  quotient -127. So the absmax pass counts NaNs on the side, and a NaN quotient is set to 0
  before it reaches the rounding and the clamp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernelhub.kernels.common.triton_helpers import LAUNCH_OPTIONS

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

    # Pass 1: absmax of the row, and whether it holds a NaN (which tl.maximum would drop).
    # |x| and max are exact, so the order does not matter.
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)  # [BLOCK_K]
    nan_count = tl.zeros((BLOCK_K,), dtype=tl.int32)  # [BLOCK_K]
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        mask_k = offs_k < K
        x = tl.load(x_row_ptr + offs_k.to(tl.int64) * stride_xk, mask=mask_k, other=0.0)  # [BLOCK_K]
        x_abs = tl.abs(x.to(tl.float32))  # [BLOCK_K]
        nan_count += (x_abs != x_abs).to(tl.int32)
        absmax = tl.maximum(absmax, x_abs)
    row_absmax = tl.where(tl.sum(nan_count, axis=0) > 0, float("nan"), tl.max(absmax, axis=0))

    scale = tl.math.div_rn(row_absmax, 127.0)  # NaN for a NaN row, +Inf for a row with an infinity
    tl.store(scale_ptr + pid_m.to(tl.int64) * stride_scale, scale)
    is_positive = scale > 0.0  # false for 0 (also when absmax / 127 underflows, as in the reference) and NaN
    safe_scale = tl.where(is_positive, scale, 1.0)  # those rows' q is 0 anyway: no 0 / 0 to compute

    # Pass 2: q = clamp(round_half_even(x / scale), -127, 127), or 0 where scale is not positive or
    # the quotient is NaN (Inf / Inf in a row with an infinity).
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        mask_k = offs_k < K
        x = tl.load(x_row_ptr + offs_k.to(tl.int64) * stride_xk, mask=mask_k, other=0.0)  # [BLOCK_K]
        v = tl.math.div_rn(x.to(tl.float32), safe_scale)  # [BLOCK_K]
        v = tl.where(v == v, v, 0.0)  # NaN -> 0 before the clamp, which would make it -127
        v = (v + ROUNDING_MAGIC) - ROUNDING_MAGIC
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        v = tl.where(is_positive, v, 0.0)
        tl.store(q_row_ptr + offs_k.to(tl.int64) * stride_qk, v.to(tl.int8), mask=mask_k)


def launch_config(k: int) -> dict[str, int]:
    """The (untuned) launch config for rows of K elements: the whole row in one block up to 1024."""
    block_k = min(max(triton.next_power_of_2(k), 16), 1024)
    return {"BLOCK_K": block_k, "num_warps": 4 if block_k >= 512 else 1 if block_k <= 64 else 2}


def quantize_int8_triton(x: torch.Tensor, *, q_out: torch.Tensor,
                         scale_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise float `x [M, K]` (float32, float16 or bfloat16, any strides) per row into int8
    `q_out [M, K]` and float32 `scale_out [M]`; returns `(q_out, scale_out)`.

    `scale_out[m] = max|x[m]| / 127` and `q_out[m] = clamp(round_half_even(x[m] / scale_out[m]), -127, 127)`
    (0 where the scale is 0 or the quotient is NaN: q is 0 throughout a row holding NaN or +-Inf,
    whose scale is NaN or +Inf), bit for bit as `reference.int8_gemm.quantize_int8` (a NaN scale
    is NaN in both, its payload aside). With K == 0 the scales are 0.
    """
    m, k = x.shape
    assert q_out.shape == (m, k) and q_out.dtype == torch.int8, (q_out.shape, q_out.dtype)
    assert scale_out.shape == (m,) and scale_out.dtype == torch.float32, (scale_out.shape, scale_out.dtype)
    if m == 0:
        return q_out, scale_out
    if k == 0:
        scale_out.zero_()
        return q_out, scale_out
    config = launch_config(k)
    quantize_int8_kernel[(m,)](
        x, q_out, scale_out,
        k,
        x.stride(0), x.stride(1),
        q_out.stride(0), q_out.stride(1),
        scale_out.stride(0),
        BLOCK_K=config["BLOCK_K"], ROUNDING_MAGIC=_ROUNDING_MAGIC,
        num_warps=config["num_warps"], **LAUNCH_OPTIONS,
    )
    return q_out, scale_out
