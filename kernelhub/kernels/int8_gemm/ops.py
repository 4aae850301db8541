"""int8 GEMM public ops: validate -> backend -> best stored config -> launch.

Re-exported by `kernelhub.ops`; see there for backends and torch.library registration.
"""

from __future__ import annotations

import torch

from kernelhub import backend, configs, validation
from kernelhub.device import device_for_tensor
from kernelhub.kernels.common.library import kernel_op
from kernelhub.kernels.int8_gemm.cpu import cpu_int8_scaled_gemm, int_mm_cpu, quantize_int8_cpu
from kernelhub.kernels.int8_gemm.spec import SPEC as INT8_GEMM
from kernelhub.kernels.int8_gemm.kernel import int8_gemm_triton
from kernelhub.kernels.int8_gemm.quantize import quantize_int8_triton
from kernelhub.reference import int8_gemm as int8_ref

# Products of int8 values are at most 128 * 128 = 2**14 in magnitude, so K * 2**14 < 2**31 keeps
# every int32 sum exact.
MAX_K = 2**17 - 1

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# int8 GEMM
# ----------------------------------------------------------------------------------------------

_INT8 = (torch.int8,)
_FLOAT32 = (torch.float32,)


def _check_int8_operands(a, b) -> tuple[int, int, int]:
    validation.tensor("a", a, dtypes=_INT8, ndim=2)
    validation.tensor("b", b, dtypes=_INT8, ndim=2)
    m, k = a.shape
    k_b, n = b.shape
    if k_b != k:
        raise ValueError(f"b: expected shape [K, N] with K = a.shape[1] = {k}, got {tuple(b.shape)}")
    if k > MAX_K:
        raise ValueError(f"a: K = {k} exceeds {MAX_K}, beyond which the int32 accumulator can overflow")
    return m, n, k


# The common call, accepted at once. The checks (`_check_int8_gemm`, `_check_int8_scaled_gemm`)
# name what is wrong, and on the CPU they cost more than a decode-size kernel's launch: each is a
# Python call with keyword arguments, and `same_device` builds a dictionary of the tensors. The two
# functions below ask the same questions with the fewest attribute reads and answer yes only when
# every check would pass; anything else (an error, a tensor that requires grad, a device other than
# the CPU or one CUDA device, an `out=`) runs the checks, which raise or let the call through.
# What each costs: benchmarks/cpu_int8.py's second table. tests/test_ops.py holds the two to
# agreeing on every call it builds.

_TENSOR, _INT8_DTYPE, _FLOAT32_DTYPE = torch.Tensor, torch.int8, torch.float32  # module globals: one lookup each


def _accepted_int8_shape(a, b) -> tuple[int, int] | None:
    """(M, N) when `_check_int8_operands(a, b)` passes and a and b are on the CPU or on one CUDA
    device, else None. (An int8 tensor never requires grad: torch allows it only for floats.)"""
    if not (isinstance(a, _TENSOR) and isinstance(b, _TENSOR) and a.dtype is _INT8_DTYPE and b.dtype is _INT8_DTYPE):
        return None
    try:
        (m, k), (k_b, n) = a.shape, b.shape
    except ValueError:  # not 2-D
        return None
    if k != k_b or k > MAX_K:
        return None
    if (a.is_cpu and b.is_cpu) or (a.is_cuda and b.is_cuda and a.get_device() == b.get_device()):
        return m, n
    return None


def _accepts_scaled(a, b, scale_a, scale_b, bias, out_dtype) -> bool:
    """Whether int8_scaled_gemm's checks (`out` aside) pass for these arguments: the questions of
    `_accepted_int8_shape` asked inline (one Python call fewer), the CPU's answer first."""
    if not (isinstance(a, _TENSOR) and isinstance(b, _TENSOR) and isinstance(scale_a, _TENSOR)
            and isinstance(scale_b, _TENSOR) and a.dtype is _INT8_DTYPE and b.dtype is _INT8_DTYPE
            and scale_a.dtype is _FLOAT32_DTYPE and scale_b.dtype is _FLOAT32_DTYPE and out_dtype in _FLOAT_DTYPES):
        return False
    try:
        (m, k), (k_b, n) = a.shape, b.shape
    except ValueError:  # not 2-D
        return False
    if (k != k_b or k > MAX_K or scale_a.shape != (m,) or scale_b.shape != (n,)
            or scale_a.requires_grad or scale_b.requires_grad):
        return False
    if bias is not None and not (isinstance(bias, _TENSOR) and bias.dtype in _FLOAT_DTYPES
                                 and bias.shape == (n,) and not bias.requires_grad):
        return False
    if a.is_cpu:
        return b.is_cpu and scale_a.is_cpu and scale_b.is_cpu and (bias is None or bias.is_cpu)
    if not (a.is_cuda and b.is_cuda):
        return False
    index = a.get_device()
    return (b.get_device() == index and scale_a.is_cuda and scale_a.get_device() == index and scale_b.is_cuda
            and scale_b.get_device() == index and (bias is None or (bias.is_cuda and bias.get_device() == index)))


def _check_int8_gemm(a, b, out) -> None:
    """int8_gemm's checks, each error naming its argument."""
    m, n, _ = _check_int8_operands(a, b)
    device = validation.same_device(a=a, b=b)
    if out is not None:
        validation.out_tensor(out, shape=(m, n), dtype=torch.int32, device=device, inputs={"a": a, "b": b})


def _fake_int8_gemm(a, b):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)


@kernel_op("int8_gemm", fake=_fake_int8_gemm)
def _int8_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    path = backend.choose(a)
    if path == "reference":
        result = int8_ref.int8_gemm(a, b)
        return result if out is None else out.copy_(result)
    if path == "cpu":
        return int_mm_cpu(a, b, out)
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=torch.int32, device=a.device)
    config = configs.best_config(INT8_GEMM, (m, n, k), "int32", device_for_tensor(a))
    return int8_gemm_triton(a, b, config=config, out=out)


def int8_gemm(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact int8 GEMM: `a [M, K] @ b [K, N] -> int32 [M, N]`.

    a, b: int8, on one device, any strides (pass a weight `w [N, K]` as `w.t()`: no copy is made;
    broadcast or overlapping views are read right too). out: optional int32 `[M, N]`, any strides
    with one memory location per element, sharing no memory with a or b. Equivalent to
    `(a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)`.
    """
    if out is not None or _accepted_int8_shape(a, b) is None:
        _check_int8_gemm(a, b, out)
    return _int8_gemm(a, b, out)


def _check_int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype, out) -> None:
    """int8_scaled_gemm's checks, each error naming its argument."""
    m, n, _ = _check_int8_operands(a, b)
    validation.tensor("scale_a", scale_a, dtypes=_FLOAT32, ndim=1)
    validation.shape("scale_a", scale_a, (m,), "[M]")
    validation.tensor("scale_b", scale_b, dtypes=_FLOAT32, ndim=1)
    validation.shape("scale_b", scale_b, (n,), "[N]")
    if bias is not None:
        validation.tensor("bias", bias, dtypes=_FLOAT_DTYPES, ndim=1)
        validation.shape("bias", bias, (n,), "[N]")
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected torch.bfloat16, torch.float16 or torch.float32, got {out_dtype}")
    device = validation.same_device(a=a, b=b, scale_a=scale_a, scale_b=scale_b, bias=bias)
    if out is not None:
        validation.out_tensor(out, shape=(m, n), dtype=out_dtype, device=device,
                              inputs={"a": a, "b": b, "scale_a": scale_a, "scale_b": scale_b, "bias": bias})


def _fake_int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


@kernel_op("int8_scaled_gemm", fake=_fake_int8_scaled_gemm)
def _int8_scaled_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    path = backend.choose(a)
    if path == "reference":
        result = int8_ref.int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype)
        return result if out is None else out.copy_(result)
    if path == "cpu":
        return cpu_int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype, out)
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    config = configs.best_config(INT8_GEMM, (m, n, k), validation.dtype_name(out_dtype), device_for_tensor(a))
    return int8_gemm_triton(a, b, config=config, out=out, scale_a=scale_a, scale_b=scale_b, bias=bias)


def int8_scaled_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 GEMM with a fused dequantising epilogue: `[M, K] @ [K, N] -> out_dtype [M, N]`.

    a int8 [M, K], b int8 [K, N] (any strides), scale_a float32 [M] (per row of a), scale_b float32
    [N] (per column of b), bias [N] float32/float16/bfloat16 or None; out_dtype bfloat16, float16
    or float32; out: optional `[M, N]` of out_dtype (any strides, overlapping neither itself nor
    an input). Equivalent to

        acc = (a.double() @ b.double()).float()
        out = ((acc * scale_a[:, None]) * scale_b[None, :] + bias).to(out_dtype)

    within one rounding of out_dtype (the kernels accumulate exactly in int32, then scale in float32).
    """
    if out is not None or not _accepts_scaled(a, b, scale_a, scale_b, bias, out_dtype):
        _check_int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype, out)
    return _int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype, out)


# ----------------------------------------------------------------------------------------------
# int8 quantisation
# ----------------------------------------------------------------------------------------------

def _fake_quantize_int8(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


@kernel_op("quantize_int8", fake=_fake_quantize_int8)
def _quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    path = backend.choose(x)
    if path == "reference":
        return int8_ref.quantize_int8(x)
    if path == "cpu":
        return quantize_int8_cpu(x)
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    return quantize_int8_triton(x, q_out=q, scale_out=scale)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantisation: float `x [M, K]` -> (int8 `q [M, K]`, float32 `scale [M]`).

    x: any strides. `scale = absmax(row) / 127`, `q = clamp(round_half_even(x / scale), -127, 127)`,
    so `x ~= q * scale[:, None]`; an all-zero row (and every row when K = 0) gets scale 0 and q 0.
    Rows that are not all finite: q is 0 wherever the quotient is NaN, which makes it 0 throughout
    a row holding a NaN (its scale is NaN) or +-Inf (its scale is +Inf), and `q * scale` NaN there.
    Bit-exact with `kernelhub.reference.int8_gemm.quantize_int8` on every backend (a NaN scale is
    NaN in both, its payload aside).
    """
    validation.tensor("x", x, dtypes=_FLOAT_DTYPES, ndim=2)
    return _quantize_int8(x)
