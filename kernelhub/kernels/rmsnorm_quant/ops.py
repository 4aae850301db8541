"""RMSNorm + int8 quantisation public op: validate -> backend -> best stored config -> launch.

Re-exported by `kernelhub.ops`; see there for backends and torch.library registration.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch

from kernelhub import backend, configs, validation
from kernelhub.device import device_for_tensor
from kernelhub.kernels.common.library import kernel_op
from kernelhub.kernels.rmsnorm_quant.kernel import rmsnorm_quant_triton
from kernelhub.kernels.rmsnorm_quant.spec import SPEC as RMSNORM_QUANT
from kernelhub.reference import rmsnorm_quant as ref

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# eps must survive its rounding to float32 as a positive finite number.
_FLOAT32_TINY = 2.0**-149
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    eps = float(eps)
    if not (math.isfinite(eps) and _FLOAT32_TINY <= eps <= _FLOAT32_MAX):
        raise ValueError(f"eps: expected a finite number > 0 that float32 can hold (e.g. 1e-6), got {eps!r}")
    return eps


def _check_inputs(x, weight, eps, residual) -> float:
    """Dtypes, shapes, devices and eps (metadata only: no data is read). Returns eps as a float."""
    validation.tensor("x", x, dtypes=_FLOAT_DTYPES, ndim=2)
    m, k = x.shape
    x_dtype = validation.dtype_name(x.dtype)
    weight_dtypes = tuple(dict.fromkeys((x.dtype, torch.float32)))
    if isinstance(weight, torch.Tensor) and weight.dtype not in weight_dtypes:
        allowed = "float32" if x.dtype == torch.float32 else f"{x_dtype} (that of x) or float32"
        raise TypeError(f"weight: expected dtype {allowed}, got {validation.dtype_name(weight.dtype)}")
    validation.tensor("weight", weight, dtypes=weight_dtypes, ndim=1)
    validation.shape("weight", weight, (k,), "[K]")
    if residual is not None:
        if isinstance(residual, torch.Tensor) and residual.dtype != x.dtype:
            raise TypeError(f"residual: expected dtype {x_dtype} (that of x), "
                            f"got {validation.dtype_name(residual.dtype)}")
        validation.tensor("residual", residual, dtypes=(x.dtype,), ndim=2)
        validation.shape("residual", residual, (m, k), "[M, K] (that of x)")
    eps = _check_eps(eps)
    validation.same_device(x=x, weight=weight, residual=residual)
    return eps


# Up to this many elements (M = 16 at K = 4096) the CPU path computes in numpy, whose per-operation
# cost on small arrays is a fraction of torch's; beyond it the [M, K] passes are torch's, which
# spread over the cores where numpy keeps to one. Measured on one thread of the 2-core CI VM, the
# numpy form takes 0.55 to 0.7x the torch form's time at M = 1 and 0.85x at M = 2048, K = 4096.
_NUMPY_MAX_ELEMENTS = 1 << 16


def _lane_sum_host(squares: np.ndarray) -> np.ndarray:
    """`reference.rmsnorm_quant.lane_sum` in numpy (float32 [M, K] -> [M]): the same float32 adds
    in the same order, at a fraction of a microsecond per step where torch takes one or two."""
    m, k = squares.shape
    lanes = np.zeros((m, ref.LANES), dtype=np.float32)
    for start in range(0, k, ref.LANES):
        chunk = squares[:, start:start + ref.LANES]
        lanes[:, :chunk.shape[1]] += chunk
    while lanes.shape[1] > 1:
        lanes = lanes[:, 0::2] + lanes[:, 1::2]
    return lanes[:, 0]


def _row_factors(sum_sq: np.ndarray, z_max: np.ndarray, k: int, eps: float):
    """float32 [M] r, scale = max|y| / 127 (from max|h * weight|) and the rows whose scale is
    positive and finite; the others get q = 0 throughout."""
    r = np.float32(1.0) / np.sqrt(sum_sq / np.float32(k) + np.float32(eps))
    scale = (z_max * r) / np.float32(127.0)
    return r, scale, (scale > 0) & (scale < np.inf)


def _quantize_numpy(hf: np.ndarray, weight: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    y = hf * hf
    sum_sq = _lane_sum_host(y)
    np.multiply(hf, weight, out=y)  # h * weight, in the squares' buffer
    r, scale, usable = _row_factors(sum_sq, np.maximum(y.max(axis=1), -y.min(axis=1)), hf.shape[1], eps)
    y *= r[:, None]
    if not usable.all():
        y[~usable] = 0.0  # y may be NaN there
    y /= np.where(usable, scale, np.float32(1.0))[:, None]
    return np.clip(np.rint(y, out=y), -127, 127, out=y).astype(np.int8), scale


def _quantize_torch(hf: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, np.ndarray]:
    y = hf * hf
    sum_sq = _lane_sum_host(y.numpy())
    torch.mul(hf, weight, out=y)  # h * weight, in the squares' buffer
    z_max = np.maximum(y.amax(dim=-1).numpy(), -y.amin(dim=-1).numpy())  # amax and amin: no |y| tensor
    r, scale, usable = _row_factors(sum_sq, z_max, hf.shape[1], eps)
    y.mul_(torch.from_numpy(r[:, None]))
    if not usable.all():
        y.masked_fill_(torch.from_numpy(~usable[:, None]), 0.0)  # y may be NaN there
    y.div_(torch.from_numpy(np.where(usable, scale, np.float32(1.0))[:, None]))
    return y.round_().clamp_(-127, 127).to(torch.int8), scale


def _cpu_rmsnorm_quantize_int8(x, weight, residual, eps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's arithmetic in fewer operations, bit for bit (tests/test_rmsnorm_quant.py).

    h * weight is formed once, in the buffer of the squares, and scaled in place into y; the row
    max of |y| is `max|h * weight| * r` (one pass, no |y| array). The lanes' sum and the per-row
    values are numpy float32 (numpy's float32 sqrt is correctly rounded, torch's is not), and
    small problems run in numpy throughout. quantize_int8's NaN/zero handling touches only the
    rows that need it: a row whose scale is positive and finite has finite quotients.
    """
    m, k = x.shape
    h = x if residual is None else torch.add(x, residual)  # 16-bit: added in float32, rounded once
    h_out = h if residual is not None else x.new_empty((0,))
    if m == 0 or k == 0:
        return x.new_empty((m, k), dtype=torch.int8), x.new_zeros((m,), dtype=torch.float32), h_out
    hf = h.detach().to(torch.float32)  # detached: a Parameter read under no_grad has no numpy view
    w = weight.detach().to(torch.float32)
    with np.errstate(all="ignore"):  # non-finite rows are defined (see the reference), not warned of
        if hf.numel() <= _NUMPY_MAX_ELEMENTS:
            q, scale = _quantize_numpy(hf.numpy(), w.numpy(), eps)
            return torch.from_numpy(q), torch.from_numpy(scale), h_out
        q, scale = _quantize_torch(hf, w, eps)
    return q, torch.from_numpy(scale), h_out


def _fake_rmsnorm_quantize_int8(x, weight, residual, eps):
    m, k = x.shape
    h_shape = (m, k) if residual is not None else (0,)
    return x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32), x.new_empty(h_shape)


@kernel_op("rmsnorm_quantize_int8", fake=_fake_rmsnorm_quantize_int8)
def _rmsnorm_quantize_int8(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, h), h empty [0] without a residual (a registered op's outputs cannot alias x)."""
    path = backend.choose(x)
    if path == "reference":
        q, scale, *h = ref.rmsnorm_quantize_int8(x, weight, eps, residual)
        return q, scale, h[0] if h else x.new_empty((0,))
    if path == "cpu":
        return _cpu_rmsnorm_quantize_int8(x, weight, residual, eps)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    h = torch.empty((m, k) if residual is not None else (0,), dtype=x.dtype, device=x.device)
    shape = (m, k, int(residual is not None))
    config = configs.best_config(RMSNORM_QUANT, shape, validation.dtype_name(x.dtype), device_for_tensor(x))
    rmsnorm_quant_triton(x, weight, eps, config=config, q_out=q, scale_out=scale, residual=residual,
                         h_out=h if residual is not None else None)
    return q, scale, h


def rmsnorm_quantize_int8(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                          residual: torch.Tensor | None = None):
    """RMSNorm quantised per row to int8, for the int8 GEMM that follows: `x [M, K]` ->
    (int8 `q [M, K]`, float32 `scale [M]`), with `residual=` -> `(q, scale, h)`.

    x: float32, float16 or bfloat16, any strides. weight: `[K]`, x's dtype or float32. residual:
    optional `[M, K]` in x's dtype, added first; `h = x + residual` (added in float32, rounded to
    x's dtype) is returned as the updated residual stream, and the norm is taken of that rounded h
    (vLLM's fused add + RMSNorm). eps: finite, > 0, used as float32. Equivalent to

        h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
        r = 1 / torch.sqrt(h.float().pow(2).mean(-1) + eps)
        q, scale = kernelhub.ops.quantize_int8((h.float() * weight.float()) * r[:, None])

    with a correctly rounded square root (torch's CPU `sqrt` is not) and the additions of the mean
    in the order `kernelhub.reference.rmsnorm_quant` fixes (1024 interleaved lanes, then a pairwise
    tree; torch's `mean` adds in an order of its own, which can move r by an ulp): every backend
    returns that reference's q, scale and h bit for bit. So
    `q * scale[:, None]` approximates the normalised rows with quantize_int8's error; an all-zero
    row gives scale 0 and q 0, a row holding NaN or Inf (in x or the residual) scale NaN and q 0
    throughout.
    """
    eps = _check_inputs(x, weight, eps, residual)
    q, scale, h = _rmsnorm_quantize_int8(x, weight, residual, eps)
    return (q, scale) if residual is None else (q, scale, h)
