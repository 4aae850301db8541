"""RMSNorm fused with per-row int8 quantisation (and the residual add before it), the specification.

    h     = x (+ residual)                                    rounded to x's dtype (the add in float32)
    r[m]  = 1 / sqrt(sum_k h[m, k]**2 / K + eps)              float32, the sum in the order below
    y     = (h * weight) * r[:, None]                         float32, each product rounded once
    scale = max_k |y[m, k]| / 127                             quantize_int8 of y, exactly:
    q     = clamp(round_half_even(y / scale), -127, 127)     0 where scale is 0 or the quotient NaN

so `q * scale[:, None] ~= rmsnorm(h) * weight`, and (q, scale) equal
`kernelhub.reference.int8_gemm.quantize_int8(y)` bit for bit. That step is written out here rather
than called because it divides by 127 as a tensor: CUDA's torch divides by a Python scalar as a
multiplication by its reciprocal, which is not the correctly rounded quotient the kernels compute
(about 1 scale in 20 differs in the last bit); on the CPU both are the same division.

The returned `h` (with a residual) is the updated residual stream in x's dtype, and the norm is
taken of that rounded h, as vLLM's fused add + RMSNorm does: the next layer's residual and this
layer's norm see the same numbers.

Why the order of every operation is written down: q is a rounding of y / scale, so a y that is one
ulp off can move an element across a rounding boundary, and a float32 sum of K squares depends on
the order of its additions. Every path (this module, the CPU path, the Triton kernel on any GPU
and in the interpreter) does the same float32 operations in the same order, so they agree bit for
bit, whatever their tiles or launch configs:

- the sum of squares in `LANES` = 1024 interleaved lanes: lane j accumulates h[m, k]**2 for
  k = j, j + 1024, j + 2048, ... in that order, starting from 0 (a row is zero-padded to a multiple
  of 1024, and adding +0 changes no sum); then the 1024 lane sums are added in a pairwise tree,
  adjacent pairs first (lanes 2i and 2i + 1), level by level. A tree of fixed shape is
  reproducible because float addition is commutative (a + b == b + a exactly), while its
  associativity is not relied on anywhere. Error bound: (K / 1024 + 10) float32 roundings, 14 for
  K = 4096, against K - 1 for a left-to-right sum.
- every multiply and add rounded separately (no fused multiply-add), every division and the
  square root correctly rounded (IEEE), and 1 / sqrt rather than `torch.rsqrt`, which CUDA computes
  approximately; divisors are tensors (see above). eps is rounded to float32 first. torch's own
  float32 `sqrt` is not correctly rounded on the CPU (torch 2.13, AVX512: 17% of results one ulp
  off), so the reference takes the float64 square root and rounds it to float32, which gives the
  correctly rounded float32 root: for roots in [1, 2) (other binades scale alike) the float64
  result is within one of its ulps, 2**-52, of the exact root, which lies at least 2**-50 from
  every float32 rounding boundary (a boundary's square is an odd multiple of 2**-48, a float32
  input a multiple of 2**-23).
- `(h * weight) * r` rather than `(h * r) * weight`: the same value up to rounding, and the row's
  max |y| is then `max|h * weight| * r` exactly (rounding is monotonic), so a kernel knows it
  after one pass over the row.

Rows that are not all finite follow from the formula: a NaN in h makes r NaN, so y is NaN
throughout; an infinity makes the sum infinite and r = 0, so y is NaN where h * weight is infinite and 0
elsewhere. Either way quantize_int8 gives scale NaN and q = 0 throughout the row. A NaN in weight
makes every row's scale NaN, an infinity +Inf (NaN in a row where it meets h = 0), and q = 0
throughout. An all-zero row has r = 1 / sqrt(eps), y = 0, scale 0 and q 0; K = 0 gives scale 0
(quantize_int8's empty rows).
"""

from __future__ import annotations

import torch

LANES = 1024  # part of the summation order above: changing it changes results in the last bit


def lane_sum(squares: torch.Tensor) -> torch.Tensor:
    """Row sums of float32 `squares [M, K]` in the order of the module docstring -> float32 [M]."""
    m, k = squares.shape
    lanes = torch.zeros(m, LANES, dtype=torch.float32, device=squares.device)
    for start in range(0, k, LANES):  # lane j gets element start + j: chunk by chunk, in order
        chunk = squares[:, start:start + LANES]
        lanes[:, :chunk.shape[1]] += chunk
    while lanes.shape[1] > 1:  # the pairwise tree: (lane 2i) + (lane 2i + 1), level by level
        lanes = lanes[:, 0::2] + lanes[:, 1::2]
    return lanes[:, 0]


def inverse_rms_of_sum(sum_sq: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """`r = 1 / sqrt(sum_sq / K + eps)` of float32 `sum_sq [M]` -> float32 [M]."""
    mean_sq = sum_sq / torch.full_like(sum_sq, k)  # a tensor divisor (see the module docstring)
    eps32 = torch.tensor(eps, dtype=torch.float32, device=sum_sq.device)
    # The float32 square root, correctly rounded, taken in float64 (see the module docstring).
    root = torch.sqrt((mean_sq + eps32).to(torch.float64)).to(torch.float32)
    return torch.reciprocal(root)


def inverse_rms(h: torch.Tensor, eps: float) -> torch.Tensor:
    """`r = 1 / sqrt(mean(h**2, -1) + eps)` of `h [M, K]` (any float dtype) -> float32 [M]."""
    hf = h.to(torch.float32)
    return inverse_rms_of_sum(lane_sum(hf * hf), h.shape[-1], eps)


def add_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """`h = x + residual`, added in float32 and rounded to x's dtype (`x` itself without a residual)."""
    if residual is None:
        return x
    return (x.to(torch.float32) + residual.to(torch.float32)).to(x.dtype)


def rmsnorm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The float32 normalised rows `y = (h * weight) * r[:, None]` of `h [M, K]`, `weight [K]`."""
    return (h.to(torch.float32) * weight.to(torch.float32)) * inverse_rms(h, eps)[:, None]


def quantize_rows(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernelhub.reference.int8_gemm.quantize_int8` of float32 `y [M, K]`, dividing by tensors only:
    (int8 `q [M, K]`, float32 `scale [M]`)."""
    if y.shape[-1] == 0:  # the max of nothing is 0 here, as there
        absmax = torch.zeros(y.shape[:-1], dtype=torch.float32, device=y.device)
    else:
        absmax = y.abs().amax(dim=-1)  # NaN if the row holds one
    scale = absmax / torch.full_like(absmax, 127.0)
    q = y / scale[:, None]  # NaN where scale is, and where y = +-Inf meets scale = Inf
    q.round_().clamp_(-127, 127)  # rounds half to even; NaN stays NaN
    q.nan_to_num_(0.0).masked_fill_(~(scale[:, None] > 0), 0.0)
    return q.to(torch.int8), scale


def rmsnorm_quantize_int8(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                          residual: torch.Tensor | None = None):
    """RMSNorm of `x (+ residual)` [M, K] with `weight [K]`, quantised per row to int8.

    Returns `(q int8 [M, K], scale float32 [M])`, and with a residual also `h` (x's dtype [M, K]):
    `(q, scale, h)`.
    """
    h = add_residual(x, residual)
    q, scale = quantize_rows(rmsnorm(h, weight, eps))
    return (q, scale) if residual is None else (q, scale, h)
