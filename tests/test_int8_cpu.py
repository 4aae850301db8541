"""The CPU quantiser (kernelhub/kernels/int8_gemm/cpu.py): bit-exact with the reference on both of
its paths (numpy for small problems, blocked torch above), every dtype, layout and special row."""

import pytest
import torch

from kernelhub.kernels.int8_gemm import cpu
from kernelhub.reference import int8_gemm as ref

# (M, K) on either side of the numpy limit, with the last block of rows partial.
SHAPES = [(1, 1), (1, 4096), (7, 129), (16, 4096), (17, 4096), (129, 1000), (300, 4097), (3, 70001), (4, 4096), (5, 4096)]


def _same(x):
    q, scale = cpu.quantize_int8_cpu(x)
    q_ref, scale_ref = ref.quantize_int8(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(q, q_ref)
    assert torch.equal(scale.isnan(), scale_ref.isnan())
    assert torch.equal(scale.nan_to_num(0.0), scale_ref.nan_to_num(0.0))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_the_reference_on_rows_of_every_kind(shape, dtype):
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
    _same(x)


@pytest.mark.parametrize("view", ["transposed", "expanded", "sliced", "overlapping"])
@pytest.mark.parametrize("m", [5, 400])
def test_any_view_is_read_as_its_contiguous_copy(view, m):
    base = torch.randn(m + 3, 600)
    x = {"transposed": torch.randn(600, m).t(), "expanded": base[:1].expand(m, 600),
         "sliced": base[1:m + 1, ::2], "overlapping": base.flatten().as_strided((m, 600), (1, 1))}[view]
    q, scale = cpu.quantize_int8_cpu(x)
    q_copy, scale_copy = ref.quantize_int8(x.contiguous())
    assert torch.equal(q, q_copy) and torch.equal(scale, scale_copy)


def test_empty_inputs():
    for shape in ((0, 7), (3, 0)):
        _same(torch.empty(shape))
