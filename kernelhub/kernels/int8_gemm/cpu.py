"""The CPU paths of the int8 family (`KERNELHUB_BACKEND=auto` on a CPU tensor): oneDNN's int8 GEMM
(`torch._int_mm`) on operands it reads right, the dequantising epilogue, and a quantiser without
large temporaries. Each is bit-exact with `kernelhub.reference.int8_gemm` (the GEMM and quantiser) or
within its stated tolerance (the scaled GEMM); tests/test_int8_kernels.py and tests/test_layouts.py
hold them to it.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from kernelhub.kernels.int8_gemm import native
from kernelhub.reference import int8_gemm as int8_ref


def onednn_operand(t: torch.Tensor) -> torch.Tensor:
    """int8 `t [R, C]` as an operand oneDNN reads right: `t` itself, `t` with the stride of a size-1
    dimension set to its row-major value (same memory, no copy), or a contiguous copy.

    On the CPU `torch._int_mm` is oneDNN, which takes strides literally. Measured on torch 2.13
    over every stride pair in {0, 1, 2, 3, R, C, R + 1, C + 1, 2R, 2C} at several shapes
    (tests/test_layouts.py keeps the cases that matter): it computes right for a row-major-like
    operand, `stride(1) == 1 and stride(0) >= max(1, C)`, and a column-major-like one,
    `stride(0) == 1 and stride(1) >= max(1, R)`; torch copies an operand with no unit stride itself.
    Any other operand with a unit stride (a zero stride from `expand`, rows that overlap) makes
    oneDNN give up ("could not construct a memory descriptor") and torch's fallback leaves the
    output unwritten, so it is copied here. The stride of a size-1 dimension addresses nothing, yet
    oneDNN misreads some (`w.t()` of a `[N, 1]` weight has strides (1, 1)): it is normalised first.
    """
    rows, cols = t.shape
    stride_r, stride_c = t.stride()
    if rows == 1 or cols == 1:  # a size-1 dimension's stride, normalised (the common case skips this)
        normal = (max(1, cols) if rows == 1 else stride_r, 1 if cols == 1 else stride_c)
        if normal != (stride_r, stride_c):
            t = t.as_strided((rows, cols), normal)
        stride_r, stride_c = normal
    if stride_c == 1 and stride_r >= cols and stride_r >= 1:  # row-major-like
        return t
    if stride_r == 1 and stride_c >= rows and stride_c >= 1:  # column-major-like
        return t
    return t.contiguous()


def _full_range_probes() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """int8 operand pairs whose products, added in pairs, overflow int16: every value 127, signs
    alternating along K, and seeded full-range values; B row- and column-major."""
    generator = torch.Generator().manual_seed(0)
    high = torch.full((17, 64), 127, dtype=torch.int8)
    alternating = high.clone()
    alternating[:, 1::2] = -127
    noise = torch.randint(-128, 128, (17, 64), generator=generator, dtype=torch.int8)
    weights = torch.randint(-128, 128, (64, 9), generator=generator, dtype=torch.int8)
    pairs = [(high, high[:9].t()), (alternating, high[:9].t()), (noise, weights)]
    return pairs + [(a, b.t().contiguous().t()) for a, b in pairs]


@functools.cache
def int_mm_is_exact() -> bool:
    """Whether `torch._int_mm` sums exactly on this machine, checked once on `_full_range_probes`.

    oneDNN's int8 GEMM is exact with VNNI or AMX, which multiply-add into int32. Without them (an
    AVX2-only CPU, AVX-512 without VNNI, or `ONEDNN_MAX_CPU_ISA` set to one of those) it adds pairs
    of products in saturating int16, and full-range operands come out wrong by up to millions (torch
    2.13 under ONEDNN_MAX_CPU_ISA=AVX2: 32,640 for a K = 256 row of 127 * 127, exactly 4,129,024;
    `ONEDNN_MAX_CPU_ISA=AVX2 python -c "import torch; a = torch.full((17, 256), 127, dtype=torch.int8);
    print(torch._int_mm(a, a.t().contiguous())[0, 0].item())"`).
    """
    return all(torch.equal(torch._int_mm(a, b), int8_ref.int8_gemm(a, b)) for a, b in _full_range_probes())


def int_mm_cpu(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`torch._int_mm` on operands it reads right, into `out` (any strides) if given; the reference's
    float64 product where `_int_mm` does not sum exactly here (`int_mm_is_exact`: slower, exact)."""
    if not int_mm_is_exact():
        result = int8_ref.int8_gemm(a, b)
        return result if out is None else out.copy_(result)
    a, b = onednn_operand(a), onednn_operand(b)
    if out is None:
        return torch._int_mm(a, b)
    if out.is_contiguous():  # torch._int_mm(out=) refuses any other layout
        return torch._int_mm(a, b, out=out)
    return out.copy_(torch._int_mm(a, b))


def cpu_int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype, out, epilogue=None) -> torch.Tensor:
    """`torch._int_mm`, then the dequantisation `epilogue`: by default the compiled epilogue's one
    pass (native.py) where it is built and fmaf is one instruction, else torch's passes
    (`torch_epilogue`), the same values. A product of _BLOCKED_MIN_BYTES or more goes a block of
    columns at a time (`_blocked_scaled_gemm`). See benchmarks/cpu_int8.py for what each costs over
    bare `_int_mm`."""
    epilogue = epilogue or default_epilogue()
    m, n = a.shape[0], b.shape[1]
    if 4 * m * n >= _BLOCKED_MIN_BYTES and int_mm_is_exact():
        return _blocked_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype, out, epilogue)
    return epilogue(int_mm_cpu(a, b), scale_a, scale_b, bias, out_dtype, out)  # int32 [M, N], then scaled


def default_epilogue():
    """The epilogue `cpu_int8_scaled_gemm` runs by default, called as `torch_epilogue` is: the compiled
    one where it is built and fmaf is one instruction, else torch's passes."""
    quantizer = native.quantizer()
    if quantizer is not None and quantizer.fast_epilogue:
        return functools.partial(compiled_epilogue, quantizer)
    return torch_epilogue


# A large int32 product is made and dequantised a block of columns at a time, in one buffer of about
# _PRODUCT_BLOCK_BYTES, so that it is never allocated whole: glibc maps every allocation above
# its largest mmap threshold (32 MiB on 64-bit) afresh, and a fresh mapping is faulted in page by
# page on first touch, at every call (ad hoc: bare `_int_mm` at [512, 4096] @ [4096, 28672], a 56 MiB
# product, took 16% longer than into a reused `out=`); each block is then dequantised while it is
# in the cache. Below the threshold blocks cost one more oneDNN call each and saved nothing (ad hoc,
# at [128, 4096] @ [4096, 6144] and [512, 4096] @ [4096, 4096]). benchmarks/cpu_int8.py's first table
# gives both forms where they differ (M = 2048, and gate_up at M = 512): the blocks cost -10.4% to
# +5.7% over bare `_int_mm` on the 2-core VM, the product made whole +2.5% to +13.7%, in one run.
_BLOCKED_MIN_BYTES = 32 << 20
_PRODUCT_BLOCK_BYTES = 8 << 20


def _blocked_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype, out, epilogue) -> torch.Tensor:
    """`epilogue(int_mm_cpu(a, b), ...)`'s values, a block of columns of the product at a time (its
    int32 in one reused buffer), each block's epilogue written straight into its columns of `out`
    (or of a new out_dtype `[M, N]`)."""
    m, n = a.shape[0], b.shape[1]
    a, b = onednn_operand(a), onednn_operand(b)  # once: their column slices stay readable
    scale_a, scale_b = scale_a.contiguous(), scale_b.contiguous()
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    result = torch.empty((m, n), dtype=out_dtype) if out is None else out
    width = max(1, min(n, _PRODUCT_BLOCK_BYTES // (4 * m)))
    if width >= 64:
        width -= width % 64
    buffer = torch.empty(m * width, dtype=torch.int32)
    for start in range(0, n, width):
        stop = min(n, start + width)
        acc = int_mm_cpu(a, b[:, start:stop], out=buffer[:m * (stop - start)].view(m, stop - start))
        epilogue(acc, scale_a, scale_b[start:stop], None if bias is None else bias[start:stop], out_dtype,
                 result[:, start:stop])
    return result


def torch_epilogue(acc, scale_a, scale_b, bias, out_dtype, out) -> torch.Tensor:
    """int32 `acc [M, N]` (contiguous, overwritten) -> `(acc * scale_a[:, None]) * scale_b + bias` in
    out_dtype, in in-place float32 torch passes.

    torch has no fused int32 -> scaled float op, and its mixed-dtype elementwise kernels are
    about 3x slower than same-dtype ones, so: convert in place (the float32 view of the int32
    buffer), scale rows, scale columns and add the bias in one `addcmul` (a fused multiply-add),
    then round once to out_dtype.
    """
    y = acc.view(torch.float32).copy_(acc)  # same bytes, now float32 values: no new allocation
    y.mul_(scale_a[:, None])
    if bias is None:
        y.mul_(scale_b)
    else:
        torch.addcmul(bias.to(torch.float32), y, scale_b, out=y)
    if out is not None:
        return out.copy_(y)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def compiled_epilogue(quantizer, acc, scale_a, scale_b, bias, out_dtype, out) -> torch.Tensor:
    """`torch_epilogue`'s values in one pass of quantize_rows.c: straight into `out` where the C can
    write it as it lies (float32 or bfloat16, unit column stride), else into float32 in acc's own
    memory or a new bfloat16 tensor, then rounded to float16 or copied into `out`."""
    m, n = acc.shape
    acc = acc.contiguous()  # as `_int_mm` gives it: a no-op
    scale_a, scale_b = scale_a.contiguous(), scale_b.contiguous()  # a broadcast scale is read as a copy
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    threads = native_threads(quantizer, m * n)
    if out is not None and out.dtype in native.EPILOGUE_CODES and (out.stride(1) == 1 or n == 1):
        # With one column its stride addresses nothing: the rows are out.stride(0) apart either way.
        quantizer.dequantize_rows(acc, scale_a, scale_b, bias, out.as_strided((m, n), (out.stride(0), 1)), threads)
        return out
    y = torch.empty((m, n), dtype=torch.bfloat16) if out_dtype == torch.bfloat16 else acc.view(torch.float32)
    quantizer.dequantize_rows(acc, scale_a, scale_b, bias, y, threads)
    if out is not None:
        return out.copy_(y)
    return y if y.dtype == out_dtype else y.to(out_dtype)


# -- quantize_int8 -------------------------------------------------------------------------------
#
# Where a C compiler is at hand, the compiled quantiser (native.py, quantize_rows.c) does it all: one
# call, each row read from memory once, large problems on torch's number of threads. Elsewhere
# (or with KERNELHUB_NATIVE=0), as exact and slower, numpy and torch:
#
# Measured on the 2-core CI VM (benchmarks/cpu_w8a8.py): a fresh float32 tensor of tens of MB costs
# more than the arithmetic on it (its pages are faulted in on first touch), and `torch.aminmax` over
# rows of x is far slower than `amax` and `amin` apart. So, block of rows by block: the row maxima
# from `amax` and `amin` (no |x| tensor), then the quotients in one reused scratch buffer, written
# straight into the result; the block's later passes find it in the cache. Up to 128K elements a
# fresh |x| costs less than the second read (`abs().amax()`), and the fewest operations win. Small
# problems go through numpy, whose per-operation cost is a fraction of torch's (beyond about 32K
# elements its single thread loses to torch's two), in the fewest operations: see `_quantize_numpy`.
#
# Why most rows need no clamp: a row whose scale is a normal float32 (at least 2**-126) and finite
# has quotients |x| / scale <= absmax / fl(absmax / 127) <= 127 (1 + 2**-24)**2 < 127.5, which round
# to at most 127. Only a subnormal scale (its quotients reach 191, see quantize.py), a zero scale
# (0 / 0) or a non-finite one needs the reference's clamp and NaN handling.

# From how many elements a call of the compiled library splits its work over torch's number of
# threads. On a team of torch's own OpenMP workers (native.py, `Quantizer.team_threads`): from
# torch's own grain (at::internal::GRAIN_SIZE, from where its elementwise ops go parallel), as the
# workers are awake after the op before; threads started by each call cost their start and contend
# with those spinning workers, so from 8M elements only. What each costs on the 2-core VM:
# benchmarks/cpu_int8.py's third table (the team was faster than one thread from [8, 4096] on).
_TEAM_MIN_ELEMENTS = 1 << 15
_THREADED_MIN_ELEMENTS = 1 << 23


def native_threads(quantizer: native.Quantizer, elements: int) -> int:
    """The threads `quantizer`'s call over `elements` elements runs on (its rows, heads or epilogue
    rows split among them): torch's number from _TEAM_MIN_ELEMENTS or _THREADED_MIN_ELEMENTS on
    (a team of torch's workers, or threads of the call's own), else 1."""
    least = _TEAM_MIN_ELEMENTS if quantizer.team_threads else _THREADED_MIN_ELEMENTS
    return torch.get_num_threads() if elements >= least else 1


_BLOCK_ELEMENTS = 1 << 20  # float32 quotients per block: 4 MiB
_NUMPY_MAX_ELEMENTS = 1 << 15  # M = 8 at K = 4096
_ONE_PASS_MAX_ELEMENTS = 1 << 17  # up to here fresh temporaries cost less than the blocked loop's copies
_INF = np.float32(np.inf)
_SMALLEST_NORMAL_FLOAT = float(np.finfo(np.float32).tiny)  # as Python floats, for Python floats
_INF_FLOAT = float("inf")
_SMALLEST_NORMAL = np.float32(np.finfo(np.float32).tiny)
_127 = np.float32(127.0)
_LISTED_SCALES = 64  # up to here `_normal_and_finite` reads the scales as a list
_DIVISOR_127 = torch.tensor([127.0])  # a tensor divisor, as the reference's (never a reciprocal product)
_NUMPY_FORMS = {torch.int8: np.int8, torch.uint8: np.uint8}
# The forms `quantize_int8_cpu` can give q in: the int8 values, the same values plus 128 as uint8
# (what oneDNN's u8 x s8 GEMM takes, zero point 128), or the same values as exact float32 (what
# fbgemm's linear takes and quantises again with scale 1 and zero point 128).
Q_FORMS = (torch.int8, torch.uint8, torch.float32)
_scratch = threading.local()


def _scratch_block(rows: int, cols: int) -> torch.Tensor:
    """A float32 [rows, cols] scratch view, reused across calls of this thread."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < rows * cols:
        buffer = _scratch.buffer = torch.empty(rows * cols, dtype=torch.float32)
    return buffer[:rows * cols].view(rows, cols)


def _quantize_numpy(x: torch.Tensor, form: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Five passes over x's size when every scale is normal and finite (|x|, its row maxima, the
    quotients, their rounding, the cast) and three over the [M] scales, ufuncs called directly
    (`np.clip`, `ndarray.max` and `np.errstate` each cost microseconds of Python); otherwise the
    reference's clamp and NaN handling."""
    xf = (x.detach() if x.dtype == torch.float32 else x.detach().to(torch.float32)).numpy()
    scale = np.maximum.reduce(np.abs(xf), axis=1)  # NaN propagates
    np.divide(scale, _127, out=scale)
    if np.minimum.reduce(scale) >= _SMALLEST_NORMAL and np.maximum.reduce(scale) < _INF:  # NaN fails
        q = np.divide(xf, scale[:, None])
        np.rint(q, out=q)  # rounds half to even; |q| <= 127 (see above)
    else:
        with np.errstate(all="ignore"):  # non-finite rows are defined (q = 0), not warned of
            q = np.rint(xf / scale[:, None])
            np.clip(q, -127, 127, out=q)
            q[~((scale > 0) & (scale < _INF))] = 0.0
    if form == torch.uint8:
        q += np.float32(128.0)
    return torch.from_numpy(q if form == torch.float32 else q.astype(_NUMPY_FORMS[form])), torch.from_numpy(scale)


def quantize_token_scaled(x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """One token `x [1, K]` (float32, float16 or bfloat16, any strides) quantised as the reference
    does, then multiplied back by its scale: float32 `fl(q * s) [1, K]` and s as a Python float, or
    None where s is not a normal, finite float32 (the row is zero, tiny, or holds NaN or Inf; those
    need quantize_int8_cpu's clamp and NaN handling). The tensor is this thread's scratch for K,
    overwritten by its next call: use it before then.

    For a GEMM that quantises its float input itself with a per-tensor scale (fbgemm's), which for
    one token is the token's own: with scale s it makes `round(fl(fl(q s) fl(1/s)) + 128)`, and the
    product is q within 3 roundings, |error| <= 127 * 3 * 2**-24, so it gets back q + 128 exactly
    and fuses s into its epilogue. One call of the compiled quantiser (else four numpy calls over
    K) and no torch op, into a reused buffer: at decode size each call's code, evicted by the other
    layers' weights, costs more than its arithmetic.
    """
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    quantizer = native.quantizer()
    if quantizer is not None:
        token = _token_scratch(x.shape[1])
        scale = quantizer.token_scaled(x, token[0])
        return (token[0], scale) if _SMALLEST_NORMAL_FLOAT <= scale < _INF_FLOAT else None  # NaN fails
    xf = (x.detach() if x.requires_grad else x).numpy()
    q = np.abs(xf)
    scale = np.maximum.reduce(q, axis=None) / _127  # float32; NaN propagates
    if not _SMALLEST_NORMAL <= scale < _INF:  # NaN fails too
        return None
    token = _token_scratch(x.shape[1])
    np.divide(xf, scale, out=token[1])  # IEEE float32 division by the scale, as the reference's
    np.rint(token[1], out=token[1])  # rounds half to even; |q| <= 127 (see above)
    np.multiply(token[1], scale, out=token[1])
    return token[0], float(scale)


def quantize_rows_scratch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8_cpu(x, torch.float32)` of a few rows `x [M, K]` (float32, float16 or bfloat16,
    any strides), q as float32 `[M, K]` and the scales as float32 `[M, 1]` (ready to broadcast over
    rows): with the compiled quantiser, in this thread's scratch for (M, K), overwritten by its next
    call (use them before then), else new tensors.

    For the decode rows of a W8A8 layer, whose GEMM takes q and makes its own copy: each fresh
    tensor is a call into torch's allocator, whose code the other layers' weights have evicted from
    the cache by the next call (benchmarks/cpu_w8a8.py times the layers so).
    """
    quantizer = native.quantizer()
    m, k = x.shape
    if quantizer is None or m == 0 or k == 0:
        q, scale = quantize_int8_cpu(x, torch.float32)
        return q, scale[:, None]
    buffers = _scratch.__dict__.setdefault("rows", {})
    q_and_scale = buffers.get((m, k))
    if q_and_scale is None:
        q_and_scale = buffers[m, k] = (torch.empty((m, k), dtype=torch.float32), torch.empty((m, 1), dtype=torch.float32))
    q, scale = q_and_scale
    quantizer.rows(x if x.dtype == torch.float32 else x.to(torch.float32), q, scale, native_threads(quantizer, m * k))
    return q, scale


def _token_scratch(k: int) -> tuple[torch.Tensor, np.ndarray]:
    """This thread's float32 `[1, k]` token buffer, as a tensor and as an array of the same memory."""
    tokens = _scratch.__dict__.setdefault("tokens", {})
    token = tokens.get(k)
    if token is None:
        tensor = torch.empty((1, k), dtype=torch.float32)
        token = tokens[k] = (tensor, tensor.numpy())
    return token


def _normal_and_finite(scale: torch.Tensor) -> bool:
    """Whether every one of the float32 `scale [R]` is a normal float32 and finite (NaN is not):
    a list for a few rows (one call), a reduction for many."""
    if scale.shape[0] <= _LISTED_SCALES:
        return all(_SMALLEST_NORMAL <= value < _INF for value in scale.tolist())
    lowest, highest = torch.aminmax(scale)
    return float(lowest) >= _SMALLEST_NORMAL and float(highest) < _INF


def _quantize_rows(x: torch.Tensor, scale: torch.Tensor, quotient: torch.Tensor | None, shift: float) -> torch.Tensor:
    """Rows `x [R, K]` -> float32 `[R, K]` holding q + shift (in `quotient` if given), their scales
    written into `scale [R]`, as the reference computes them: max |x| (NaN propagates), divided by
    a tensor 127. Clamp and NaN handling only when some scale needs them."""
    if quotient is None:  # one pass over a small x: the |x| temporary costs less than a second read
        absmax = x.abs().amax(dim=1)
    else:  # a block: x is read twice, and nothing is written
        absmax = torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_())
    torch.div(absmax, _DIVISOR_127, out=scale)  # in float32 (exact from float16 or bfloat16)
    quotient = torch.div(x, scale[:, None], out=quotient).round_()  # rounds half to even
    if not _normal_and_finite(scale):
        # Only 0 / 0, Inf / Inf and NaN quotients are NaN, and the reference gives them q = 0.
        quotient.clamp_(-127, 127).nan_to_num_(0.0)
    return quotient.add_(shift) if shift else quotient


def quantize_int8_cpu(x: torch.Tensor, form: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernelhub.reference.int8_gemm.quantize_int8` of a CPU `x [M, K]` (any strides), bit for bit:
    q `[M, K]` in `form` (Q_FORMS: int8; uint8 holding q + 128; float32 holding q), scale float32 `[M]`.

    A row whose scale is normal and finite needs neither clamp nor NaN handling (see above); the
    others (a subnormal scale, all zero, or holding NaN or Inf) get the reference's, q = 0 throughout
    a non-finite or all-zero row.
    """
    if form not in Q_FORMS:
        raise ValueError(f"form: expected one of {Q_FORMS}, got {form}")
    m, k = x.shape
    if m == 0 or k == 0:
        q, scale = int8_ref.quantize_int8(x)
        return q.to(form), scale  # q has no elements
    quantizer = native.quantizer()
    if quantizer is not None:
        q, scale = torch.empty((m, k), dtype=form), torch.empty(m, dtype=torch.float32)
        rows = x if x.dtype == torch.float32 else x.to(torch.float32)
        quantizer.rows(rows, q, scale, native_threads(quantizer, m * k))
        return q, scale
    if m * k <= _NUMPY_MAX_ELEMENTS:
        return _quantize_numpy(x, form)
    shift = 128.0 if form == torch.uint8 else 0.0
    scale = torch.empty(m, dtype=torch.float32)
    if m * k <= _ONE_PASS_MAX_ELEMENTS:  # small enough that fresh temporaries cost little: the fewest ops
        return _quantize_rows(x, scale, None, shift).to(form), scale
    rows = max(1, _BLOCK_ELEMENTS // k)
    q = torch.empty((m, k), dtype=form)
    block = _scratch_block(min(rows, m), k)
    for start in range(0, m, rows):  # each block of x is read from memory once, then from the cache
        stop = min(m, start + rows)
        q[start:stop].copy_(_quantize_rows(x[start:stop], scale[start:stop], block[:stop - start], shift))
    return q, scale
