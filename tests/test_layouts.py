"""A result never depends on the memory layout of the inputs: every public op, every backend.

Each tensor argument of each op in `kernelhub.ops` is replaced, one at a time, by every view of
the same values that `strided_views.layouts` makes (transposed, sliced, negative-index, broadcast
with zero strides, self-overlapping), and the result must equal the op's result on the contiguous
inputs, element for element (the same backend does the same arithmetic whatever the strides, so
even float results are compared exactly). `out=` is poisoned, so an element nobody wrote fails,
and is itself tried in every layout an output may have; outputs that overlap themselves or an
input are refused. Values are built to admit the broadcast and overlapping views
(`strided_views.structured`: constant rows, constant columns, Hankel). Sizes are tiny, because
the Triton path runs in the interpreter.

Also here: the non-finite semantics of `quantize_int8` on every backend, and the argument rules
every op shares (`kernelhub.validation`): no autograd, `out=` overlap, K = 0, D = 0, `device=`,
lowrank_keys on non-finite and huge keys.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import kernelhub.ops as ops  # noqa: E402
import tp_overlap_cases  # noqa: E402
from kernelhub.checking import poison_  # noqa: E402
from kernelhub.local_world import LocalWorld  # noqa: E402
from kernelhub.reference import int8_gemm as int8_ref  # noqa: E402
from kernelhub.reference import lowrank_keys as lowrank_ref  # noqa: E402
from kernelhub.reference import sparse_gather as gather_ref  # noqa: E402
from strided_views import KINDS, layouts, structured  # noqa: E402

BACKENDS = ["auto", "triton", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("KERNELHUB_BACKEND", request.param)
    return request.param


def _draws(seed: int):
    """Draws from one seeded generator: int8, float32 normal, positive float32, and factories of
    ints in [0, high) and of bools true with probability p."""
    gen = torch.Generator().manual_seed(seed)
    return (lambda *s: torch.randint(-128, 128, s, dtype=torch.int8, generator=gen),
            lambda *s: torch.randn(s, generator=gen),
            lambda *s: torch.rand(s, generator=gen) + 0.5,
            lambda high: lambda *s: torch.randint(0, high, s, generator=gen),
            lambda p: lambda *s: torch.rand(s, generator=gen) < p)


def _same(actual, expected) -> str | None:
    """None if equal element for element (tuples elementwise), else what differs."""
    if isinstance(expected, tuple):
        for i, (a, e) in enumerate(zip(actual, expected)):
            problem = _same(a, e)
            if problem:
                return f"output {i}: {problem}"
        return None
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return f"got {tuple(actual.shape)} {actual.dtype}, expected {tuple(expected.shape)} {expected.dtype}"
    equal = actual == expected
    if actual.is_floating_point():
        equal |= actual.isnan() & expected.isnan()  # NaN where NaN is expected (its payload aside)
    if bool(equal.all()):
        return None
    where = tuple(int(i) for i in (~equal).nonzero()[0])
    return (f"{int((~equal).sum())} of {equal.numel()} differ; first at {list(where)}: "
            f"{actual[where]} != {expected[where]}")


def assert_layout_independent(op, inputs: dict, *, takes_out: bool = False) -> int:
    """`op(**inputs)` with each tensor argument in every layout (one at a time) equals the result on
    the contiguous inputs; with `takes_out`, into a poisoned `out=`, which must be what is returned,
    and in every writable layout of `out` too. Returns the number of calls checked."""
    expected = op(**inputs)
    new_out = (lambda: poison_(torch.empty_like(expected))) if takes_out else None
    calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. oneDNN's "could not construct a memory descriptor"
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                continue
            for layout, view in layouts(value):
                if layout == "contiguous":
                    continue
                kwargs = inputs | {name: view}
                out = new_out() if takes_out else None
                got = op(**kwargs, out=out) if takes_out else op(**kwargs)
                problem = _same(got, expected)
                assert problem is None, f"{name} {layout} (strides {view.stride()}): {problem}"
                assert out is None or got is out, f"{name} {layout}: the result is not the out= given"
                calls += 1
        if takes_out:
            for layout, out in layouts(new_out(), writable=True):
                got = op(**inputs, out=out)
                problem = _same(out, expected)
                assert got is out and problem is None, f"out {layout} (strides {out.stride()}): {problem}"
                calls += 1
    return calls


# -- the ops, one at a time --------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_int8_gemm(backend, kind):
    int8, *_ = _draws(1)
    inputs = dict(a=structured(int8, (5, 7), kind), b=structured(int8, (7, 6), kind))
    assert assert_layout_independent(ops.int8_gemm, inputs, takes_out=True) > 10


@pytest.mark.parametrize("kind", KINDS)
def test_int8_scaled_gemm(backend, kind):
    int8, normal, positive, *_ = _draws(2)
    inputs = dict(a=structured(int8, (5, 7), kind), b=structured(int8, (7, 6), kind),
                  scale_a=structured(positive, (5,), kind) / 64, scale_b=structured(positive, (6,), kind) / 64,
                  bias=structured(normal, (6,), kind).to(torch.bfloat16), out_dtype=torch.bfloat16)
    assert assert_layout_independent(ops.int8_scaled_gemm, inputs, takes_out=True) > 10


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_int8(backend, kind):
    _, normal, *_ = _draws(3)
    inputs = dict(x=structured(normal, (5, 9), kind) * 3)
    assert assert_layout_independent(ops.quantize_int8, inputs) > 3


@pytest.mark.parametrize("gram", ["float32", "int8"])
@pytest.mark.parametrize("kind", KINDS)
def test_lowrank_keys(backend, kind, gram):
    _, normal, *_ = _draws(4)
    inputs = dict(k=structured(normal, (2, 2, 11, 4), kind), rank=2, gram=gram)  # S > H_kv * D: either method runs
    assert assert_layout_independent(ops.lowrank_keys, inputs) > 3


@pytest.mark.parametrize("kind", KINDS)
def test_reconstruct_keys(backend, kind):
    _, normal, _, below, _ = _draws(5)
    batch, seq, rank, heads, head_dim, n, tables = 2, 6, 3, 2, 4, 5, 7
    inputs = dict(a=structured(normal, (batch, seq, rank), kind),
                  basis=structured(normal, (batch, rank, heads * head_dim), kind),
                  positions=structured(below(seq), (batch, heads, n), kind),
                  cos=structured(normal, (tables, head_dim), kind), sin=structured(normal, (tables, head_dim), kind),
                  rope_positions=structured(below(tables), (batch, heads, n), kind))
    assert assert_layout_independent(ops.reconstruct_keys, inputs, takes_out=True) > 10


@pytest.mark.parametrize("kind", KINDS)
def test_reconstruct_keys_with_tables_of_the_chosen_rows_in_order(backend, kind):
    """ShadowKV's call: tables holding exactly the chosen tokens' rows, rope_positions 0, 1, ...
    (the CPU path then reads the tables as views instead of gathering them)."""
    _, normal, _, below, _ = _draws(6)
    batch, seq, rank, heads, head_dim, n = 2, 6, 3, 2, 4, 5
    inputs = dict(a=structured(normal, (batch, seq, rank), kind),
                  basis=structured(normal, (batch, rank, heads * head_dim), kind),
                  positions=structured(below(seq), (batch, heads, n), kind),
                  cos=structured(normal, (batch * heads * n, head_dim), kind),
                  sin=structured(normal, (batch * heads * n, head_dim), kind),
                  rope_positions=torch.arange(batch * heads * n).view(batch, heads, n))
    assert assert_layout_independent(ops.reconstruct_keys, inputs, takes_out=True) > 10


@pytest.mark.parametrize("kind", KINDS)
def test_landmarks(backend, kind):
    _, normal, *_ = _draws(6)
    inputs = dict(k_rope=structured(normal, (2, 2, 9, 4), kind), chunk_size=4)
    assert assert_layout_independent(ops.landmarks, inputs) > 3


@pytest.mark.parametrize("kind", KINDS)
def test_outlier_chunks(backend, kind):
    _, normal, *_ = _draws(7)
    k_rope = structured(normal, (2, 2, 12, 4), kind)
    inputs = dict(k_rope=k_rope, landmarks=ops.landmarks(k_rope, 4), n=2, chunk_size=4)
    assert assert_layout_independent(ops.outlier_chunks, inputs) > 3


@pytest.mark.parametrize("kind", KINDS)
def test_landmark_topk(backend, kind):
    _, normal, _, _, coin = _draws(8)
    exclude = structured(coin(0.25), (2, 2, 7), kind) if kind != "cols" else torch.zeros(2, 2, 7, dtype=torch.bool)
    assert int((~exclude).sum(-1).min()) >= 2  # k chunks are left in every row
    inputs = dict(q=structured(normal, (2, 4, 4), kind), landmarks=structured(normal, (2, 2, 7, 4), kind),
                  k=2, exclude=exclude)
    assert assert_layout_independent(ops.landmark_topk, inputs, takes_out=True) > 10


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_gather(backend, kind):
    _, normal, _, below, _ = _draws(9)
    values = structured(normal, (2, 2, 5, 3, 4), kind)
    resident_idx = structured(below(5), (2, 2, 2), kind)
    inputs = dict(values=values, chunk_idx=structured(below(5), (2, 2, 3), kind), resident_idx=resident_idx,
                  resident=gather_ref.sparse_gather(values, resident_idx).contiguous())
    assert assert_layout_independent(ops.sparse_gather, inputs, takes_out=True) > 10


@pytest.fixture(scope="module")
def two_ranks():
    with LocalWorld(2, job_timeout_s=300) as world:
        yield world


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_tensor_parallel_ops(two_ranks, backend_name):
    """all_gather_gemm and gemm_reduce_scatter on two gloo ranks (small integers: exact)."""
    assert two_ranks.run(tp_overlap_cases.layout_mismatches, backend_name, KINDS) == [[], []]


def test_int8_gemm_into_a_strided_out(backend):
    """torch._int_mm(out=) takes only a contiguous out; any other layout must still receive the result."""
    a, b = torch.ones(3, 4, dtype=torch.int8), torch.full((4, 5), 2, dtype=torch.int8)
    for out in (poison_(torch.empty(5, 3, dtype=torch.int32)).t(),
                poison_(torch.empty(3, 10, dtype=torch.int32))[:, ::2]):
        assert ops.int8_gemm(a, b, out=out) is out
        assert torch.equal(out, torch.full((3, 5), 8, dtype=torch.int32))


# -- oneDNN: the layouts that made torch._int_mm leave its output unwritten ----------------------

@pytest.mark.parametrize("shape, strides", [
    ((5, 7), (0, 1)),   # x[:1].expand(M, K)
    ((7, 6), (1, 0)),   # w[:1].expand(N, K).t()
    ((5, 7), (1, 1)),   # as_strided rows that overlap
    ((7, 6), (1, 2)),   # columns that overlap
    ((1, 7), (1, 1)),   # w.t() of a [K, 1] weight: a size-1 dimension with an odd stride
    ((1, 7), (0, 1)),
], ids=str)
def test_cpu_int8_gemm_operands_onednn_cannot_describe(shape, strides):
    """Each (shape, strides), as a or as b, through the CPU path: oneDNN would return garbage."""
    gen = torch.Generator().manual_seed(0)
    operand = torch.randint(-128, 128, (64,), dtype=torch.int8, generator=gen).as_strided(shape, strides)
    rows, cols = shape
    before = torch.randint(-128, 128, (4, rows), dtype=torch.int8, generator=gen)
    after = torch.randint(-128, 128, (cols, 3), dtype=torch.int8, generator=gen)
    for a, b in ((operand, after), (before, operand)):
        expected = (a.long() @ b.long()).int()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(ops.int8_gemm(a, b), expected)
            out = poison_(torch.empty_like(expected))
            assert torch.equal(ops.int8_gemm(a, b, out=out), expected)
            scaled = ops.int8_scaled_gemm(a, b, torch.ones(a.shape[0]), torch.ones(b.shape[1]),
                                          out_dtype=torch.float32)
            assert torch.equal(scaled, expected.float())


def test_the_onednn_rule_holds_for_every_layout_it_passes_through():
    """The measured rule of `onednn_operand`, checked against torch._int_mm itself: every operand
    it hands over uncopied (as is, or with a size-1 dimension's stride normalised) is computed
    right, as a and as b, into a fresh output and into a contiguous `out=`."""
    from kernelhub.kernels.int8_gemm.cpu import onednn_operand

    gen = torch.Generator().manual_seed(1)
    buf = torch.randint(-128, 128, (4096,), dtype=torch.int8, generator=gen)
    passed_through = 0
    for rows, cols in [(3, 5), (5, 3), (1, 5), (5, 1), (1, 1), (17, 32)]:
        candidates = sorted({0, 1, 2, 3, rows, cols, rows + 1, cols + 1, 2 * rows, 2 * cols})
        for stride_r in candidates:
            for stride_c in candidates:
                t = buf.as_strided((rows, cols), (stride_r, stride_c), 3)
                operand = onednn_operand(t)
                if operand.data_ptr() != t.data_ptr():
                    continue  # copied: nothing to trust oneDNN with
                passed_through += 1
                for a, b in ((operand, torch.ones(cols, 4, dtype=torch.int8)),
                             (torch.ones(4, rows, dtype=torch.int8), operand)):
                    expected = (a.long() @ b.long()).int()
                    with warnings.catch_warnings():
                        warnings.simplefilter("error")
                        assert torch.equal(torch._int_mm(a, b), expected), (rows, cols, stride_r, stride_c)
                        out = poison_(torch.empty_like(expected))
                        assert torch.equal(torch._int_mm(a, b, out=out), expected), (rows, cols, stride_r, stride_c)
    assert passed_through > 50


# -- quantize_int8: non-finite rows and K = 0 ----------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's Inf / Inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_quantize_int8_non_finite_rows_are_bit_exact(backend, dtype):
    """NaN rows: scale NaN; +-Inf rows: scale +Inf; q 0 throughout both; finite rows as usual."""
    x = torch.tensor([
        [1.0, NAN, 3.0, -2.0, 0.5],
        [1.0, INF, -3.0, 0.5, 0.0],
        [-INF, 2.0, 0.0, 1.0, 7.0],
        [INF, -INF, 1.0, 2.0, 3.0],
        [NAN, INF, -INF, 1.0, 1.0],
        [NAN, NAN, NAN, NAN, NAN],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [1.0, -2.0, 3.0, -4.0, 127.0],
    ]).to(dtype)
    q, scale = ops.quantize_int8(x)
    q_ref, scale_ref = int8_ref.quantize_int8(x)
    assert _same(q, q_ref) is None and _same(scale, scale_ref) is None
    assert torch.equal(scale[:6].isnan(), torch.tensor([True, False, False, False, True, True]))
    assert torch.equal(scale[1:4], torch.full((3,), INF)) and scale[6] == 0
    assert not q[:7].any()
    assert torch.equal(q[7], torch.tensor([1, -2, 3, -4, 127], dtype=torch.int8))


def test_quantize_int8_k_zero(backend):
    q, scale = ops.quantize_int8(torch.empty(3, 0))
    assert q.shape == (3, 0) and q.dtype == torch.int8
    assert torch.equal(scale, torch.zeros(3))


# -- rules every op shares: kernelhub.validation ---------------------------------------------------

def test_out_that_overlaps_itself_is_refused():
    a, b = torch.ones(4, 3, dtype=torch.int8), torch.ones(3, 5, dtype=torch.int8)
    for out in (torch.empty(1, 5, dtype=torch.int32).expand(4, 5),
                torch.empty(8, dtype=torch.int32).as_strided((4, 5), (1, 1))):
        with pytest.raises(ValueError, match=r"out: elements share memory \(strides"):
            ops.int8_gemm(a, b, out=out)


def _reconstruct_inputs():
    _, normal, _, below, _ = _draws(10)
    return dict(a=normal(1, 6, 4), basis=normal(1, 4, 8), positions=below(6)(1, 2, 3),
                cos=normal(6, 4), sin=normal(6, 4))


def test_out_that_aliases_an_input_is_refused_on_every_op(monkeypatch):
    """One rule for every op that takes out=: a ValueError naming out and the input (here the
    Triton path, where reconstruct_keys(out=a) used to compute garbage)."""
    monkeypatch.setenv("KERNELHUB_BACKEND", "triton")
    buf = torch.zeros(64, dtype=torch.int8)
    with pytest.raises(ValueError, match="out: overlaps b in memory"):
        ops.int8_gemm(torch.ones(2, 3, dtype=torch.int8), buf[:12].view(3, 4),
                      out=buf[:32].view(torch.int32).view(2, 4))
    scales = torch.ones(16)
    with pytest.raises(ValueError, match="out: overlaps scale_b in memory"):
        ops.int8_scaled_gemm(torch.ones(2, 3, dtype=torch.int8), torch.ones(3, 4, dtype=torch.int8), scales[:2],
                             scales[4:8], out_dtype=torch.float32, out=scales[6:14].view(2, 4))
    inputs = _reconstruct_inputs()
    a = inputs["a"]
    with pytest.raises(ValueError, match="out: overlaps a in memory"):
        ops.reconstruct_keys(**inputs, out=a.view(-1)[:24].view(1, 2, 3, 4))
    q, landmarks = torch.randn(1, 2, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="out: overlaps q in memory"):
        ops.landmark_topk(q, landmarks, 2, out=q.view(-1)[:8].view(torch.int64).view(1, 2, 2))
    values = torch.zeros(1, 1, 4, 2, 2)
    with pytest.raises(ValueError, match="out: overlaps values in memory"):
        ops.sparse_gather(values, torch.zeros(1, 1, 2, dtype=torch.int64), out=values.view(-1)[:8].view(1, 1, 4, 2))


def test_reconstruct_keys_into_a_separate_out_still_works(backend):
    inputs = _reconstruct_inputs()
    out = poison_(torch.empty(1, 2, 3, 4))
    assert _same(ops.reconstruct_keys(**inputs, out=out), ops.reconstruct_keys(**inputs)) is None


def test_tensor_parallel_out_overlap_is_refused_on_every_rank(two_ranks):
    errors = two_ranks.run(tp_overlap_cases.out_overlaps_a)
    assert errors == ["ValueError: out: overlaps a in memory; the op would overwrite a while reading it: "
                      "pass a separate out"] * 2


def _grad_cases() -> dict:
    """op name -> (op, keyword arguments, the float argument made to require grad)."""
    k = torch.randn(1, 2, 6, 4)
    values, idx = torch.randn(1, 1, 4, 2, 2), torch.zeros(1, 1, 2, dtype=torch.int64)
    int8 = dict(a=torch.ones(2, 3, dtype=torch.int8), b=torch.ones(3, 4, dtype=torch.int8))  # never require grad
    return {
        "int8_scaled_gemm": (ops.int8_scaled_gemm, int8 | dict(scale_a=torch.ones(2), scale_b=torch.ones(4)),
                             "scale_a"),
        "quantize_int8": (ops.quantize_int8, dict(x=torch.randn(2, 3)), "x"),
        "lowrank_keys": (ops.lowrank_keys, dict(k=k, rank=2), "k"),
        "reconstruct_keys": (ops.reconstruct_keys, _reconstruct_inputs(), "basis"),
        "landmarks": (ops.landmarks, dict(k_rope=k, chunk_size=2), "k_rope"),
        "outlier_chunks": (ops.outlier_chunks, dict(k_rope=k, landmarks=ops.landmarks(k, 2), n=1, chunk_size=2),
                           "landmarks"),
        "landmark_topk": (ops.landmark_topk, dict(q=torch.randn(1, 2, 4), landmarks=torch.randn(1, 2, 3, 4), k=1),
                          "q"),
        "sparse_gather": (ops.sparse_gather, dict(values=values, chunk_idx=idx), "values"),
        "sparse_gather-resident": (ops.sparse_gather, dict(values=values, chunk_idx=idx, resident_idx=idx,
                                                           resident=torch.randn(1, 1, 4, 2)), "resident"),
        "int8_scaled_gemm-out": (ops.int8_scaled_gemm, int8 | dict(scale_a=torch.ones(2), scale_b=torch.ones(4),
                                                                   out_dtype=torch.float32, out=torch.empty(2, 4)),
                                 "out"),
    }


@pytest.mark.parametrize("case", list(_grad_cases()))
def test_requires_grad_is_refused_with_grad_on_and_read_under_no_grad(backend, case):
    """The ops have no backward: with grad mode on, an argument that requires grad is a TypeError
    naming it; under no_grad / inference_mode (how inference runs) it is read like any tensor."""
    op, kwargs, name = _grad_cases()[case]
    kwargs = kwargs | {name: kwargs[name].clone().requires_grad_()}
    with pytest.raises(TypeError, match=rf"{name}: requires grad, but kernelhub ops have no backward: "
                                        r"call under torch.no_grad\(\)"):
        op(**kwargs)
    with torch.no_grad():
        op(**kwargs)
    with torch.inference_mode():
        op(**kwargs)


def test_tensor_parallel_requires_grad(two_ranks):
    assert two_ranks.run(tp_overlap_cases.requires_grad_then_no_grad) == [True, True]


def test_landmark_topk_zero_head_dim_is_a_named_error(backend):
    with pytest.raises(ValueError, match=r"q: head dimension D = q.shape\[2\] = 0"):
        ops.landmark_topk(torch.empty(1, 2, 0), torch.empty(1, 2, 3, 0), 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
def test_cuda_device_without_cuda_is_a_named_error():
    values, idx = torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 1, dtype=torch.int64)
    for device in ("cuda:0", torch.device("cuda", 1), "cuda"):
        with pytest.raises(ValueError, match=r"device: cuda(:\d)? requested, but CUDA is not available"):
            ops.sparse_gather(values, idx, device=device)


# -- lowrank_keys: non-finite and huge keys -------------------------------------------------------

@pytest.mark.parametrize("gram", ["float32", "int8"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_lowrank_keys_refuses_non_finite_keys(backend, bad, gram):
    k = torch.randn(1, 2, 9, 4)  # S > H_kv * D: either method runs
    k[0, 1, 3, 2] = bad
    with pytest.raises(ValueError, match="k: holds NaN or Inf"):
        ops.lowrank_keys(k, 2, gram=gram)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's first Gram
@pytest.mark.parametrize("gram", ["float32", "int8"])
@pytest.mark.parametrize("magnitude", [1e19, 1e30, 1e36])
def test_lowrank_keys_of_huge_finite_keys(backend, magnitude, gram):
    """The float32 Gram of such keys overflows; the factorisation is that of the keys scaled to
    O(1) (eigenvectors do not change with scale), so a @ basis reconstructs k as well as there.
    The int8 method's Gram is that of the quantised keys divided by the largest scale squared."""
    unit = torch.randn(2, 2, 9, 4, generator=torch.Generator().manual_seed(11))  # S > H_kv * D: either method runs
    a, basis = ops.lowrank_keys(unit * magnitude, 3, gram=gram)
    a_unit, basis_unit = ops.lowrank_keys(unit, 3, gram=gram)
    assert torch.isfinite(a).all() and torch.isfinite(basis).all()
    rebuilt = (a.double() @ basis.double()) / magnitude
    expected = a_unit.double() @ basis_unit.double()
    torch.testing.assert_close(rebuilt, expected, rtol=1e-4, atol=1e-4)
    merged = lowrank_ref.merge_heads(unit).double()
    assert (rebuilt - merged).norm() < merged.norm()  # a rank-3 approximation, not noise
