"""The CPU quantiser (kernelhub/kernels/int8_gemm/cpu.py): bit-exact with the reference on both of
its paths (numpy for small problems, blocked torch above), every dtype, layout and special row, in
each form it gives q in (int8; uint8 holding q + 128; float32 holding q)."""

import pytest
import torch

from kernelhub.kernels.int8_gemm import cpu
from kernelhub.reference import int8_gemm as ref

# (M, K) on either side of each path's limit (numpy up to 8 x 4096 elements, one pass up to 32 x
# 4096, blocks of rows above), one block and several, the last block of rows partial.
SHAPES = [(1, 1), (1, 4096), (7, 129), (8, 4096), (9, 4096), (16, 4096), (32, 4096), (33, 4096), (129, 1000),
          (300, 4097), (3, 70001), (4, 4096), (5, 4096)]


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
