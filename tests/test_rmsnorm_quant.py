"""RMSNorm + int8 quantisation (`kernelhub.ops.rmsnorm_quantize_int8`) beyond the contract suite
(tests/test_contract.py runs the DEFAULT at every smoke shape): the reference's semantics, the
Triton kernel (in the interpreter without a GPU) at odd shapes and non-default configs, every
backend bit for bit against the reference, views, bad arguments, torch.compile.

q and scale are compared bit for bit everywhere: every path adds the squares in the order the
reference specifies (`kernelhub.reference.rmsnorm_quant`), so there is no tolerance to state.
Outputs are poisoned before a launch, so an element a kernel forgets to write fails.
"""

import math
import warnings

import numpy as np
import pytest
import torch

import kernelhub.ops as ops
from helpers import DEVICE, backend, dtype_id  # noqa: F401
from kernelhub.checking import check_config, poison_
from kernelhub.kernels.rmsnorm_quant import space
from kernelhub.kernels.rmsnorm_quant.kernel import rmsnorm_quant_triton
from kernelhub.kernels.rmsnorm_quant.spec import SPEC
from kernelhub.reference import int8_gemm as int8_ref
from kernelhub.reference import rmsnorm_quant as ref
from strided_views import KINDS, layouts, structured

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TINY_EPS = 2.0**-149  # the smallest float32 eps: a mean square of 1 plus it is still 1
NAN, INF = float("nan"), float("inf")
# The interpreter computes with numpy, which warns of the infinities and NaNs these tests feed it.
non_finite = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")


def _inputs(m, k, dtype, *, seed, residual=False, weight_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    weight = (torch.rand(k, generator=gen) + 0.5).to(weight_dtype or dtype)
    res = torch.randn(m, k, generator=gen).to(dtype) if residual else None
    return x, weight, res


def _same(actual, expected) -> str | None:
    """None if the tuples agree element for element (NaN matching NaN), else what differs."""
    assert len(actual) == len(expected), (len(actual), len(expected))
    for name, a, e in zip(("q", "scale", "h"), actual, expected):
        if (a.shape, a.dtype) != (e.shape, e.dtype):
            return f"{name}: {tuple(a.shape)} {a.dtype} != {tuple(e.shape)} {e.dtype}"
        equal = a == e
        if a.is_floating_point():
            equal |= a.isnan() & e.isnan()
        if not bool(equal.all()):
            where = tuple(int(i) for i in (~equal).nonzero()[0])
            return (f"{name}: {int((~equal).sum())} of {a.numel()} differ; first at {list(where)}: "
                    f"{a[where]} != {e[where]}")
    return None


def _assert_same(actual, expected):
    problem = _same(actual, expected)
    assert problem is None, problem


# -- the reference --------------------------------------------------------------------------------

def test_reference_by_hand():
    """x = [3, 4]: mean square 12.5, y = [3, 4] / sqrt(12.5), so q = round(127 * 3 / 4) = 95 and 127."""
    x = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    weight = torch.tensor([1.0, 1.0])
    q, scale = ref.rmsnorm_quantize_int8(x, weight, 1e-6)
    assert q.tolist() == [[95, 127], [95, 127]]
    assert scale[0].item() == pytest.approx(4 / math.sqrt(12.5 + 1e-6) / 127, rel=1e-6)
    q, _ = ref.rmsnorm_quantize_int8(x, torch.tensor([2.0, 0.5]), 1e-6)  # y = [6, 2] / sqrt(12.5)
    assert q[0].tolist() == [127, 42]  # 127 * 2 / 6 = 42.33


def test_reference_rounds_half_to_even():
    """A row of ones has r = 1 exactly (with a negligible eps), so y = weight and scale = 1 when
    max |weight| = 127: every half-integer weight is a tie."""
    weight = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5, 3.5])
    q, scale = ref.rmsnorm_quantize_int8(torch.ones(2, 9), weight, TINY_EPS)
    assert scale.tolist() == [1.0, 1.0]
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, 126, -126, 4]


def test_reference_is_quantize_int8_of_the_normalised_rows():
    """The contract with quantize_int8: the same (q, scale) from the float32 rows y."""
    for dtype in DTYPES:
        x, weight, res = _inputs(37, 3000, dtype, seed=1, residual=True)
        h = ref.add_residual(x, res)
        q, scale, h_out = ref.rmsnorm_quantize_int8(x, weight, 1e-5, res)
        assert torch.equal(h_out, h)
        _assert_same((q, scale), int8_ref.quantize_int8(ref.rmsnorm(h, weight, 1e-5)))


def test_reference_close_to_the_textbook_formula():
    """Against torch's own mean and rsqrt, which add in another order: r agrees to a few ulps, so
    scales agree to a few ulps and q to +-1, at a handful of elements only (rounding ties)."""
    x, weight, _ = _inputs(64, 4096, torch.float32, seed=2)
    r = ref.inverse_rms(x, 1e-6)
    r_textbook = torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
    assert ((r - r_textbook).abs() <= 4 * torch.finfo(torch.float32).eps * r).all()
    q, scale = ref.rmsnorm_quantize_int8(x, weight, 1e-6)
    q_textbook, scale_textbook = int8_ref.quantize_int8(x * r_textbook[:, None] * weight)
    torch.testing.assert_close(scale, scale_textbook, rtol=1e-6, atol=0)
    assert (q.int() - q_textbook.int()).abs().max() <= 1
    assert (q != q_textbook).float().mean() < 1e-3


def test_reference_sums_in_the_stated_order():
    """Lane j holds the squares of columns j, j + 1024, ... added left to right; then the lanes are
    added in a pairwise tree. Written out one float32 addition at a time (numpy scalars)."""
    k = 2 * ref.LANES + 5
    squares = torch.rand(1, k, generator=torch.Generator().manual_seed(8)) ** 4 * 1000  # magnitudes far apart
    values = squares[0].numpy()
    lanes = [np.float32(0.0)] * ref.LANES
    for col in range(k):
        lanes[col % ref.LANES] = lanes[col % ref.LANES] + values[col]
    while len(lanes) > 1:
        lanes = [lanes[i] + lanes[i + 1] for i in range(0, len(lanes), 2)]
    assert lanes[0].dtype == np.float32
    assert ref.lane_sum(squares).item() == lanes[0].item()


def test_reference_zero_row_and_empty_rows():
    x = torch.randn(3, 10)
    x[1] = 0.0
    q, scale = ref.rmsnorm_quantize_int8(x, torch.rand(10) + 0.5, 1e-6)
    assert scale[1].item() == 0.0 and (q[1] == 0).all() and (scale[[0, 2]] > 0).all()
    q, scale = ref.rmsnorm_quantize_int8(torch.empty(4, 0), torch.empty(0), 1e-6)
    assert q.shape == (4, 0) and scale.tolist() == [0.0] * 4


def _non_finite_rows(dtype):
    """Rows: finite, NaN, +Inf, -Inf and NaN, squares that overflow float32 (float32 only), zero."""
    x, weight, _ = _inputs(6, 40, dtype, seed=3)
    x[1, 3] = NAN
    x[2, 7] = INF
    x[3, 0], x[3, 9] = -INF, NAN
    if dtype == torch.float32:
        x[4, 5] = 1e20  # its square is +Inf: r = 0, y = 0
    x[5] = 0.0
    return x, weight


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_reference_non_finite_rows(dtype):
    x, weight = _non_finite_rows(dtype)
    q, scale = ref.rmsnorm_quantize_int8(x, weight, 1e-6)
    assert (scale[0] > 0) and scale[1:4].isnan().all()
    assert (q[1:4] == 0).all()
    if dtype == torch.float32:
        assert scale[4].item() == 0.0 and (q[4] == 0).all()
    assert scale[5].item() == 0.0 and (q[5] == 0).all()
    weight_nan = weight.clone()
    weight_nan[11] = NAN  # a NaN in weight reaches every row
    assert ref.rmsnorm_quantize_int8(x, weight_nan, 1e-6)[1][[0, 5]].isnan().all()


# -- the Triton kernel, in the interpreter without a GPU ----------------------------------------------

def _run_kernel(x, weight, eps, config, residual=None):
    m, k = x.shape
    q = poison_(torch.empty(m, k, dtype=torch.int8, device=x.device))
    scale = poison_(torch.empty(m, dtype=torch.float32, device=x.device))
    h = poison_(torch.empty(m, k, dtype=x.dtype, device=x.device)) if residual is not None else None
    result = rmsnorm_quant_triton(x, weight, eps, config=config, q_out=q, scale_out=scale, residual=residual,
                                  h_out=h)
    assert result[0] is q and result[1] is scale and (h is None or result[2] is h)
    return result


CONFIGS = [{"BLOCK_K": k, "num_warps": w} for k, w in [(256, 4), (512, 8), (2048, 8), (4096, 4)]]
KERNEL_SHAPES = [(1, 1), (7, 7), (63, 129), (65, 257), (3, 2049), (2, 4100)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"k{c['BLOCK_K']}w{c['num_warps']}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_kernel_configs_match_reference(config, dtype):
    """Every config the same bits (one and several K tiles of both passes, partial last tiles)."""
    assert space.SPACE.validate(config) == config
    for i, (m, k) in enumerate(KERNEL_SHAPES):
        for residual in (False, True):
            x, weight, res = _inputs(m, k, dtype, seed=10 + i, residual=residual)
            x, weight, res = (t.to(DEVICE) if t is not None else None for t in (x, weight, res))
            got = _run_kernel(x, weight, 1e-6, config, res)
            problem = _same(tuple(t.cpu() for t in got), ref.rmsnorm_quantize_int8(x.cpu(), weight.cpu(), 1e-6,
                                                                                   None if res is None else res.cpu()))
            assert problem is None, f"M={m} K={k} residual={residual}: {problem}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_kernel_float32_weight_and_ties(dtype):
    x, weight, res = _inputs(9, 1500, dtype, seed=4, residual=True, weight_dtype=torch.float32)
    got = _run_kernel(x.to(DEVICE), weight.to(DEVICE), 1e-5, space.DEFAULT, res.to(DEVICE))
    _assert_same(tuple(t.cpu() for t in got), ref.rmsnorm_quantize_int8(x, weight, 1e-5, res))
    tie_weight = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5, 3.5])
    q, scale = _run_kernel(torch.ones(2, 9, device=DEVICE), tie_weight.to(DEVICE), TINY_EPS, space.DEFAULT)
    assert scale.tolist() == [1.0, 1.0] and q[0].tolist() == [127, 0, 2, 2, 0, -2, 126, -126, 4]


@non_finite
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_kernel_non_finite_rows_are_bit_exact(dtype):
    x, weight = _non_finite_rows(dtype)
    res = torch.zeros_like(x)
    res[0, 1] = INF  # a finite row of x made infinite by its residual
    for residual in (None, res):
        got = _run_kernel(x.to(DEVICE), weight.to(DEVICE), 1e-6, space.DEFAULT,
                          None if residual is None else residual.to(DEVICE))
        _assert_same(tuple(t.cpu() for t in got), ref.rmsnorm_quantize_int8(x, weight, 1e-6, residual))


@non_finite
def test_kernel_bfloat16_residual_rounds_to_nearest_even():
    """x + residual exactly halfway between two bfloat16 values (to the even one below and above,
    and up into the next binade), just above halfway, and overflowing: the kernel rounds like
    torch (Triton's interpreter alone would truncate)."""
    one_ulp = 2.0**-7  # of bfloat16 at 1.0
    x = torch.tensor([[1.0, 1.0 + one_ulp, 2.0 - one_ulp, 1.0, -1.0, 3.0e38]], dtype=torch.bfloat16)
    res = torch.tensor([[one_ulp / 2, one_ulp / 2, one_ulp / 2, one_ulp / 4 * 3, -one_ulp / 2, 3.0e38]]
                       ).to(torch.bfloat16)
    _, _, h = _run_kernel(x.to(DEVICE), torch.ones(6, dtype=torch.bfloat16, device=DEVICE), 1e-6,
                          space.DEFAULT, res.to(DEVICE))
    assert torch.equal(h.cpu(), (x.float() + res.float()).to(torch.bfloat16))


def test_sampled_configs_match_reference():
    """A reproducible sample of the space at a real width, the check the tuner makes of a trial."""
    shape = (5, 4096, 1)
    for config in space.SPACE.sample(4, shape, smem_bytes=101376, seed=7):
        for dtype in SPEC.dtypes:
            outcome = check_config(SPEC, shape, dtype, config, device=DEVICE, seed=3)
            assert outcome.ok, f"{config} {dtype}: {outcome.problem}"


def test_kernel_empty_sizes():
    for m, k in ((0, 5), (3, 0)):
        q, scale = _run_kernel(torch.randn(m, k, device=DEVICE), torch.ones(k, device=DEVICE), 1e-6, space.DEFAULT)
        assert q.shape == (m, k) and scale.tolist() == [0.0] * m


# -- the public op, every backend (the CPU path, the Triton kernels, the reference) -------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (33, 4096 + 7), (2, 1024)], ids=lambda s: "M{}K{}".format(*s))
def test_op_matches_reference(backend, dtype, shape):  # noqa: F811
    m, k = shape
    for residual, weight_dtype in ((False, None), (True, None), (True, torch.float32)):
        x, weight, res = _inputs(m, k, dtype, seed=m + k, residual=residual, weight_dtype=weight_dtype)
        expected = ref.rmsnorm_quantize_int8(x, weight, 1e-6, res)
        got = ops.rmsnorm_quantize_int8(x, weight, residual=res) if residual else ops.rmsnorm_quantize_int8(x, weight)
        assert len(got) == (3 if residual else 2)
        _assert_same(got, expected)


@non_finite
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_op_non_finite_and_empty(backend, dtype):  # noqa: F811
    x, weight = _non_finite_rows(dtype)
    with warnings.catch_warnings():
        if backend == "cpu-auto":  # the CPU path's numpy arithmetic must not warn of what it defines
            warnings.simplefilter("error")
        _assert_same(ops.rmsnorm_quantize_int8(x, weight), ref.rmsnorm_quantize_int8(x, weight, 1e-6))
        weight[4] = NAN
        _assert_same(ops.rmsnorm_quantize_int8(x, weight), ref.rmsnorm_quantize_int8(x, weight, 1e-6))
    for m, k in ((0, 5), (3, 0)):
        x, weight, res = _inputs(m, k, dtype, seed=0, residual=True)
        q, scale, h = ops.rmsnorm_quantize_int8(x, weight, residual=res)
        assert q.shape == (m, k) and h.shape == (m, k) and scale.tolist() == [0.0] * m


@non_finite
@pytest.mark.parametrize("path", ["numpy", "torch"])
def test_both_cpu_paths_match_reference(monkeypatch, path):
    """The CPU path computes small problems in numpy and large ones with torch's [M, K] passes:
    both bit for bit, non-finite rows included, without a warning."""
    from kernelhub.kernels.rmsnorm_quant import ops as family_ops

    monkeypatch.setattr(family_ops, "_NUMPY_MAX_ELEMENTS", 1 << 30 if path == "numpy" else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in DTYPES:
            x, weight, res = _inputs(17, 2100, dtype, seed=9, residual=True, weight_dtype=torch.float32)
            expected = ref.rmsnorm_quantize_int8(x, weight, 1e-6, res)
            _assert_same(ops.rmsnorm_quantize_int8(x, weight, residual=res), expected)
            x, weight = _non_finite_rows(dtype)
            weight[2] = INF
            _assert_same(ops.rmsnorm_quantize_int8(x, weight), ref.rmsnorm_quantize_int8(x, weight, 1e-6))


def test_parameters_are_read_under_no_grad_and_inference_mode(backend):  # noqa: F811
    norm = torch.nn.Parameter(torch.rand(64) + 0.5)
    x = torch.randn(3, 64)
    expected = ref.rmsnorm_quantize_int8(x, norm.detach(), 1e-6)
    with torch.no_grad():
        _assert_same(ops.rmsnorm_quantize_int8(x, norm), expected)
    with torch.inference_mode():
        _assert_same(ops.rmsnorm_quantize_int8(x, norm), expected)


def test_op_eps_is_rounded_to_float32(backend):  # noqa: F811
    """An eps that float32 cannot hold exactly is used as float32 rounds it, on every backend."""
    x = torch.zeros(2, 8)
    x[0] = 1e-4
    for eps in (1e-6, 0.1, 3e-39):
        _assert_same(ops.rmsnorm_quantize_int8(x, torch.ones(8), eps), ref.rmsnorm_quantize_int8(x, torch.ones(8), eps))


# -- views ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_views_give_the_contiguous_result(backend, kind):  # noqa: F811
    """x, weight and residual in every layout strided_views makes (transposed, sliced, broadcast,
    overlapping): the result of their contiguous copies, element for element."""
    gen = torch.Generator().manual_seed(5)

    def normal(*s):
        return torch.randn(s, generator=gen) * 2

    inputs = dict(x=structured(normal, (5, 9), kind), weight=structured(normal, (9,), kind) + 3,
                  residual=structured(normal, (5, 9), kind))
    expected = ops.rmsnorm_quantize_int8(**inputs)
    checked = 0
    for name, value in inputs.items():
        for layout, view in layouts(value):
            problem = _same(ops.rmsnorm_quantize_int8(**(inputs | {name: view})), expected)
            assert problem is None, f"{name} {layout} (strides {view.stride()}): {problem}"
            checked += 1
    assert checked > 9


# -- bad arguments ------------------------------------------------------------------------------------

def _good():
    return dict(x=torch.randn(4, 8, dtype=torch.bfloat16), weight=torch.ones(8, dtype=torch.bfloat16),
                residual=torch.zeros(4, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("change, error, fragment", [
    (dict(x=torch.zeros(4, 8, dtype=torch.int8)), TypeError,
     "x: expected dtype float32 or float16 or bfloat16, got int8"),
    (dict(x="x"), TypeError, "x: expected a torch.Tensor, got str"),
    (dict(x=torch.zeros(4, 8, 1, dtype=torch.bfloat16)), ValueError, "x: expected a 2-D tensor"),
    (dict(weight=torch.ones(8, dtype=torch.float16)), TypeError,
     "weight: expected dtype bfloat16 \\(that of x\\) or float32, got float16"),
    (dict(x=torch.randn(4, 8), weight=torch.ones(8, dtype=torch.float16), residual=None), TypeError,
     "weight: expected dtype float32, got float16"),
    (dict(weight=torch.ones(7, dtype=torch.bfloat16)), ValueError,
     "weight: expected shape \\[K\\] = \\(8,\\), got \\(7,\\)"),
    (dict(weight=torch.ones(1, 8, dtype=torch.bfloat16)), ValueError, "weight: expected a 1-D tensor"),
    (dict(weight=None), TypeError, "weight: expected a torch.Tensor, got NoneType"),
    (dict(residual=torch.zeros(4, 8)), TypeError, "residual: expected dtype bfloat16 \\(that of x\\), got float32"),
    (dict(residual=torch.zeros(4, 9, dtype=torch.bfloat16)), ValueError,
     "residual: expected shape \\[M, K\\] \\(that of x\\) = \\(4, 8\\), got \\(4, 9\\)"),
    (dict(residual=torch.zeros(32, dtype=torch.bfloat16)), ValueError, "residual: expected a 2-D tensor"),
    (dict(eps=0.0), ValueError, "eps: expected a finite number > 0"),
    (dict(eps=-1e-6), ValueError, "eps: expected a finite number > 0"),
    (dict(eps=NAN), ValueError, "eps: expected a finite number > 0"),
    (dict(eps=INF), ValueError, "eps: expected a finite number > 0"),
    (dict(eps=1e-50), ValueError, "eps: expected a finite number > 0 that float32 can hold"),
    (dict(eps=1e39), ValueError, "eps: expected a finite number > 0 that float32 can hold"),
    (dict(eps="1e-6"), TypeError, "eps: expected a float, got str"),
    (dict(eps=True), TypeError, "eps: expected a float, got bool"),
    (dict(weight=torch.ones(8, dtype=torch.bfloat16, device="meta")), ValueError, "weight is on meta but x is on cpu"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_name_the_argument(change, error, fragment):
    kwargs = _good() | change
    with pytest.raises(error, match=fragment):
        ops.rmsnorm_quantize_int8(**kwargs)


def test_requires_grad_is_refused_with_grad_on():
    kwargs = _good() | dict(x=torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True))
    with pytest.raises(TypeError, match="x: requires grad, but kernelhub ops have no backward"):
        ops.rmsnorm_quantize_int8(**kwargs)
    with torch.no_grad():
        ops.rmsnorm_quantize_int8(**kwargs)


def test_eps_accepts_ints_and_numpy_floats():
    x, weight = torch.randn(2, 8), torch.ones(8)
    expected = ops.rmsnorm_quantize_int8(x, weight, 1.0)
    _assert_same(ops.rmsnorm_quantize_int8(x, weight, 1), expected)
    _assert_same(ops.rmsnorm_quantize_int8(x, weight, np.float32(1.0)), expected)


# -- torch.compile ------------------------------------------------------------------------------------

def test_compile_fullgraph_with_and_without_residual():
    def block(x, residual, norm_weight, q_weight, w_scale):
        q, scale, h = ops.rmsnorm_quantize_int8(x, norm_weight, 1e-5, residual=residual)
        y = ops.int8_scaled_gemm(q, q_weight.t(), scale, w_scale, None, torch.float32)
        q2, scale2 = ops.rmsnorm_quantize_int8(h, norm_weight)
        return y, h, q2.float() * scale2[:, None]

    x, weight, res = _inputs(9, 64, torch.bfloat16, seed=6, residual=True)
    q_weight, w_scale = ops.quantize_int8(torch.randn(33, 64))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, res, weight, q_weight, w_scale), block(x, res, weight, q_weight, w_scale)):
        assert torch.equal(got, want)
