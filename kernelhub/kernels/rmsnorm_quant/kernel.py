"""RMSNorm + per-row int8 quantisation in Triton (with the residual add before it), bit-exact with
`kernelhub.reference.rmsnorm_quant`.

Equivalent to the following PyTorch code (the reference states the order of every operation):

    h = (x.float() + residual.float()).to(x.dtype) if residual is not None else x
    r = 1 / sqrt(lane_sum(h.float() ** 2) / K + eps)         # [M]: 1024 lanes, then a pairwise tree
    y = (h.float() * weight.float()) * r[:, None]            # [M, K] float32
    scale = y.abs().amax(-1) / 127                           # [M]
    q = round_half_even(y / scale[:, None]).clamp(-127, 127) # 0 where scale is 0 or the quotient NaN

One program normalises one row, in two passes over K:

1. In tiles of LANES = 1024 columns (the reference's lanes, whatever the config): h (stored when
   there is a residual), the lanes' sums of squares `acc += h * h`, and the running max of
   |h * weight|. Then the pairwise tree over the lanes gives the sum, r follows, and the row's
   max |y| is `max|h * weight| * r` (rounding is monotonic, so this is exactly the max of the
   rounded products), hence the scale, before any y is formed.
2. In tiles of BLOCK_K columns: y = (h * weight) * r again (h recomputed from x and the residual,
   bit for bit the stored one), then q as `quantize_int8` computes it. The second read of a row is
   served by L1/L2 for any realistic K (16 KiB per row of bfloat16 at K = 8192, with a residual).

Bit-exactness takes, besides the fixed order of the sum:

- `enable_fp_fusion=False` (LAUNCH_OPTIONS), so that `acc + h * h` and `(v + c) - c` are not contracted into fused
  multiply-adds (one rounding instead of two);
- correctly rounded division and square root (`div_rn`, `sqrt_rn`): Triton's default float32 `/`
  on NVIDIA GPUs is approximate, and so is `rsqrt`;
- the pairwise tree done by hand, `tl.split` of adjacent pairs level by level: `tl.sum` adds in an
  order of the compiler's choosing (in-thread first, then across threads);
- under Triton's interpreter (CPU tensors), x + residual rounded to bfloat16 with integer ops: the
  interpreter's float32 -> bfloat16 cast truncates (Triton 3.9), where GPUs round to nearest even;
- round half to even as `(v + 1.5 * 2**23) - 1.5 * 2**23` (|v| < 2**22, see int8_gemm/quantize.py),
  and NaN handled before `tl.maximum`/`tl.minimum`, which on NVIDIA GPUs return the other operand.
  The running max of |h * weight| propagates NaN (`PropagateNan.ALL`); the lanes' max is then
  checked for NaN, which `tl.max` would drop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernelhub.kernels.common.triton_helpers import LAUNCH_OPTIONS
from kernelhub.reference.rmsnorm_quant import LANES

# 1.5 * 2**23: adding and then subtracting it rounds a float32 |v| < 2**22 to an integer, ties to even.
_ROUNDING_MAGIC = 12582912.0
_LOG2_LANES = LANES.bit_length() - 1


@triton.jit
def _round_to_bfloat16(v):
    """float32 `v` rounded to bfloat16, to nearest, ties to even, by integer arithmetic on its bits
    (NaN stays NaN, its payload aside)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)  # carries into the upper half exactly when rounding up
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(v == v, rounded, float("nan"))


@triton.jit
def _load_h(x_row_ptr, res_row_ptr, offs_k, mask_k, stride_xk, stride_rk,
            HAS_RESIDUAL: tl.constexpr, BFLOAT16_BY_HAND: tl.constexpr):
    """h [TILE] of one row in x's dtype: x, or x + residual added in float32 and rounded to x's dtype."""
    cols = offs_k.to(tl.int64)
    h = tl.load(x_row_ptr + cols * stride_xk, mask=mask_k, other=0.0)  # [TILE]
    if HAS_RESIDUAL:
        res = tl.load(res_row_ptr + cols * stride_rk, mask=mask_k, other=0.0)  # [TILE]
        total = h.to(tl.float32) + res.to(tl.float32)
        if BFLOAT16_BY_HAND:
            h = _round_to_bfloat16(total)
        else:
            h = total.to(h.dtype)
    return h


@triton.jit
def _pairwise_sum(acc, WIDTH: tl.constexpr, LOG2_WIDTH: tl.constexpr):
    """The sum of acc [WIDTH] by a pairwise tree: elements 2i and 2i + 1 first, level by level."""
    for level in tl.static_range(LOG2_WIDTH):
        pairs = tl.reshape(acc, (WIDTH >> (level + 1), 2))  # [WIDTH / 2**(level + 1), 2]
        even, odd = tl.split(pairs)
        acc = even + odd
    return tl.sum(acc, axis=0)  # of one element


@triton.jit
def rmsnorm_quant_kernel(
    # Pointers: x [M, K], residual [M, K] and h [M, K] in x's dtype (used when HAS_RESIDUAL),
    # weight [K], q int8 [M, K], scale float32 [M].
    x_ptr, res_ptr, w_ptr, h_ptr, q_ptr, scale_ptr,
    # Sizes, and eps as float32.
    K, eps,
    # Strides, in elements.
    stride_xm, stride_xk,
    stride_rm, stride_rk,
    stride_w,
    stride_hm, stride_hk,
    stride_qm, stride_qk,
    stride_scale,
    # Meta-parameters.
    BLOCK_K: tl.constexpr,  # columns per step of pass 2
    LANES: tl.constexpr, LOG2_LANES: tl.constexpr,  # columns per step of pass 1: the reference's lanes
    HAS_RESIDUAL: tl.constexpr,
    BFLOAT16_BY_HAND: tl.constexpr,  # round x + residual to bfloat16 with integer ops (the interpreter)
    ROUNDING_MAGIC: tl.constexpr,
):
    pid_m = tl.program_id(axis=0).to(tl.int64)
    x_row_ptr = x_ptr + pid_m * stride_xm
    res_row_ptr = res_ptr + pid_m * stride_rm
    h_row_ptr = h_ptr + pid_m * stride_hm
    q_row_ptr = q_ptr + pid_m * stride_qm

    # Pass 1: h, the lanes' sums of squares and the running max of |h * weight|.
    acc = tl.zeros((LANES,), dtype=tl.float32)  # [LANES]
    z_max = tl.zeros((LANES,), dtype=tl.float32)  # [LANES]
    for k_start in range(0, K, LANES):
        offs_k = k_start + tl.arange(0, LANES)  # [LANES]
        mask_k = offs_k < K
        h = _load_h(x_row_ptr, res_row_ptr, offs_k, mask_k, stride_xk, stride_rk, HAS_RESIDUAL,
                    BFLOAT16_BY_HAND)  # [LANES]
        if HAS_RESIDUAL:
            tl.store(h_row_ptr + offs_k.to(tl.int64) * stride_hk, h, mask=mask_k)
        w = tl.load(w_ptr + offs_k.to(tl.int64) * stride_w, mask=mask_k, other=0.0).to(tl.float32)  # [LANES]
        hf = h.to(tl.float32)
        acc = acc + hf * hf
        z_max = tl.maximum(z_max, tl.abs(hf * w), propagate_nan=tl.PropagateNan.ALL)

    sum_sq = _pairwise_sum(acc, LANES, LOG2_LANES)
    has_nan = tl.max((z_max != z_max).to(tl.int32), axis=0) > 0
    row_z_max = tl.where(has_nan, float("nan"), tl.max(z_max, axis=0))
    mean_sq = tl.math.div_rn(sum_sq, tl.zeros_like(sum_sq) + K)  # K converted to float32
    r = tl.math.div_rn(tl.zeros_like(sum_sq) + 1.0, tl.math.sqrt_rn(mean_sq + eps))
    scale = tl.math.div_rn(row_z_max * r, 127.0)  # max|y| / 127
    tl.store(scale_ptr + pid_m * stride_scale, scale)
    is_positive = scale > 0.0  # false for 0 and NaN
    safe_scale = tl.where(is_positive, scale, 1.0)  # those rows' q is 0 anyway: no 0 / 0 to compute

    # Pass 2: y = (h * weight) * r and q = clamp(round_half_even(y / scale), -127, 127), or 0 where
    # scale is not positive or the quotient is NaN (Inf / Inf in a row with an infinity).
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        mask_k = offs_k < K
        h = _load_h(x_row_ptr, res_row_ptr, offs_k, mask_k, stride_xk, stride_rk, HAS_RESIDUAL,
                    BFLOAT16_BY_HAND)  # [BLOCK_K]
        w = tl.load(w_ptr + offs_k.to(tl.int64) * stride_w, mask=mask_k, other=0.0).to(tl.float32)  # [BLOCK_K]
        y = (h.to(tl.float32) * w) * r  # [BLOCK_K]
        v = tl.math.div_rn(y, safe_scale)
        v = tl.where(v == v, v, 0.0)  # NaN -> 0 before the clamp, which would make it -127
        v = (v + ROUNDING_MAGIC) - ROUNDING_MAGIC
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        v = tl.where(is_positive, v, 0.0)
        tl.store(q_row_ptr + offs_k.to(tl.int64) * stride_qk, v.to(tl.int8), mask=mask_k)


def rmsnorm_quant_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, *, config: dict, q_out: torch.Tensor,
                         scale_out: torch.Tensor, residual: torch.Tensor | None = None,
                         h_out: torch.Tensor | None = None):
    """RMSNorm of `x (+ residual)` with `weight`, quantised per row, into `q_out`, `scale_out` (and
    `h_out`); returns `(q_out, scale_out)`, or `(q_out, scale_out, h_out)` with a residual.

    x [M, K] float32/float16/bfloat16; residual and h_out [M, K] in x's dtype; weight [K] in x's
    dtype or float32; q_out int8 [M, K]; scale_out float32 [M]; any strides. `config` holds
    BLOCK_K and num_warps; inputs are assumed validated by the caller (`rmsnorm_quant.ops`).
    """
    m, k = x.shape
    assert weight.shape == (k,) and q_out.shape == (m, k) and scale_out.shape == (m,), \
        (x.shape, weight.shape, q_out.shape, scale_out.shape)
    has_residual = residual is not None
    assert has_residual == (h_out is not None), "residual and h_out go together"
    outputs = (q_out, scale_out, h_out) if has_residual else (q_out, scale_out)
    if m == 0:
        return outputs
    if k == 0:  # quantize_int8 of empty rows
        scale_out.zero_()
        return outputs
    # Unused pointers still need a tensor to point at; HAS_RESIDUAL keeps them from being touched.
    res_arg = residual if has_residual else x
    h_arg = h_out if has_residual else x
    rmsnorm_quant_kernel[(m,)](
        x, res_arg, weight, h_arg, q_out, scale_out,
        k, eps,
        x.stride(0), x.stride(1),
        res_arg.stride(0), res_arg.stride(1),
        weight.stride(0),
        h_arg.stride(0), h_arg.stride(1),
        q_out.stride(0), q_out.stride(1),
        scale_out.stride(0),
        BLOCK_K=config["BLOCK_K"], LANES=LANES, LOG2_LANES=_LOG2_LANES,
        HAS_RESIDUAL=has_residual, ROUNDING_MAGIC=_ROUNDING_MAGIC,
        BFLOAT16_BY_HAND=has_residual and x.dtype == torch.bfloat16 and x.device.type == "cpu",
        num_warps=config["num_warps"], num_stages=1, **LAUNCH_OPTIONS,
    )
    return outputs
