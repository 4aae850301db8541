"""The CPU quantiser (kernelhub/kernels/int8_gemm/cpu.py): bit-exact with the reference on each of
its paths (the compiled one, on one thread and on several; numpy for small problems and blocked
torch above, where it cannot be built), every dtype, layout and special row, in each form it gives
q in (int8; uint8 holding q + 128; float32 holding q). And int8_scaled_gemm's CPU epilogue on the
same paths (compiled, or torch's passes)."""

import pytest
import torch

import kernelhub.ops as ops
from kernelhub.checking import mismatch_close, poison_
from kernelhub.kernels.int8_gemm import cpu
from kernelhub.reference import int8_gemm as ref

# (M, K) on either side of each limit of the numpy and torch path (numpy up to 8 x 4096 elements,
# one pass up to 32 x 4096, blocks of rows above), one block and several, the last block of rows
# partial. The compiled quantiser splits rows over threads from cpu._TEAM_MIN_ELEMENTS (a team of
# torch's workers) or cpu._THREADED_MIN_ELEMENTS (threads of its own): `quantiser_path` runs every
# test on it with the split forced too, from both sources of threads.
SHAPES = [(1, 1), (1, 4096), (7, 129), (8, 4096), (9, 4096), (16, 4096), (32, 4096), (33, 4096), (129, 1000),
          (300, 4097), (3, 70001), (4, 4096), (5, 4096)]


@pytest.fixture(autouse=True)
def quantiser_path(cpu_quantiser):
    """Every test on each quantiser path (conftest's `cpu_quantiser`)."""
    return cpu_quantiser


def test_the_shapes_straddle_each_limit():
    sizes = [m * k for m, k in SHAPES]
    for limit in (cpu._NUMPY_MAX_ELEMENTS, cpu._ONE_PASS_MAX_ELEMENTS):
        assert limit in sizes and limit + 4096 in sizes


def _as_int8(q: torch.Tensor) -> torch.Tensor:
    """q of any form back in int8 (exact: a form that is not exact fails the comparison after it)."""
    return (q.to(torch.int16) - 128).to(torch.int8) if q.dtype == torch.uint8 else q.to(torch.int8)


def _same(x, form=torch.int8):
    q, scale = cpu.quantize_int8_cpu(x, form)
    q_ref, scale_ref = ref.quantize_int8(x)
    assert q.dtype == form and scale.dtype == torch.float32
    if form == torch.float32:
        assert torch.equal(q, q.round())
    assert torch.equal(_as_int8(q), q_ref)
    assert torch.equal(scale.isnan(), scale_ref.isnan())
    assert torch.equal(scale.nan_to_num(0.0), scale_ref.nan_to_num(0.0))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", cpu.Q_FORMS, ids=str)
def test_matches_the_reference_on_rows_of_every_kind(shape, dtype, form):
    m, k = shape
    gen = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=gen) * torch.exp(4 * torch.rand(m, 1, generator=gen))
    x = x.to(dtype)
    if m >= 7:
        x[1] = 0.0  # scale 0
        x[2, k // 2] = float("nan")  # scale NaN
        x[3, -1] = float("inf")  # scale +Inf
        x[4, 0] = -float("inf")
        x[5] = x[5] * 1e-41 if dtype == torch.float32 else x[5]  # a subnormal scale
        x[6] = torch.arange(k, dtype=torch.float32).remainder(5).sub(2).mul(63.5).to(dtype)  # ties at .5
    if m >= 8 and dtype == torch.float32:
        x[7] = x[7] / x[7].abs().max() * 1e-37  # a normal absmax, a subnormal scale (the careful path)
    _same(x, form)


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (8, 4096), (8, 129), (0, 5), (3, 0)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_quantised_into_scratch_are_the_reference(shape, dtype):
    """`quantize_rows_scratch` (a W8A8 layer's decode rows): float32 q and [M, 1] scales, the
    reference's bit for bit, on a strided x with special rows, each element written again when its
    scratch is reused (poisoned in between), another shape's left as it was."""
    m, k = shape
    gen = torch.Generator().manual_seed(m + 7 * k)
    other = cpu.quantize_rows_scratch(torch.randn(4, 3, generator=gen))  # another shape's
    other_values = [t.clone() for t in other]
    for round_ in range(2):
        x = (torch.randn(m, 2 * k, generator=gen) * 3.0)[:, ::2].to(dtype)
        if m >= 2 and k >= 1:
            x[1] = 0.0 if round_ == 0 else float("nan")
        q, scale = cpu.quantize_rows_scratch(x)
        q_ref, scale_ref = ref.quantize_int8(x)
        assert q.dtype == scale.dtype == torch.float32 and q.shape == (m, k) and scale.shape == (m, 1)
        assert torch.equal(q, q.round()) and torch.equal(q.to(torch.int8), q_ref)
        assert torch.equal(scale[:, 0].isnan(), scale_ref.isnan())
        assert torch.equal(scale[:, 0].nan_to_num(0.0), scale_ref.nan_to_num(0.0))
        poison_(q)
        poison_(scale)
    assert all(torch.equal(t, values) for t, values in zip(other, other_values))


@pytest.mark.parametrize("view", ["transposed", "expanded", "sliced", "overlapping"])
@pytest.mark.parametrize("m", [5, 400])
@pytest.mark.parametrize("form", cpu.Q_FORMS, ids=str)
def test_any_view_is_read_as_its_contiguous_copy(view, m, form):
    base = torch.randn(m + 3, 600)
    x = {"transposed": torch.randn(600, m).t(), "expanded": base[:1].expand(m, 600),
         "sliced": base[1:m + 1, ::2], "overlapping": base.flatten().as_strided((m, 600), (1, 1))}[view]
    q, scale = cpu.quantize_int8_cpu(x, form)
    q_copy, scale_copy = ref.quantize_int8(x.contiguous())
    assert q.dtype == form and torch.equal(_as_int8(q), q_copy) and torch.equal(scale, scale_copy)


@pytest.mark.parametrize("form", cpu.Q_FORMS, ids=str)
def test_empty_inputs(form):
    for shape in ((0, 7), (3, 0)):
        _same(torch.empty(shape), form)


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match="form: expected one of"):
        cpu.quantize_int8_cpu(torch.ones(2, 3), torch.int32)


# -- oneDNN's int8 GEMM without VNNI: the CPU path stays exact --------------------------------------

_EXACT_WITHOUT_VNNI = """
import torch
import kernelhub.ops as ops
from kernelhub.nn import Int8Linear
from kernelhub.reference import int8_gemm as ref
g = torch.Generator().manual_seed(0)
a = torch.randint(-128, 128, (33, 300), generator=g, dtype=torch.int8)
b = torch.randint(-128, 128, (300, 17), generator=g, dtype=torch.int8)
print(torch.equal(ops.int8_gemm(a, b), ref.int8_gemm(a, b)))
layer = Int8Linear.from_float(torch.nn.Linear(300, 17))
with torch.no_grad():
    for m in (1, 5, 40):  # fbgemm's rows, oneDNN's rows
        x = torch.randn(m, 300, generator=g) * 3
        q, s = ref.quantize_int8(x)
        expected = ref.int8_scaled_gemm(q, layer.weight_q.t(), s, layer.weight_scale, layer.bias, torch.float32)
        print(bool(torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)))
"""


def test_without_vnni_int8_gemm_and_the_layer_stay_exact():
    """ONEDNN_MAX_CPU_ISA=AVX2 runs the int8 kernels an AVX2-only CPU would, which add pairs of products
    in saturating int16 (on torch 2.13 `_int_mm` of full-range operands is off by up to millions):
    the probes find it, and the CPU path multiplies exactly anyway."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    result = subprocess.run([sys.executable, "-c", _EXACT_WITHOUT_VNNI], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"] * 4, result.stdout


def test_an_inexact_int_mm_is_never_called(monkeypatch):
    """Where `_int_mm` does not sum exactly, int8_gemm and int8_scaled_gemm take the exact product."""
    import kernelhub.ops as ops

    def inexact(*args, **kwargs):
        raise AssertionError("torch._int_mm called although it is not exact here")

    monkeypatch.setattr(cpu, "int_mm_is_exact", lambda: False)
    monkeypatch.setattr(torch, "_int_mm", inexact)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (9, 70), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (13, 70), generator=g, dtype=torch.int8)
    out = torch.full((9, 13), -7, dtype=torch.int32)
    assert ops.int8_gemm(a, w.t(), out=out) is out and torch.equal(out, ref.int8_gemm(a, w.t()))
    scale_a, scale_b = torch.rand(9, generator=g), torch.rand(13, generator=g)
    torch.testing.assert_close(ops.int8_scaled_gemm(a, w.t(), scale_a, scale_b, out_dtype=torch.float32),
                               ref.int8_scaled_gemm(a, w.t(), scale_a, scale_b, out_dtype=torch.float32))


# -- int8_scaled_gemm's epilogue: compiled (one pass) or torch's passes ----------------------------

@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (7, 63, 129), (33, 129, 64), (1, 4096, 32), (130, 70, 9)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16], ids=str)
def test_the_scaled_gemm_epilogue_matches_the_reference(m, n, k, out_dtype, bias_dtype):
    """Into a new tensor and into poisoned outs of every layout the epilogue treats apart (row-major,
    padded rows, column-major), from broadcast and strided scales; the same values every time."""
    gen = torch.Generator().manual_seed(m + n + k)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    scale_a = torch.rand(2 * m, generator=gen)[::2] * 0.01  # strided
    scale_b = (torch.rand(1, generator=gen) * 0.01).expand(n)  # broadcast
    bias = None if bias_dtype is None else torch.randn(n, generator=gen).to(bias_dtype)
    expected = ref.int8_scaled_gemm(a, w.t(), scale_a, scale_b, bias, out_dtype)
    result = ops.int8_scaled_gemm(a, w.t(), scale_a, scale_b, bias, out_dtype)
    problem = mismatch_close(result, expected, rtol=2 * torch.finfo(out_dtype).eps, atol_frac=1e-6)
    assert problem is None, problem
    for out in (torch.empty(m, n, dtype=out_dtype), torch.empty(m, n + 3, dtype=out_dtype)[:, :n],
                torch.empty(n, m, dtype=out_dtype).t()):
        poison_(out)
        assert ops.int8_scaled_gemm(a, w.t(), scale_a, scale_b, bias, out_dtype, out=out) is out
        assert torch.equal(out, result)


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (7, 63, 129), (130, 70, 9), (1, 4096, 32), (3, 1, 5)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16], ids=str)
def test_the_scaled_gemm_in_column_blocks_is_the_whole_product(m, n, k, out_dtype, bias_dtype, monkeypatch):
    """A product made a block of columns at a time (cpu._blocked_scaled_gemm, forced here for any
    size, with blocks of 20 columns at M = 7: several, the last one partial; one column per block at
    M = 130) gives the whole product's values bit for bit, into a new tensor and into poisoned outs
    of each layout, from operands of other layouts (a row-major b, a column slice of a)."""
    gen = torch.Generator().manual_seed(3 * m + n + k)
    a = torch.randint(-128, 128, (m, k + 3), dtype=torch.int8, generator=gen)[:, 2:k + 2]
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen)
    scale_a = torch.rand(m, generator=gen) * 0.01
    scale_b = torch.rand(2 * n, generator=gen)[::2] * 0.01
    bias = None if bias_dtype is None else torch.randn(n, generator=gen).to(bias_dtype)
    whole = ops.int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype)
    expected = ref.int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype)
    problem = mismatch_close(whole, expected, rtol=2 * torch.finfo(out_dtype).eps, atol_frac=1e-6)
    assert problem is None, problem
    blocks = []
    monkeypatch.setattr(cpu, "_blocked_scaled_gemm", _recording(cpu._blocked_scaled_gemm, blocks))
    monkeypatch.setattr(cpu, "_BLOCKED_MIN_BYTES", 0)
    monkeypatch.setattr(cpu, "_PRODUCT_BLOCK_BYTES", 4 * 7 * 20)
    assert torch.equal(ops.int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype), whole)
    for out in (torch.empty(m, n, dtype=out_dtype), torch.empty(m, n + 3, dtype=out_dtype)[:, :n],
                torch.empty(n, m, dtype=out_dtype).t()):
        poison_(out)
        assert ops.int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype, out=out) is out
        assert torch.equal(out, whole)
    assert len(blocks) == 4  # every call above went in blocks


def _recording(function, calls: list):
    """`function`, appending its positional arguments to `calls` at each call."""
    def record(*args):
        calls.append(args)
        return function(*args)
    return record


def test_a_product_from_32_mib_goes_in_column_blocks(monkeypatch):
    """The int32 product is made in blocks from _BLOCKED_MIN_BYTES on (a [2048, 4096] product: 32 MiB)
    and whole below, with the same values either way."""
    blocks = []
    monkeypatch.setattr(cpu, "_blocked_scaled_gemm", _recording(cpu._blocked_scaled_gemm, blocks))
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(-128, 128, (2048, 2), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (2, 4096), dtype=torch.int8, generator=gen)
    scale_a, scale_b = torch.rand(2048, generator=gen), torch.rand(4096, generator=gen)
    blocked = ops.int8_scaled_gemm(a, b, scale_a, scale_b, out_dtype=torch.float32)
    assert len(blocks) == (1 if cpu.int_mm_is_exact() else 0)
    whole = ops.int8_scaled_gemm(a[:2047], b, scale_a[:2047], scale_b, out_dtype=torch.float32)
    assert len(blocks) == (1 if cpu.int_mm_is_exact() else 0)  # one row less: whole
    assert torch.equal(blocked[:2047], whole)
    torch.testing.assert_close(blocked, ref.int8_scaled_gemm(a, b, scale_a, scale_b, out_dtype=torch.float32))


def test_the_scaled_gemm_epilogue_carries_non_finite_scales():
    """NaN and Inf scales give NaN and Inf where the reference has them (a bfloat16 NaN of any bits)."""
    a = torch.randint(-128, 128, (3, 8), dtype=torch.int8)
    a[2] = 0  # 0 * Inf = NaN
    w = torch.randint(-128, 128, (5, 8), dtype=torch.int8)
    scale_a = torch.tensor([float("nan"), float("inf"), float("inf")])
    scale_b = torch.rand(5)
    for out_dtype in (torch.float32, torch.bfloat16):
        got = ops.int8_scaled_gemm(a, w.t(), scale_a, scale_b, None, out_dtype).float()
        expected = ref.int8_scaled_gemm(a, w.t(), scale_a, scale_b, None, out_dtype).float()
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))
