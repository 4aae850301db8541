"""The sparse gather family (ShadowKV's value fetch) against `reference/sparse_gather.py`, beyond
the contract suite (tests/test_contract.py runs every DEFAULT at the smoke shapes).

Every backend (the CPU path, the Triton kernel in the interpreter, the reference) must reproduce the
reference bit for bit: a gather is a copy. Outputs are poisoned with NaN before each call, so a row
a kernel forgets to write fails. The reuse of the previous step's chunks (`resident`) must not
change the result; a deliberately stale resident set shows that the kernel really reads its hits
from there.
"""

import pytest
import torch

from helpers import H100_SMEM_BYTES, SMALLEST_SMEM_BYTES, backend, dtype_id  # noqa: F401
from kernelhub.checking import check_config, mismatch_exact, poison_
from kernelhub.kernels.sparse_gather import ops as sg_ops
from kernelhub.kernels.sparse_gather import space
from kernelhub.kernels.sparse_gather.kernel import resident_slots, sparse_gather_triton
from kernelhub.kernels.sparse_gather.ops import sparse_gather
from kernelhub.kernels.sparse_gather.spec import RESIDENT_OVERLAP, SPEC, make_inputs
from kernelhub.reference import sparse_gather as ref


def shape_id(shape) -> str:
    return "B{}-H{}-C{}-T{}-D{}-k{}".format(*shape)


def config_id(config) -> str:
    return f"chunks{config['BLOCK_CHUNKS']}-w{config['num_warps']}"


def assert_exact(actual, expected):
    problem = mismatch_exact(actual, expected)
    assert problem is None, problem


def random_values(shape, dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    batch, heads, num_chunks, chunk, d, _ = shape
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, num_chunks, chunk, d, generator=gen).to(dtype)


def random_selection(shape, seed=0, distinct=True) -> torch.Tensor:
    """`chunk_idx [B, H_kv, k]`: distinct chunks in random order, or uniform with repeats."""
    batch, heads, num_chunks, _, _, k = shape
    gen = torch.Generator().manual_seed(seed + 1)
    if distinct:
        return torch.rand(batch, heads, num_chunks, generator=gen).argsort(dim=-1)[..., :k]
    return torch.randint(0, num_chunks, (batch, heads, k), generator=gen)


def resident_with_overlap(values, chunk_idx, overlap: float, seed=0, extra_slots=0):
    """A previous step's gather sharing `overlap` of `chunk_idx`'s chunks (per head), the other
    slots holding chunks not selected now (-1 when there are none left), shuffled."""
    batch, heads, num_chunks = values.shape[:3]
    k = chunk_idx.shape[-1]
    gen = torch.Generator().manual_seed(seed + 2)
    n_hits = round(overlap * k)
    rows = []
    for b in range(batch):
        for h in range(heads):
            chosen = chunk_idx[b, h].tolist()
            hits = [chosen[i] for i in torch.randperm(k, generator=gen)[:n_hits].tolist()]
            others = [c for c in torch.randperm(num_chunks, generator=gen).tolist() if c not in chosen]
            slots = hits + others[:k - n_hits + extra_slots]
            slots += [-1] * (k + extra_slots - len(slots))
            rows.append([slots[i] for i in torch.randperm(len(slots), generator=gen).tolist()])
    resident_idx = torch.tensor(rows, dtype=torch.int64).view(batch, heads, k + extra_slots)
    resident = ref.sparse_gather(values, resident_idx.clamp(min=0))
    return resident_idx, resident


def new_out(values, k) -> torch.Tensor:
    batch, heads, _, chunk, d = values.shape
    return poison_(torch.empty(batch, heads, k * chunk, d, dtype=values.dtype))


def gather_into_poisoned(values, chunk_idx, **kwargs) -> torch.Tensor:
    out = new_out(values, chunk_idx.shape[-1])
    result = sparse_gather(values, chunk_idx, out=out, **kwargs)
    assert result is out
    return out


# --- the public op, every backend ---------------------------------------------------------------

SMOKE = SPEC.shapes("smoke")


@pytest.mark.parametrize("with_resident", [False, True], ids=["fresh", "resident60"])
@pytest.mark.parametrize("shape", SMOKE, ids=shape_id)
def test_op_matches_reference(backend, shape, with_resident):
    values, chunk_idx = random_values(shape, seed=3), random_selection(shape, seed=3)
    kwargs = {}
    if with_resident:
        kwargs["resident_idx"], kwargs["resident"] = resident_with_overlap(values, chunk_idx, 0.6, seed=3)
    expected = ref.sparse_gather(values, chunk_idx)
    assert_exact(gather_into_poisoned(values, chunk_idx, **kwargs), expected)
    assert_exact(sparse_gather(values, chunk_idx, **kwargs), expected)  # allocating path


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=dtype_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=dtype_id)
def test_op_every_dtype(backend, dtype, index_dtype):
    shape = (2, 3, 19, 8, 72, 5)
    values = random_values(shape, dtype, seed=4)
    chunk_idx = random_selection(shape, seed=4).to(index_dtype)
    resident_idx, resident = resident_with_overlap(values, chunk_idx, 0.6, seed=4)
    out = gather_into_poisoned(values, chunk_idx, resident_idx=resident_idx.to(index_dtype), resident=resident)
    assert_exact(out, ref.sparse_gather(values, chunk_idx))


@pytest.mark.parametrize("overlap", [0.0, 0.6, 1.0], ids=["overlap0", "overlap60", "overlap100"])
@pytest.mark.parametrize("extra_slots", [0, 3], ids=["k_prev=k", "k_prev=k+3"])
def test_resident_overlap_does_not_change_the_result(backend, overlap, extra_slots):
    shape = (2, 8, 29, 8, 72, 7)
    values, chunk_idx = random_values(shape, seed=5), random_selection(shape, seed=5)
    resident_idx, resident = resident_with_overlap(values, chunk_idx, overlap, seed=5, extra_slots=extra_slots)
    hits = resident_slots(chunk_idx, resident_idx, shape[2]) >= 0
    assert int(hits.sum()) == round(overlap * shape[5]) * shape[0] * shape[1]  # the overlap we asked for
    without = gather_into_poisoned(values, chunk_idx)
    with_resident = gather_into_poisoned(values, chunk_idx, resident_idx=resident_idx, resident=resident)
    assert_exact(without, ref.sparse_gather(values, chunk_idx))
    assert_exact(with_resident, without)


def test_kernel_reads_hits_from_resident(monkeypatch):
    """With a resident set that disagrees with `values`, the Triton path must show the resident's
    numbers exactly at the hits: proof that the hits are not fetched again."""
    monkeypatch.setenv("KERNELHUB_BACKEND", "triton")
    shape = (2, 4, 23, 8, 64, 9)
    values, chunk_idx = random_values(shape, seed=6), random_selection(shape, seed=6)
    resident_idx, resident = resident_with_overlap(values, chunk_idx, 0.6, seed=6)
    stale = resident + 1000.0
    out = gather_into_poisoned(values, chunk_idx, resident_idx=resident_idx, resident=stale)
    assert_exact(out, ref.sparse_gather_with_resident(values, chunk_idx, resident_idx, stale))
    assert mismatch_exact(out, ref.sparse_gather(values, chunk_idx)) is not None


def test_repeated_unsorted_indices_and_k_beyond_c(backend):
    shape = (2, 3, 6, 8, 72, 15)  # k > C: repeats are unavoidable
    values = random_values(shape, seed=7)
    chunk_idx = random_selection(shape, seed=7, distinct=False)
    chunk_idx[0, 0] = torch.tensor([5, 5, 0, 5, 3, 0, 1, 2, 4, 5, 0, 0, 3, 2, 1])
    resident_idx = torch.tensor([5, 5, -1, 3, 3]).expand(2, 3, 5).clone()  # repeated slots, an empty one
    resident = ref.sparse_gather(values, resident_idx.clamp(min=0))
    expected = ref.sparse_gather(values, chunk_idx)
    assert_exact(gather_into_poisoned(values, chunk_idx), expected)
    assert_exact(gather_into_poisoned(values, chunk_idx, resident_idx=resident_idx, resident=resident), expected)


@pytest.mark.parametrize("layout", ["head_major_view", "sliced_d", "strided_chunks"])
def test_values_and_out_as_strided_views(backend, layout):
    shape = batch, heads, num_chunks, chunk, d, k = (2, 3, 11, 8, 40, 6)
    base = random_values(shape, seed=8)
    if layout == "head_major_view":  # stored [B, C, H_kv, chunk, D], viewed as [B, H_kv, C, chunk, D]
        values = base.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    elif layout == "sliced_d":  # the first D of a wider head dimension
        values = torch.cat([base, torch.zeros(batch, heads, num_chunks, chunk, 24, dtype=base.dtype)], dim=-1)[..., :d]
    else:  # every other chunk of a twice larger cache
        values = base.repeat_interleave(2, dim=2)[:, :, ::2]
    assert not values.is_contiguous() and torch.equal(values, base)
    chunk_idx = random_selection(shape, seed=8).transpose(0, 1).contiguous().transpose(0, 1)  # strided too
    resident_idx, resident = resident_with_overlap(base, chunk_idx, 0.6, seed=8)
    buffer = poison_(torch.empty(batch, heads, k * chunk, d + 5, dtype=base.dtype))
    out = buffer[..., 2:d + 2]  # row stride D + 5, surrounded by poison
    result = sparse_gather(values, chunk_idx, out=out, resident_idx=resident_idx, resident=resident)
    assert result is out
    assert_exact(out, ref.sparse_gather(base, chunk_idx))
    assert bool(buffer[..., :2].isnan().all() and buffer[..., d + 2:].isnan().all()), "wrote outside `out`"


@pytest.mark.parametrize("shape", [(2, 3, 5, 8, 16, 0), (0, 3, 5, 8, 16, 4), (1, 2, 5, 8, 0, 3)],
                         ids=shape_id)
def test_empty_output(backend, shape):
    values, chunk_idx = random_values(shape), random_selection(shape)
    out = sparse_gather(values, chunk_idx)
    assert out.shape == (shape[0], shape[1], shape[5] * shape[3], shape[4])


def test_output_device_follows_out_then_device_then_chunk_idx():
    shape = (1, 2, 5, 8, 16, 3)
    values, chunk_idx = random_values(shape), random_selection(shape)
    assert sparse_gather(values, chunk_idx, device="cpu").device == torch.device("cpu")
    # Nothing is computed on the meta device here: the checks refuse it by naming the rule.
    with pytest.raises(ValueError, match="values is on cpu but the output is on meta"):
        sparse_gather(values, chunk_idx, device="meta")
    with pytest.raises(ValueError, match="values is on cpu but the output is on meta"):
        sparse_gather(values, chunk_idx.to("meta"))
    with pytest.raises(ValueError, match="device: cpu differs from out's device meta"):
        sparse_gather(values, chunk_idx, out=torch.empty(1, 2, 24, 16, dtype=values.dtype, device="meta"),
                      device="cpu")


# --- the launcher: sampled configs --------------------------------------------------------------------

# Chunks longer than MAX_BLOCK_T and heads wider than MAX_BLOCK_D: the token and column loops.
LOOP_SHAPE = (1, 2, 6, 40, 300, 4)
SAMPLED_SHAPES = [(2, 3, 37, 8, 72, 21), (1, 2, 19, 5, 64, 19)]
SAMPLED_CASES = [(shape, config) for i, shape in enumerate(SAMPLED_SHAPES)
                 for config in space.SPACE.sample(4, shape, smem_bytes=H100_SMEM_BYTES, seed=20 + i)]
SAMPLED_CASES += [(LOOP_SHAPE, space.default_config(LOOP_SHAPE, "float32")),
                  (LOOP_SHAPE, space.DEFAULT_ONE_CHUNK | {"num_warps": 8})]


def test_sampled_configs_cover_several_chunks_per_program():
    """Guards the sample below: it must keep exercising multi-chunk tiles with a partial last block."""
    assert any(c["BLOCK_CHUNKS"] > 1 and s[5] % c["BLOCK_CHUNKS"] for s, c in SAMPLED_CASES)
    assert space.block_t(LOOP_SHAPE[3]) < LOOP_SHAPE[3] and space.block_d(LOOP_SHAPE[4]) < LOOP_SHAPE[4]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape, config", SAMPLED_CASES,
                         ids=[shape_id(s) + "-" + config_id(c) for s, c in SAMPLED_CASES])
def test_sampled_configs_through_the_launcher(shape, config, dtype):
    assert space.SPACE.infeasibility(config, shape, H100_SMEM_BYTES) is None
    outcome = check_config(SPEC, shape, dtype, config, device="cpu", seed=10)
    assert outcome.ok, outcome.problem


def test_kernel_writes_nan_rows_for_out_of_range_indices():
    """The launcher itself (used unchecked on the GPU) never reads outside `values`."""
    shape = (2, 3, 10, 8, 16, 4)
    values, chunk_idx = random_values(shape, torch.float32), random_selection(shape)
    chunk_idx[0, 1, 2], chunk_idx[1, 0, 0] = 10, -1
    resident_idx, resident = chunk_idx.clone(), torch.zeros(2, 3, 32, 16)  # bad indices must not hit either
    for kwargs in ({}, {"resident_idx": resident_idx, "resident": resident}):
        out = torch.zeros(2, 3, 32, 16)  # not NaN-poisoned: the NaNs must come from the kernel
        sparse_gather_triton(values, chunk_idx, config=space.DEFAULT, out=out, **kwargs)
        rows = out.isnan().all(dim=-1)  # [B, H_kv, k*chunk]
        assert bool(rows[0, 1, 16:24].all() and rows[1, 0, 0:8].all()) and int(rows.sum()) == 16


# --- the hit map ------------------------------------------------------------------------------------

def test_resident_slots_finds_each_hit():
    chunk_idx = torch.tensor([[[4, 0, 7, 2, 9, -1, 12]]])
    resident_idx = torch.tensor([[[7, -1, 4, 4, 1, 9, 12]]])  # 4 twice, an empty slot, 12 is out of range
    slots = resident_slots(chunk_idx, resident_idx, num_chunks=10)
    assert slots.dtype == torch.int32
    assert slots[0, 0, [1, 3, 5, 6]].tolist() == [-1, -1, -1, -1]  # misses, -1 and 12 never hit
    assert slots[0, 0, 0].item() in (2, 3) and slots[0, 0, 2].item() == 0 and slots[0, 0, 4].item() == 5
    assert resident_slots(chunk_idx, resident_idx[..., :0], num_chunks=10).eq(-1).all()


def test_resident_slots_per_head():
    chunk_idx = torch.tensor([[[1, 2], [1, 2]], [[3, 4], [5, 6]]])
    resident_idx = torch.tensor([[[2, 0], [9, 9]], [[4, 3], [6, 0]]])
    assert resident_slots(chunk_idx, resident_idx, 10).tolist() == [[[-1, 0], [-1, -1]], [[1, 0], [-1, 0]]]


# --- bad input ----------------------------------------------------------------------------------------

def _good():
    shape = (2, 3, 10, 8, 16, 4)
    values, chunk_idx = random_values(shape), random_selection(shape)
    resident_idx, resident = resident_with_overlap(values, chunk_idx, 0.5)
    return dict(values=values, chunk_idx=chunk_idx, resident_idx=resident_idx, resident=resident,
                out=new_out(values, 4))


def _out_of_range(high: bool):
    idx = random_selection((2, 3, 10, 8, 16, 4))
    idx[1, 2, 3] = 10 if high else -1
    return idx


_SHARED = torch.empty(2, 3, 48, 16, dtype=torch.bfloat16)  # out and resident views of one buffer

BAD_INPUTS = [
    ("values_rank", dict(values=torch.zeros(2, 3, 10, 128, dtype=torch.bfloat16)), ValueError,
     r"values: expected a 5-D tensor"),
    ("values_int", dict(values=torch.zeros(2, 3, 10, 8, 16, dtype=torch.int16)), TypeError,
     r"values: expected dtype float16 or bfloat16 or float32 or float64, got int16"),
    ("values_not_tensor", dict(values=[[1.0]]), TypeError, r"values: expected a torch.Tensor"),
    ("idx_rank", dict(chunk_idx=torch.zeros(2, 12, dtype=torch.int64)), ValueError,
     r"chunk_idx: expected a 3-D tensor"),
    ("idx_float", dict(chunk_idx=torch.zeros(2, 3, 4)), TypeError,
     r"chunk_idx: expected dtype int64 or int32, got float32"),
    ("idx_too_high", dict(chunk_idx=_out_of_range(high=True)), ValueError,
     r"chunk_idx: indices must lie in \[0, C\) = \[0, 10\); chunk_idx\[1, 2, 3\] = 10"),
    ("idx_negative", dict(chunk_idx=_out_of_range(high=False)), ValueError, r"chunk_idx\[1, 2, 3\] = -1"),
    ("idx_batch", dict(chunk_idx=torch.zeros(1, 3, 4, dtype=torch.int64)), ValueError,
     r"chunk_idx: expected shape \[B, H_kv, k\] = \(2, 3, 4\), got \(1, 3, 4\)"),
    ("idx_heads", dict(chunk_idx=torch.zeros(2, 8, 4, dtype=torch.int64)), ValueError,
     r"chunk_idx: expected shape \[B, H_kv, k\] = \(2, 3, 4\)"),
    ("resident_alone", dict(resident_idx=None), ValueError, r"resident_idx and resident go together"),
    ("resident_idx_float", dict(resident_idx=torch.zeros(2, 3, 4)), TypeError, r"resident_idx: expected dtype int64"),
    ("resident_idx_heads", dict(resident_idx=torch.zeros(2, 1, 4, dtype=torch.int64)), ValueError,
     r"resident_idx: expected shape \[B, H_kv, k_prev\] = \(2, 3, 4\)"),
    ("resident_rows", dict(resident=torch.zeros(2, 3, 24, 16, dtype=torch.bfloat16)), ValueError,
     r"resident: expected shape \[B, H_kv, k_prev\*chunk, D\] = \(2, 3, 32, 16\), got \(2, 3, 24, 16\)"),
    ("resident_d", dict(resident=torch.zeros(2, 3, 32, 8, dtype=torch.bfloat16)), ValueError,
     r"resident: expected shape"),
    ("resident_rank", dict(resident=torch.zeros(2, 3, 4, 8, 16, dtype=torch.bfloat16)), ValueError,
     r"resident: expected a 4-D tensor"),
    ("resident_dtype", dict(resident=torch.zeros(2, 3, 32, 16)), TypeError,
     r"resident: expected dtype bfloat16 \(that of values\), got float32"),
    ("out_shape", dict(out=torch.empty(2, 3, 24, 16, dtype=torch.bfloat16)), ValueError,
     r"out: expected shape \(2, 3, 32, 16\), dtype bfloat16"),
    ("out_dtype", dict(out=torch.empty(2, 3, 32, 16)), ValueError,
     r"out: expected .* dtype bfloat16, device cpu; got .* float32"),
    ("out_is_resident", dict(out=_SHARED[:, :, :32], resident=_SHARED[:, :, :32]), ValueError,
     r"out: overlaps resident in memory: the previous step's output becomes this step's resident"),
    ("out_overlaps_resident", dict(out=_SHARED[:, :, :32], resident=_SHARED[:, :, 16:]), ValueError,
     r"out: overlaps resident"),
    ("device_type", dict(device=3.5), TypeError, r"device: expected a torch.device"),
    *([("device_cuda_without_gpu", dict(out=None, device="cuda"), ValueError, r"device: cuda requested, but CUDA")]
      if not torch.cuda.is_available() else []),
]


@pytest.mark.parametrize("change, error, fragment", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_names_the_argument_before_anything_runs(monkeypatch, change, error, fragment):
    monkeypatch.setenv("KERNELHUB_BACKEND", "triton")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a kernel ran before the arguments were checked")

    monkeypatch.setattr(sg_ops, "sparse_gather_triton", must_not_run)
    kwargs = _good() | change
    with pytest.raises(error, match=fragment):
        sparse_gather(**kwargs)


def test_out_overlapping_values_is_rejected():
    kwargs = _good()
    values = torch.zeros(2, 3, 4, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="out: overlaps values"):
        sparse_gather(values, kwargs["chunk_idx"] % 4, out=values.view(2, 3, 32, 16))


# --- space, shapes --------------------------------------------------------------------------------------

def test_smoke_shapes_are_odd():
    shapes = SPEC.shapes("smoke")
    assert all(c & (c - 1) for _, _, c, _, _, _ in shapes), "C must not be a power of two"
    assert {1, 7} <= {k for *_, k in shapes} and any(s[5] == s[2] for s in shapes)
    assert {64, 128, 72} <= {s[4] for s in shapes} and {1, 8} <= {s[1] for s in shapes}


@pytest.mark.parametrize("shape", [(1, 8, 4096, 8, 128, 256), (2, 8, 13, 8, 128, 7)], ids=shape_id)
def test_make_inputs_resident_set(shape):
    """60% of the selected chunks are resident, and the resident set holds what its indices name."""
    batch, heads, num_chunks, chunk, d, k = shape
    inputs = make_inputs(shape, "bfloat16", "cpu", seed=1)
    values, resident_idx = inputs["values"], inputs["resident_idx"]
    slots = resident_slots(inputs["chunk_idx"], resident_idx, num_chunks)
    assert int((slots >= 0).sum()) == round(RESIDENT_OVERLAP * k) * batch * heads
    filled = resident_idx >= 0
    held = inputs["resident"].view(batch, heads, k, chunk, d)[filled]
    named = ref.sparse_gather(values, resident_idx.clamp(min=0)).view(batch, heads, k, chunk, d)
    assert torch.equal(held, named[filled])
    assert make_inputs(shape, "bfloat16", "cpu", seed=1)["chunk_idx"].equal(inputs["chunk_idx"])


EXTREME_SHAPES = [(1, 1, 1, 1, 1, 1), (1, 1, 3, 1024, 4096, 2), (4, 8, 100, 64, 512, 5000)]


@pytest.mark.parametrize("shape", EXTREME_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", space.DTYPES)
def test_default_is_feasible_for_any_shape(shape, dtype):
    """Beyond the shape sets (the contract suite's): a one-element chunk, huge chunks and heads, k > C."""
    config = space.default_config(shape, dtype)
    assert space.SPACE.validate(config) == config and config in space.DEFAULTS
    assert space.SPACE.infeasibility(config, shape, SMALLEST_SMEM_BYTES) is None


def test_constraints_reject_what_a_gpu_cannot_run():
    shape = (1, 8, 4096, 8, 128, 256)
    huge = {"BLOCK_CHUNKS": 32, "num_warps": 1}
    assert "per thread" in space.SPACE.infeasibility(huge, shape, H100_SMEM_BYTES)
    assert "exceeds the padded number of chunks" in space.SPACE.infeasibility(
        {"BLOCK_CHUNKS": 16, "num_warps": 8}, (1, 8, 4096, 8, 128, 7), H100_SMEM_BYTES)
    # 8 x 128 chunks: BLOCK_CHUNKS <= 2 * num_warps keeps 64 elements per thread.
    assert len(space.SPACE.feasible(shape, H100_SMEM_BYTES)) == 2 + 3 + 4 + 5


def test_buckets_and_distance():
    assert space.bucket((8, 8, 16384, 8, 128, 256)) == (8, 8, 16384, 8, 128, 256)
    assert space.bucket((8, 8, 12000, 8, 128, 200)) == (8, 8, 16384, 8, 128, 256)
    here = (1, 8, 4096, 8, 128, 256)
    assert space.bucket_distance(here, (8, 8, 4096, 8, 128, 256)) is None  # another batch
    assert space.bucket_distance(here, (1, 8, 4096, 8, 64, 256)) is None  # another head dimension
    assert space.bucket_distance(here, (1, 8, 4096, 8, 128, 2048)) is None  # k three doublings away
    other_c = space.bucket_distance(here, (1, 8, 16384, 8, 128, 256))
    other_k = space.bucket_distance(here, (1, 8, 4096, 8, 128, 128))
    assert 0 < other_c < other_k  # C matters less than k
    assert space.bucket_distance(here, (1, 8, 4096, 8, 128, 512)) < other_k  # ties go to the larger k


def test_bytes_moved_counts_payload_twice():
    shape = (1, 8, 4096, 8, 128, 256)
    payload = 8 * 256 * 8 * 128
    assert space.bytes_moved(shape, "bfloat16") == 2 * 2 * payload + 2 * 8 * 8 * 256
    assert space.bytes_moved(shape, "float32") == 2 * 4 * payload + 2 * 8 * 8 * 256
    assert space.flops(shape) == 0


# --- torch.compile ---------------------------------------------------------------------------------------

def test_compile_fullgraph_traces_the_op():
    def step(values, chunk_idx, resident_idx, resident):
        return sparse_gather(values, chunk_idx, resident_idx=resident_idx, resident=resident).float().sum(dim=-1)

    shape = (2, 3, 10, 8, 16, 4)
    values, chunk_idx = random_values(shape), random_selection(shape)
    resident_idx, resident = resident_with_overlap(values, chunk_idx, 0.5)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(values, chunk_idx, resident_idx, resident),
                       step(values, chunk_idx, resident_idx, resident))
