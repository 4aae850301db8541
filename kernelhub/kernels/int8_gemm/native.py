"""The compiled CPU quantiser: quantize_rows.c, built at first use with the system C compiler.

Per-token quantisation is a few passes of cheap arithmetic, which numpy and torch can only spell as
one operation per pass: each reads and writes the whole tensor, and each call of a short one costs
more than its arithmetic when a model's weights have evicted its code (benchmarks/cpu_cold_calls.py).
The C file does it in one call, one read of each row from memory, rows split over threads, bit for
bit as the reference (`quantize_rows.c` says how). The same file holds the per-channel quantisation
of lowrank_keys' int8 Gram and int8_scaled_gemm's dequantising epilogue. `quantizer()` gives it,
or None, and then the numpy and torch paths run instead (cpu.py, lowrank_keys/cpu.py), giving the
same results, slower:

- `KERNELHUB_NATIVE=0` turns it off;
- no C compiler (`$CC`, else `cc`), a failed build, an unwritable cache, a library that does not
  load, or one that differs from the reference on the probe rows (`_agrees_with_reference`).
  `unavailable_reason()` says which.

The library is cached in `$XDG_CACHE_HOME/kernelhub/native` (else `~/.cache/...`) under a name that
covers the source, the flags, the compiler and the CPU (it is built for the CPU it runs on,
`-march=native`), written through a temporary file and renamed, so processes building it at once
each get a whole one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from kernelhub.reference import int8_gemm as int8_ref

NATIVE_ENV = "KERNELHUB_NATIVE"
SOURCE = Path(__file__).with_name("quantize_rows.c")
# Vectorised, but neither reassociated nor fused (no fast-math, no contraction): IEEE as written.
_FLAGS = ("-O3", "-std=c11", "-ffp-contract=off", "-fPIC", "-shared", "-pthread")
_NATIVE_FLAGS = ("-march=native",)  # dropped where the compiler does not take it
_LIBRARIES = ("-lm",)  # fmaf, where the CPU has no fused multiply-add
# The q forms of quantize_rows.c, by the dtype cpu.py asks for (float32: q itself).
FORM_CODES = {torch.int8: 0, torch.uint8: 1, torch.float32: 2}
# The output forms of the epilogue (kernelhub_dequantize_rows).
EPILOGUE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_BUILD_TIMEOUT_S = 120

_c_int64, _c_ptr = ctypes.c_int64, ctypes.c_void_p
_reason: str | None = None


class Quantizer:
    """The loaded library's two entry points, on CPU tensors the caller has checked."""

    def __init__(self, library: ctypes.CDLL):
        self._library = library  # kept: the functions below live in it
        self._rows = library.kernelhub_quantize_rows
        self._rows.argtypes = [_c_ptr, _c_int64, _c_int64, _c_int64, _c_int64, _c_ptr, ctypes.c_int, _c_ptr,
                               ctypes.c_int]
        self._rows.restype = ctypes.c_int
        self._token = library.kernelhub_quantize_token_scaled
        self._token.argtypes = [_c_ptr, _c_int64, _c_int64, _c_ptr]
        self._token.restype = ctypes.c_float
        self._absmax_bits = library.kernelhub_channel_absmax_bits
        self._absmax_bits.argtypes = [_c_ptr, *[_c_int64] * 6, _c_ptr, ctypes.c_int]
        self._absmax_bits.restype = ctypes.c_int
        self._channels = library.kernelhub_quantize_channels
        self._channels.argtypes = [_c_ptr, *[_c_int64] * 6, _c_ptr, _c_ptr, _c_int64, ctypes.c_int]
        self._channels.restype = ctypes.c_int
        self._epilogue = library.kernelhub_dequantize_rows
        self._epilogue.argtypes = [_c_ptr, _c_int64, _c_int64, _c_ptr, _c_ptr, _c_ptr, _c_ptr, ctypes.c_int, _c_int64,
                                   ctypes.c_int]
        self._epilogue.restype = ctypes.c_int
        self.fast_epilogue = bool(library.kernelhub_fast_fma())  # else torch's passes are faster
        self._use_openmp = library.kernelhub_use_openmp
        self._use_openmp.argtypes = [_c_ptr, _c_ptr, _c_ptr]
        self._use_openmp.restype = ctypes.c_int
        self.team_entries: tuple[int, int, int] | None = None  # what `use_team_threads` was last given

    @property
    def team_threads(self) -> bool:
        """Whether split calls run on a team of an OpenMP runtime (else on threads they start)."""
        return self.team_entries is not None

    def use_team_threads(self, entries: tuple[int, int, int] | None) -> None:
        """Run every entry's threads as a team of the OpenMP runtime whose `openmp_entries()` these
        are (None: threads started by each call). Not while another call of this library runs."""
        self._use_openmp(*(entries or (None, None, None)))
        self.team_entries = entries

    def rows(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, threads: int) -> None:
        """float32 `x [M, K]` (any strides) -> q `[M, K]` (contiguous, a dtype of FORM_CODES) and
        float32 `scale [M]` (contiguous), as the reference; the rows split over `threads` threads."""
        m, k = x.shape
        self._rows(x.data_ptr(), m, k, *x.stride(), q.data_ptr(), FORM_CODES[q.dtype], scale.data_ptr(), threads)

    def token_scaled(self, x: torch.Tensor, out: torch.Tensor) -> float:
        """float32 `x [1, K]` (any strides) -> `fl(q * s)` into float32 `out [1, K]` (contiguous),
        returning s; out is unwritten where s is not a normal, finite float32."""
        return self._token(x.data_ptr(), x.shape[1], x.stride(1), out.data_ptr())

    def channel_absmax_bits(self, x: torch.Tensor, largest: torch.Tensor, threads: int) -> None:
        """float32 `x [H, T, C]` (any strides): `largest [H * C]` (int32, contiguous) becomes the
        elementwise max of itself and the bit patterns of max_t |x[h, t, c]| (NaN's above all others).
        Start from zeros; viewed as float32 it is then the absmax of every chunk passed. The heads
        split over `threads` threads."""
        self._absmax_bits(x.data_ptr(), *x.shape, *x.stride(), largest.data_ptr(), threads)

    def channels(self, x: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, threads: int) -> None:
        """float32 `x [H, T, C]` (any strides) and float32 `scale [H * C]` (contiguous) -> int8
        `q [T, H * C]` (unit column stride): q[t, h * C + c] = x[h, t, c] quantised with scale[h * C + c]
        as the reference's rows are (0 throughout a channel whose scale is not > 0 and finite). The
        heads split over `threads` threads."""
        self._channels(x.data_ptr(), *x.shape, *x.stride(), scale.data_ptr(), q.data_ptr(), q.stride(0), threads)

    def dequantize_rows(self, acc: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                        bias: torch.Tensor | None, out: torch.Tensor, threads: int) -> None:
        """int32 `acc [M, N]` (contiguous), float32 `scale_a [M]`, `scale_b [N]` and `bias [N]` or None
        (contiguous) -> `out [M, N]` (float32 or bfloat16, unit column stride; float32 may be acc's own
        memory): `fma(fl(acc * scale_a[:, None]), scale_b, bias)` in float32, rounded once to out's dtype
        (quantize_rows.c). The rows split over `threads` threads."""
        m, n = acc.shape
        self._epilogue(acc.data_ptr(), m, n, scale_a.data_ptr(), scale_b.data_ptr(),
                       None if bias is None else bias.data_ptr(), out.data_ptr(), EPILOGUE_CODES[out.dtype],
                       out.stride(0), threads)


def openmp_entries() -> tuple[int, int, int] | None:
    """Addresses of `GOMP_parallel`, `omp_get_thread_num` and `omp_get_num_threads` of the OpenMP
    runtime torch's CPU ops run on (its wheel's libgomp, which it loads so that the process exports
    these), or None where torch's parallel backend is not OpenMP or they are not exported."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        process = ctypes.CDLL(None)
        return tuple(ctypes.cast(getattr(process, name), ctypes.c_void_p).value
                     for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads"))
    except (OSError, TypeError, AttributeError):  # no process handle here, or a symbol not exported
        return None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "kernelhub" / "native"


def unavailable_reason() -> str | None:
    """Why `quantizer()` gave None (after it was called), else None."""
    return _reason


@functools.cache
def quantizer() -> Quantizer | None:
    """The compiled quantiser, built (or found built) and checked at the first call; None where it
    is off or cannot be had here (`unavailable_reason()` says why). Never raises."""
    global _reason
    if os.environ.get(NATIVE_ENV, "").strip() == "0":
        _reason = f"{NATIVE_ENV}=0"
        return None
    try:
        try:
            library = ctypes.CDLL(str(_built_library()))
        except OSError:  # a cached file that does not load (truncated, of another machine): built anew
            library = ctypes.CDLL(str(_built_library(replace=True)))
        found = Quantizer(library)
        found.use_team_threads(openmp_entries())  # before the probe, which runs on the threads used after
    except (OSError, subprocess.SubprocessError, AttributeError, _BuildError) as exc:
        _reason = str(exc) or type(exc).__name__
        return None
    if not _agrees_with_reference(found):
        _reason = f"the compiled quantiser ({SOURCE.name}) differs from the reference on this machine"
        return None
    return found


class _BuildError(Exception):
    pass


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "").strip() or "cc")


def _cpu_identity() -> str:
    """What `-march=native` builds for: the CPU's model and feature flags where Linux says them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            lines = [line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _run_compiler(args: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
    except FileNotFoundError:
        raise _BuildError(f"no C compiler: {args[0]!r} not found (set CC to one)") from None
    except subprocess.TimeoutExpired:
        raise _BuildError(f"building {SOURCE.name} took over {_BUILD_TIMEOUT_S} s") from None


def _built_library(replace: bool = False) -> Path:
    """The cached shared library for this source, compiler and CPU, built first if absent (or
    if `replace`)."""
    compiler = _compiler()
    version = _run_compiler([*compiler, "--version"])
    source = SOURCE.read_bytes()
    flags = " ".join(_FLAGS + _NATIVE_FLAGS + _LIBRARIES)
    key = hashlib.sha256(b"\0".join([source, " ".join(compiler).encode(), version.stdout.encode(), flags.encode(),
                                     platform.machine().encode(), _cpu_identity().encode()])).hexdigest()[:24]
    directory = cache_dir()
    target = directory / f"quantize_rows-{key}.so"
    if target.is_file() and not replace:
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=".quantize_rows-", suffix=".so")
        os.close(handle)
    except OSError as exc:
        raise _BuildError(f"cannot write the native build cache {directory}: {exc.strerror or exc}") from None
    try:
        for flags in (_FLAGS + _NATIVE_FLAGS, _FLAGS):  # -march=native is not every compiler's
            built = _run_compiler([*compiler, *flags, "-o", temporary, str(SOURCE), *_LIBRARIES])
            if built.returncode == 0:
                os.replace(temporary, target)
                return target
        message = (built.stderr or built.stdout).strip().splitlines()
        raise _BuildError(f"building {SOURCE.name} failed: {message[-1] if message else built.returncode}")
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _probe_rows() -> torch.Tensor:
    """float32 rows of every kind the quantiser treats apart: ordinary ones, ties at .5, a zero row,
    NaN and +-Inf rows, a subnormal scale from a normal and from a subnormal absmax, extremes."""
    generator = torch.Generator().manual_seed(0)
    k = 67  # not a multiple of any vector width
    rows = torch.randn(12, k, generator=generator) * torch.logspace(-30, 30, 12)[:, None]
    rows[0] = torch.arange(k).remainder(9).sub(4).mul(0.5)  # scale 1: quotients at ties (+-0.5, +-1.5)
    rows[0, 0] = 127.0
    rows[1] = 0.0
    rows[2, 5] = float("nan")
    rows[3, 9], rows[4, 0] = float("inf"), -float("inf")
    rows[5] = rows[5] / rows[5].abs().max() * 1e-37  # normal absmax, subnormal scale
    rows[6] = torch.randint(-190, 191, (k,), generator=generator).double().mul(2.0**-149).float()
    rows[6, 0] = 190 * 2.0**-149  # subnormal absmax: scale 2**-149, quotients up to 190 (clamped)
    rows[7, :3] = torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max, 1.0])
    rows[8] = rows[8].abs().max() * torch.tensor([1.0, -1.0]).repeat(k)[:k]  # every element +-absmax
    return rows


def _agrees_with_reference(found: Quantizer) -> bool:
    """Whether `found` gives the reference's q and scale on `_probe_rows` in every form, from
    contiguous and strided rows, on one thread and on several, its token entry its q * s, its
    channel entries the same q and scale along the other axis, and its epilogue the exactly rounded
    values, into poisoned outputs (an element left unwritten fails)."""
    rows = _probe_rows()
    q_ref, scale_ref = int8_ref.quantize_int8(rows)
    if not (_channels_agree(found, rows, q_ref, scale_ref) and _epilogue_agrees(found)):
        return False
    for x in (rows, rows.t().contiguous().t(), torch.stack([rows, -rows], 2).flatten(1)[:, ::2]):
        for dtype in FORM_CODES:
            for threads in (1, 3):
                q = torch.full(x.shape, 99, dtype=dtype)  # 99 is no probe row's q
                scale = torch.full((x.shape[0],), -1.0)
                found.rows(x, q, scale, threads)
                as_int8 = (q.to(torch.int16) - 128).to(torch.int8) if dtype == torch.uint8 else q.to(torch.int8)
                if not (torch.equal(as_int8, q_ref) and torch.equal(scale.nan_to_num(7.0), scale_ref.nan_to_num(7.0))
                        and (dtype != torch.float32 or torch.equal(q, q.round()))):
                    return False
        for r in (0, 7, 9):  # rows of normal, finite scale
            out = torch.full((1, x.shape[1]), float("nan"))
            scale = found.token_scaled(x[r:r + 1], out)
            if scale != scale_ref[r].item() or not torch.equal(out, q_ref[r:r + 1].float() * scale_ref[r]):
                return False
    return True


def _channels_agree(found: Quantizer, rows: torch.Tensor, q_ref: torch.Tensor, scale_ref: torch.Tensor) -> bool:
    """The channel entries on the probe rows as channels: 3 heads of 4 channels over 67 tokens, from
    contiguous, channel-major and strided keys (on 1, 2 and 3 threads), the absmax taken in two
    chunks of tokens, into a q with a gap between its rows that must stay as it was."""
    heads, channels = 3, rows.shape[0] // 3
    keys = rows.reshape(heads, channels, -1).transpose(1, 2)  # [H, T, C]: channel h * C + c is row h * C + c
    tokens = keys.shape[1]
    expected_q = q_ref.t()  # [T, H * C]
    layouts = (keys.contiguous(), keys, torch.stack([keys, -keys], 3).flatten(2)[:, :, ::2])
    for x, threads in zip(layouts, (1, 2, 3)):
        largest = torch.zeros(heads * channels, dtype=torch.int32)
        for part in (x[:, :40], x[:, 40:]):
            found.channel_absmax_bits(part, largest, threads)
        scale = largest.view(torch.float32) / torch.full_like(scale_ref, 127.0)
        if not torch.equal(scale.nan_to_num(7.0), scale_ref.nan_to_num(7.0)):
            return False
        padded = torch.full((tokens, heads * channels + 5), 99, dtype=torch.int8)  # 99 is no probe q
        found.channels(x, scale, padded, threads)
        written, gap = padded[:, :heads * channels], padded[:, heads * channels:]
        if not (torch.equal(written, expected_q) and bool((gap == 99).all())):
            return False
    return True


def _nearest_float32(exact: Fraction) -> float:
    """The float32 nearest to `exact`, ties to even (finite results only)."""
    guess = np.float32(float(exact))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    distance = [abs(Fraction(float(c)) - exact) for c in candidates]
    best = min(distance)
    ties = [c for c, d in zip(candidates, distance) if d == best]
    return float(min(ties, key=lambda c: int(np.array(c).view(np.uint32)) & 1))


def _epilogue_agrees(found: Quantizer) -> bool:
    """The epilogue on a [5, 37] int32 product (int32 extremes, values that float32 rounds, zeros;
    scales of every sign, a zero one), with a bias and without, against the exactly rounded values
    (Fractions), as float32 into a padded output and into the product's own memory, and as bfloat16
    (which rounds the float32 to nearest even, as torch's conversion does); on 1 and 3 threads."""
    generator = torch.Generator().manual_seed(1)
    acc = torch.randint(-2**31, 2**31 - 1, (5, 37), dtype=torch.int32, generator=generator)
    acc[0, :4] = torch.tensor([2**31 - 1, -2**31, 0, 2**24 + 1], dtype=torch.int32)
    acc[1] = torch.randint(-300, 300, (37,), dtype=torch.int32, generator=generator)
    scale_a = torch.randn(5, generator=generator).abs() * 1e-6
    scale_b = torch.randn(37, generator=generator) * 1e-3
    scale_b[3] = 0.0
    bias = torch.randn(37, generator=generator)
    rows = (acc.float() * scale_a[:, None]).tolist()  # fl(float(acc) * scale_a): one rounding in torch
    for with_bias, threads in ((True, 1), (False, 3)):
        expected = torch.tensor([[_nearest_float32(Fraction(y) * Fraction(float(scale_b[j]))
                                                   + (Fraction(float(bias[j])) if with_bias else 0))
                                  for j, y in enumerate(row)] for row in rows])
        for dtype in EPILOGUE_CODES:
            padded = torch.full((5, 40), float("nan"), dtype=dtype)
            found.dequantize_rows(acc, scale_a, scale_b, bias if with_bias else None, padded, threads)
            if not (torch.equal(padded[:, :37], expected.to(dtype)) and bool(padded[:, 37:].isnan().all())):
                return False
        in_place = acc.clone()
        found.dequantize_rows(in_place, scale_a, scale_b, bias if with_bias else None, in_place.view(torch.float32),
                              threads)
        if not torch.equal(in_place.view(torch.float32), expected):
            return False
    return True
