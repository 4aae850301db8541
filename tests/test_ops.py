"""kernelhub.ops: every backend against the reference, argument errors, out=, torch.compile."""

import pytest
import torch

import kernelhub.ops as ops
from kernelhub.checking import mismatch_close, poison_
from kernelhub.reference import int8_gemm as ref

BACKENDS = ["cpu-auto", "triton", "reference"]
SHAPES = [(1, 63, 96), (7, 129, 33), (33, 17, 257), (128, 96, 130), (257, 65, 63)]


def _ids(shape):
    return "M{}N{}K{}".format(*shape)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param != "cpu-auto":
        monkeypatch.setenv("KERNELHUB_BACKEND", request.param)
    return request.param


def _operands(m, n, k, seed, weight_layout=True):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    if weight_layout:  # b as the transposed view of an nn.Linear weight [N, K]
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen).t()
    else:
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen)
    return a, b


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("weight_layout", [True, False], ids=["b=w.t()", "b=[K,N]"])
def test_int8_gemm_exact(backend, shape, weight_layout):
    a, b = _operands(*shape, seed=sum(shape), weight_layout=weight_layout)
    expected = (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)
    assert torch.equal(ops.int8_gemm(a, b), expected)
    out = poison_(torch.empty_like(expected))
    assert ops.int8_gemm(a, b, out=out) is out
    assert torch.equal(out, expected)


@pytest.mark.parametrize("shape", SHAPES[:3] + [(64, 256, 512)], ids=_ids)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_int8_scaled_gemm_close(backend, shape, out_dtype, with_bias):
    m, n, k = shape
    a, b = _operands(m, n, k, seed=m + 2 * n + 3 * k)
    scale_a, scale_b = torch.rand(m) * 0.01 + 1e-4, torch.rand(n) * 0.01 + 1e-4
    bias = torch.randn(n, dtype=out_dtype) if with_bias else None
    expected = ref.int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype)
    out = poison_(torch.empty(m, n, dtype=out_dtype))
    result = ops.int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype, out=out)
    assert result is out
    problem = mismatch_close(out, expected, rtol=2 * torch.finfo(out_dtype).eps, atol_frac=1e-6)
    assert problem is None, problem


@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 63), (33, 129), (4, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_quantize_int8_bit_exact(backend, rows, cols, dtype):
    x = (torch.randn(rows, cols) * 3).to(dtype)
    x[0, 0] = 0.0
    if rows > 2:
        x[2] = 0.0  # an all-zero row: scale 0, q 0
    q, scale = ops.quantize_int8(x)
    q_ref, scale_ref = ref.quantize_int8(x)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert q.abs().max() <= 127


def test_quantize_round_trip_error_is_bounded():
    x = torch.randn(16, 256)
    q, scale = ops.quantize_int8(x)
    assert ((q.float() * scale[:, None] - x).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("m, n, k", [(1, 2, 1), (5, 5, 1), (1, 1, 5), (2, 1, 7)])
@pytest.mark.parametrize("transpose_a", [False, True], ids=["a", "a=t()"])
def test_degenerate_strides(backend, m, n, k, transpose_a):
    """Size-1 dimensions give views strides like (1, 1); oneDNN misreads those unless we fix them."""
    a = torch.randint(-128, 128, (k, m) if transpose_a else (m, k), dtype=torch.int8)
    a = a.t() if transpose_a else a
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8).t()
    expected = (a.long() @ b.long()).int()
    assert torch.equal(ops.int8_gemm(a, b), expected)
    scale_a, scale_b = torch.ones(m), torch.ones(n)
    assert torch.equal(ops.int8_scaled_gemm(a, b, scale_a, scale_b, out_dtype=torch.float32), expected.float())


def test_empty_m():
    a, b = _operands(0, 5, 8, seed=0)
    assert ops.int8_gemm(a, b).shape == (0, 5)


# -- bad input ----------------------------------------------------------------------------------

def _good():
    a, b = _operands(4, 6, 8, seed=1)
    return dict(a=a, b=b, scale_a=torch.ones(4), scale_b=torch.ones(6))


@pytest.mark.parametrize("change, error, fragment", [
    (dict(a=torch.zeros(4, 8)), TypeError, "a: expected dtype int8, got float32"),
    (dict(b=torch.zeros(8, 6, dtype=torch.int32)), TypeError, "b: expected dtype int8"),
    (dict(a=torch.zeros(4, 8, 1, dtype=torch.int8)), ValueError, "a: expected a 2-D tensor"),
    (dict(b=torch.zeros(9, 6, dtype=torch.int8)), ValueError, "b: expected shape \\[K, N\\] with K = a.shape\\[1\\] = 8"),
    (dict(a="not a tensor"), TypeError, "a: expected a torch.Tensor"),
    (dict(scale_a=torch.ones(5)), ValueError, "scale_a: expected shape \\[M\\] = \\(4,\\)"),
    (dict(scale_b=torch.ones(6, dtype=torch.float16)), TypeError, "scale_b: expected dtype float32"),
    (dict(scale_b=torch.ones(1, 6)), ValueError, "scale_b: expected a 1-D tensor"),
    (dict(bias=torch.ones(7)), ValueError, "bias: expected shape \\[N\\]"),
    (dict(bias=torch.ones(6, dtype=torch.int32)), TypeError, "bias: expected dtype"),
    (dict(out_dtype=torch.int8), TypeError, "out_dtype"),
    (dict(out=torch.empty(4, 6, dtype=torch.float16)), ValueError, "out: expected shape \\(4, 6\\), dtype bfloat16"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_scaled_gemm_bad_input_names_the_argument(change, error, fragment):
    kwargs = _good() | change
    with pytest.raises(error, match=fragment):
        ops.int8_scaled_gemm(**kwargs)


def test_k_beyond_int32_exactness_is_rejected():
    a = torch.zeros(1, 2**17, dtype=torch.int8)
    with pytest.raises(ValueError, match="K = 131072 exceeds 131071"):
        ops.int8_gemm(a, torch.zeros(2**17, 1, dtype=torch.int8))


def test_mixed_devices_are_rejected():
    a, b = _operands(4, 6, 8, seed=1)
    meta_b = b.to("meta")
    with pytest.raises(ValueError, match="b is on meta but a is on cpu"):
        ops.int8_gemm(a, meta_b)


def test_quantize_bad_input():
    with pytest.raises(TypeError, match="x: expected dtype float32 or float16 or bfloat16, got int8"):
        ops.quantize_int8(torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="x: expected a 2-D tensor"):
        ops.quantize_int8(torch.zeros(2))


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KERNELHUB_BACKEND", "cuda-graphs")
    a, b = _operands(2, 2, 8, seed=0)
    with pytest.raises(ValueError, match="KERNELHUB_BACKEND='cuda-graphs': expected one of auto, triton, reference"):
        ops.int8_gemm(a, b)


# -- torch.compile ------------------------------------------------------------------------------

def test_compile_fullgraph_traces_every_op():
    def layer(x, q_weight, w_scale, bias):
        q_x, x_scale = ops.quantize_int8(x)
        y = ops.int8_scaled_gemm(q_x, q_weight.t(), x_scale, w_scale, bias, torch.float32)
        return y + ops.int8_gemm(q_x, q_weight.t()).float()

    torch.manual_seed(0)
    x, weight, bias = torch.randn(9, 64), torch.randn(33, 64), torch.randn(33)
    q_weight, w_scale = ops.quantize_int8(weight)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, q_weight, w_scale, bias), layer(x, q_weight, w_scale, bias))
