"""kernelhub.ops: every backend against the reference, argument errors, out=, torch.compile."""

import itertools

import pytest
import torch

import kernelhub.ops as ops
from kernelhub.checking import mismatch_close, poison_
from kernelhub.kernels.int8_gemm import ops as int8_ops
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


def _refused(check, *args) -> bool:
    try:
        check(*args)
    except (TypeError, ValueError):
        return True
    return False


def _operand_variants():
    """Operands around a good call (M = 4, N = 6, K = 8), each failing one check or passing it
    in another form: a dict (name -> value) for each of a, b, scale_a, scale_b, bias, out_dtype."""
    good_a, good_b = _operands(4, 6, 8, seed=3)
    big_k = torch.zeros(1, 1, dtype=torch.int8).expand(4, int8_ops.MAX_K + 1)  # K past the int32 limit, no memory
    a = {"a": good_a, "a view": good_a.t().contiguous().t(), "a float": good_a.float(), "a 3-D": good_a[..., None],
         "a meta": good_a.to("meta"), "a K=9": torch.zeros(4, 9, dtype=torch.int8), "a str": "a",
         "a big K": big_k}
    b = {"b": good_b, "b [K, N]": good_b.contiguous(), "b int32": good_b.to(torch.int32), "b meta": good_b.to("meta"),
         "b 1-D": good_b[:, 0], "b big K": big_k.t()[:, :6],
         "b parameter": torch.nn.Parameter(good_b.contiguous(), requires_grad=False)}
    grad = lambda t: t.clone().requires_grad_()  # noqa: E731
    scale_a = {"sa": torch.rand(4), "sa [5]": torch.rand(5), "sa f16": torch.rand(4).half(),
               "sa grad": grad(torch.rand(4)), "sa meta": torch.rand(4, device="meta"), "sa 0-D": torch.tensor(1.0)}
    with torch.inference_mode():
        scale_a["sa inference"] = torch.rand(4)
    scale_b = {"sb": torch.rand(6), "sb [7]": torch.rand(7), "sb 2-D": torch.rand(1, 6), "sb grad": grad(torch.rand(6)),
               "sb meta": torch.rand(6, device="meta"), "sb parameter": torch.nn.Parameter(torch.rand(6))}
    bias = {"no bias": None, "bias": torch.rand(6), "bias bf16": torch.rand(6).bfloat16(), "bias [7]": torch.rand(7),
            "bias int32": torch.ones(6, dtype=torch.int32), "bias grad": grad(torch.rand(6)),
            "bias meta": torch.rand(6, device="meta")}
    out_dtype = {"bf16": torch.bfloat16, "f32": torch.float32, "int8": torch.int8}
    return a, b, scale_a, scale_b, bias, out_dtype


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
def test_the_fast_acceptance_agrees_with_the_checks(grad_enabled):
    """The int8 GEMMs accept a common call at once (kernelhub/kernels/int8_gemm/ops.py) and run
    their checks only for the others: whatever is accepted must pass the checks, and every call
    that passes them with plain CPU tensors (nothing requiring grad) must be accepted."""
    def plain(*tensors):
        return all(t is None or (t.is_cpu and not t.requires_grad) for t in tensors)

    a, b, scale_a, scale_b, bias, out_dtype = _operand_variants()
    counts = {"accepted": 0, "refused": 0}
    with torch.set_grad_enabled(grad_enabled):
        for (name_a, x), (name_b, y) in itertools.product(a.items(), b.items()):
            accepted = int8_ops._accepted_int8_shape(x, y) is not None
            refused = _refused(int8_ops._check_int8_gemm, x, y, None)
            assert not (accepted and refused), (name_a, name_b)
            if not refused and plain(x, y):
                assert accepted, (name_a, name_b)
        for named in itertools.product(a.items(), b.items(), scale_a.items(), scale_b.items(), bias.items(),
                                       out_dtype.items()):
            names, args = zip(*named)
            accepted = int8_ops._accepts_scaled(*args)
            refused = _refused(int8_ops._check_int8_scaled_gemm, *args, None)
            assert not (accepted and refused), names
            if not refused and plain(*args[:5]):
                assert accepted, names
            counts["accepted"] += accepted
            counts["refused"] += refused
    assert counts["accepted"] > 0 and counts["refused"] > 0


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


def test_compile_fullgraph_writes_out():
    def gemm_into(a, b, out):
        return ops.int8_gemm(a, b, out=out)

    a, b = _operands(9, 33, 64, seed=5)
    out = poison_(torch.empty(9, 33, dtype=torch.int32))
    compiled = torch.compile(gemm_into, fullgraph=True, backend="aot_eager")
    result = compiled(a, b, out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32))


# -- torch.library registration (kernelhub/kernels/common/library.py) ----------------------------

def _registered_op_inputs():
    """Arguments of every registered kernel op (its schema's, without out=), small and valid."""
    from kernelhub.reference.rope import rope_tables

    gen = torch.Generator().manual_seed(3)
    a, b = _operands(9, 33, 64, seed=3)
    x = torch.randn(9, 64, generator=gen)
    k = torch.randn(1, 2, 8 * 5 + 3, 16, generator=gen)
    lowrank_a, basis = torch.randn(1, 43, 6, generator=gen), torch.randn(1, 6, 32, generator=gen)
    positions = torch.randint(0, 43, (1, 2, 5), generator=gen)
    cos, sin = rope_tables(43, 16)
    lm = ops.landmarks(k)
    q = torch.randn(1, 4, 16, generator=gen)
    exclude = torch.zeros(1, 2, 5, dtype=torch.bool)
    exclude[0, 1, 2] = True
    values = torch.randn(2, 3, 10, 4, 8, generator=gen)
    chunk_idx = torch.randint(0, 10, (2, 3, 4), generator=gen)
    return {
        "int8_gemm": [(a, b)],
        "int8_scaled_gemm": [(a, b, torch.rand(9), torch.rand(33), None, torch.bfloat16),
                             (a, b, torch.rand(9), torch.rand(33), torch.randn(33), torch.float32)],
        "quantize_int8": [(x,), (x.to(torch.float16),)],
        "rmsnorm_quantize_int8": [(x, torch.rand(64, generator=gen) + 0.5, None, 1e-6),
                                  (x.to(torch.bfloat16), torch.rand(64, generator=gen), x.to(torch.bfloat16), 1e-5)],
        "landmarks": [(k, 8)],
        "outlier_chunks": [(k, lm, 2, 8)],
        "landmark_topk": [(q, lm, 3, None), (q, lm, 3, exclude)],
        "lowrank_keys": [(k, 4), (k, 4, "int8")],  # gram defaults to "float32" in the schema too
        "reconstruct_keys": [(lowrank_a, basis, positions, cos, sin, None),
                             (lowrank_a, basis, positions, cos[:10], sin[:10], torch.randint(0, 10, (1, 2, 5)))],
        "sparse_gather": [(values, chunk_idx, None, None, torch.device("cpu"))],
    }


def test_every_public_op_is_one_registered_kernel_op():
    from kernelhub.kernels.common.library import KERNEL_OPS

    assert set(KERNEL_OPS) == set(_registered_op_inputs())
    public = {"int8_gemm", "int8_scaled_gemm", "quantize_int8", "rmsnorm_quantize_int8", "lowrank_keys",
              "reconstruct_keys", "landmarks", "outlier_chunks", "landmark_topk", "sparse_gather"}
    assert set(KERNEL_OPS) == public
    for name, op in KERNEL_OPS.items():
        assert op.overload is getattr(torch.ops.kernelhub, name).default
    assert {name for name, op in KERNEL_OPS.items() if op.takes_out} == {
        "int8_gemm", "int8_scaled_gemm", "reconstruct_keys", "landmark_topk", "sparse_gather"}


@pytest.mark.parametrize("name", sorted(_registered_op_inputs()))
def test_registered_op_and_its_fake_agree_with_eager(name):
    """torch.library.opcheck: the schema (no input mutated or aliased), the fake against the real
    result (shapes, dtypes, devices, strides aside), and tracing under aot_autograd with dynamic shapes."""
    from kernelhub.kernels.common.library import KERNEL_OPS

    op = KERNEL_OPS[name]
    for args in _registered_op_inputs()[name]:
        torch.library.opcheck(op.overload, args)
        eager = op(*args, None) if op.takes_out else op(*args)
        through_dispatcher = op.overload(*args)
        for got, want in zip(*(r if isinstance(r, tuple) else (r,) for r in (through_dispatcher, eager))):
            assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device)


def test_eager_calls_skip_the_dispatcher():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.namespace)
            return func(*args, **(kwargs or {}))

    x = torch.randn(9, 64)
    with Recorder() as eager:
        q, scale = ops.quantize_int8(x)
        ops.int8_scaled_gemm(q, q.t(), scale, scale)
    with Recorder() as dispatched:
        torch.ops.kernelhub.quantize_int8(x)
    assert eager.ops and "kernelhub" not in eager.ops
    assert "kernelhub" in dispatched.ops


def test_kernel_op_refuses_an_out_it_cannot_handle():
    from kernelhub.kernels.common.library import kernel_op

    def fake(x):
        return x

    def pair_with_out(x: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x

    def out_not_last(out: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return x

    def out_not_optional(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x

    for impl, fragment in ((pair_with_out, "returns one torch.Tensor"), (out_not_last, "last parameter"),
                           (out_not_optional, r"annotated torch.Tensor \| None")):
        with pytest.raises(TypeError, match=fragment):
            kernel_op(f"test_refused_{impl.__name__}", fake=fake)(impl)
