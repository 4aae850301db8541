"""The compiled CPU quantiser (kernelhub/kernels/int8_gemm/native.py): built wherever a C compiler
is at hand, and where it cannot be had (turned off, no compiler, a failed build, an unwritable
cache, a cached file that does not load, a build that differs from the reference) a reason, no
exception, and the numpy and torch paths giving the same q and scale."""

import ctypes
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from kernelhub.kernels.int8_gemm import cpu, native
from kernelhub.reference import int8_gemm as ref


@pytest.fixture
def fresh_quantizer(monkeypatch):
    """`native.quantizer()` forgets its answer before and after the test (the next test builds it
    again, into its own cache)."""
    native.quantizer.cache_clear()
    yield native.quantizer
    native.quantizer.cache_clear()


def _falls_back_exactly():
    """The CPU quantiser, whichever path it takes, still gives the reference's q and scale."""
    x = torch.randn(33, 4097)
    x[3] = 0.0
    for got, expected in zip(cpu.quantize_int8_cpu(x), ref.quantize_int8(x)):
        assert torch.equal(got, expected)
    token = cpu.quantize_token_scaled(x[:1])
    q, scale = ref.quantize_int8(x[:1])
    assert token is not None and token[1] == scale.item() and torch.equal(token[0], q.float() * scale)


def test_it_is_built_where_a_compiler_is_at_hand(fresh_quantizer, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    compiler = shlex.split(os.environ.get("CC", "").strip() or "cc")[0]
    if shutil.which(compiler) is None:
        assert fresh_quantizer() is None and "no C compiler" in native.unavailable_reason()
        return
    assert fresh_quantizer() is not None, native.unavailable_reason()
    assert native.unavailable_reason() is None
    built = list((tmp_path / "cache" / "kernelhub" / "native").iterdir())
    assert [path.suffix for path in built] == [".so"]  # the library alone: no temporary left
    _falls_back_exactly()


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")
def test_its_threads_are_a_team_of_torchs_openmp_workers_where_torch_runs_on_openmp(fresh_quantizer):
    """Where torch's parallel backend is OpenMP and the process exports its entries (torch's wheels
    on Linux), every split call runs on a team of that runtime; its entries are the process's
    GOMP_parallel, omp_get_thread_num and omp_get_num_threads, those of the libgomp torch's wheel
    brings where it brings one."""
    entries = native.openmp_entries()
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        assert entries is None
    quantizer = fresh_quantizer()
    assert quantizer is not None, native.unavailable_reason()
    assert quantizer.team_threads == (entries is not None)
    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    if entries is not None and bundled:  # torch's wheel brings its own libgomp: the entries are its
        runtime = ctypes.CDLL(str(bundled[0]))
        names = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
        assert entries == tuple(ctypes.cast(getattr(runtime, name), ctypes.c_void_p).value for name in names)


def test_kernelhub_native_0_turns_it_off(fresh_quantizer, monkeypatch):
    monkeypatch.setenv("KERNELHUB_NATIVE", "0")
    assert fresh_quantizer() is None and native.unavailable_reason() == "KERNELHUB_NATIVE=0"
    _falls_back_exactly()


@pytest.mark.parametrize("compiler, reason", [("/nonexistent/cc", "no C compiler: '/nonexistent/cc' not found"),
                                              ("cc --no-such-flag-here", "building quantize_rows.c failed")])
def test_no_compiler_or_a_failed_build_falls_back(fresh_quantizer, monkeypatch, tmp_path, compiler, reason):
    if compiler.startswith("cc") and shutil.which("cc") is None:  # a failed build needs some compiler
        if shutil.which("gcc") is None:
            pytest.skip("no C compiler (cc or gcc) to fail a build with")
        compiler = "gcc --no-such-flag-here"
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert fresh_quantizer() is None
    assert reason.split(":")[0] in native.unavailable_reason()
    _falls_back_exactly()


def test_an_unwritable_cache_falls_back(fresh_quantizer, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("a file where the cache directory would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert fresh_quantizer() is None
    assert "cannot write the native build cache" in native.unavailable_reason()
    _falls_back_exactly()


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")
def test_a_cached_file_that_does_not_load_is_built_anew(fresh_quantizer, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "first"))
    assert fresh_quantizer() is not None
    (library,) = (tmp_path / "first" / "kernelhub" / "native").iterdir()
    # The same name in another cache (one this process has not loaded), holding what a killed copy
    # or another machine's build would leave.
    broken = tmp_path / "second" / "kernelhub" / "native" / library.name
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"half a library")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "second"))
    fresh_quantizer.cache_clear()
    assert fresh_quantizer() is not None, native.unavailable_reason()
    assert broken.read_bytes()[:4] == b"\x7fELF"
    _falls_back_exactly()


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")
@pytest.mark.parametrize("fault", [
    ("rintf(", "truncf("), ("0x7f800000u", "0x7f800001u"), ("scale < FLT_MIN", "0"),
    ("memset(q, 0, (size_t)k)", "(void)0"),
    # the channel entries: a max not carried over tokens, no clamp; rows and heads left to no thread
    ("largest[c] = bits > largest[c] ? bits : largest[c];", "largest[c] = bits;"),
    ("v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);\n            out[c]", "out[c]"),
    ("range->first = count * t / threads;", "range->first = count * (t + 1) / threads;"),
    # the epilogue: two roundings where torch's addcmul makes one, bfloat16 truncated, not rounded
    ("fmaf((float)acc[c] * sa, sb[c], bias[c])", "((float)acc[c] * sa) * sb[c] + bias[c]"),
    ("(bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16", "bits >> 16"),
    # a team of torch's workers that leaves each member's first job undone
    pytest.param(("for (int s = member;", "for (int s = member + size;"),
                 marks=pytest.mark.skipif(native.openmp_entries() is None, reason="no OpenMP runtime's entries")),
])
def test_a_build_that_differs_from_the_reference_is_refused(fresh_quantizer, monkeypatch, tmp_path, fault):
    """The probe rows catch a rounding that is not half-to-even, Inf rows taken for finite, a
    subnormal scale left unclamped, a zero row's int8 q left unwritten, the same faults of the
    channel entries, and an epilogue that rounds otherwise: each faulty source builds, and is not
    used."""
    source = native.SOURCE.read_text()
    assert fault[0] in source
    faulty = tmp_path / "quantize_rows.c"
    faulty.write_text(source.replace(fault[0], fault[1]))
    monkeypatch.setattr(native, "SOURCE", faulty)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert fresh_quantizer() is None
    assert "differs from the reference" in native.unavailable_reason()
    _falls_back_exactly()
