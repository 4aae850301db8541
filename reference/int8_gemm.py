"""int8 GEMM, the specification (NGEMM's kernels, in plain PyTorch).

    int8_gemm:         C[m, n] = sum_k A[m, k] * B[k, n]                 int8 x int8 -> int32, exact
    int8_scaled_gemm:  out = (float32(C) * scale_a[:, None]) * scale_b[None, :] (+ bias)  -> out_dtype
    quantize_int8:     scale[m] = max_k |x[m, k]| / 127                      (0 for an empty row, K = 0)
                       q[m, k]  = clamp(round_half_even(x[m, k] / scale[m]), -127, 127)
                                  or 0 where scale[m] is 0 or the quotient is NaN

Rows that are not all finite are well defined too (a float -> int8 cast of NaN is not): the
maximum propagates NaN, so a row holding a NaN gets scale NaN and every quotient is NaN; a row
holding +-Inf (and no NaN) gets scale +Inf, its finite elements quotient +-0 and its infinities
Inf / Inf = NaN. Either way q is 0 throughout such a row, and `q * scale` is NaN throughout it.

Products are accumulated exactly: every partial sum is an integer below K * 128 * 128 < 2**53, so
float64 matmul (fast on CPU and on CUDA, where integer matmul does not exist) is exact in any
summation order, and the result fits int32 for K < 131,000. The dequantisation is done
in float32 in the order written above and rounded once to `out_dtype`.
"""

from __future__ import annotations

import torch


def int8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 `a [M, K]` @ int8 `b [K, N]` -> int32 `[M, N]`, exact."""
    return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)


def int8_scaled_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`(A @ B) * scale_a[:, None] * scale_b[None, :] (+ bias)` in float32, cast to `out_dtype`.

    a int8 [M, K], b int8 [K, N], scale_a float32 [M], scale_b float32 [N], bias [N] (any float dtype).
    """
    acc = int8_gemm(a, b).to(torch.float32)
    out = (acc * scale_a.to(torch.float32)[:, None]) * scale_b.to(torch.float32)[None, :]
    if bias is not None:
        out = out + bias.to(torch.float32)[None, :]
    return out.to(out_dtype)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantisation of float `x [M, K]` -> (int8 `q [M, K]`, float32 `scale [M]`)."""
    if x.shape[-1] == 0:  # amax has no identity to start from; the max of nothing is 0 here
        absmax = torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
    else:
        absmax = x.abs().amax(dim=-1).to(torch.float32)  # NaN if the row holds one
    # A tensor divisor: CUDA divides by a Python scalar as a multiplication by its reciprocal,
    # which is not the correctly rounded quotient the kernels compute.
    scale = absmax / torch.full_like(absmax, 127.0)
    q = x.to(torch.float32) / scale[:, None]  # NaN where scale is, and where x = +-Inf meets scale = Inf
    q.round_().clamp_(-127, 127)  # rounds half to even; NaN stays NaN
    q.nan_to_num_(0.0).masked_fill_(~(scale[:, None] > 0), 0.0)
    return q.to(torch.int8), scale
