"""ShadowKV's low-rank key cache: the Gram, projection and reconstruction kernels against
`reference/lowrank_keys.py`, the public ops on every backend, their argument errors, the spaces;
beyond the contract suite (tests/test_contract.py runs every DEFAULT at the smoke shapes).

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Every launcher output
is poisoned before the launch, so an element a kernel forgets to write fails. Factorisations are
compared by what is unique about them (the reconstruction a @ basis, and its error against the
SVD optimum), on keys built with a known spectrum that has a gap at the rank.
"""

import pytest
import torch

from helpers import H100_SMEM_BYTES, dtype_id
from helpers import SMALLEST_SMEM_BYTES as SMEM_BYTES
from kernelhub.checking import poison_
from kernelhub.kernels.lowrank_keys import cpu as lowrank_cpu
from kernelhub.kernels.lowrank_keys import gram_space, ops, reconstruct_space
from kernelhub.kernels.lowrank_keys import spec as family
from kernelhub.kernels.lowrank_keys.kernel import gram_triton, project_triton, reconstruct_keys_triton
from kernelhub.reference import lowrank_keys as ref
from kernelhub.reference.rope import apply_rope, rope_rows, rope_tables

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_ok(problem):
    assert problem is None, problem


def keys_with_spectrum(batch, heads, seq, head_dim, rank, dtype, seed):
    """Pre-RoPE keys `[B, H_kv, S, D]` whose merged matrix has singular values falling from 10 to 3
    over the first `rank` and from 0.3 to 0.03 after: a gap of 10 at `rank`, so the best rank-`rank`
    approximation is unique and well conditioned. Scaled so that entries are O(1), like real keys."""
    gen = torch.Generator().manual_seed(seed)
    hd = heads * head_dim
    m = min(seq, hd)
    u = torch.linalg.qr(torch.randn(batch, seq, m, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(batch, hd, m, generator=gen, dtype=torch.float64))[0]
    head = 10.0 * torch.logspace(0, 1, rank, base=0.3, dtype=torch.float64)
    tail = 0.3 * torch.logspace(0, 1, m - rank, base=0.1, dtype=torch.float64)
    sigma = torch.cat([head, tail]) * (seq * hd) ** 0.5 / 10
    merged = (u * sigma) @ v.transpose(1, 2)  # [B, S, HD]
    return merged.reshape(batch, seq, heads, head_dim).transpose(1, 2).to(dtype)


# ================================================================================================
# Launchers: the Gram kernel
# ================================================================================================

def run_gram(k, config):
    batch, heads, _, head_dim = k.shape
    out = poison_(torch.empty(batch, heads * head_dim, heads * head_dim))
    assert gram_triton(k, config=config, out=out) is out
    return out


def gram_id(shape):
    return "B{}-H{}-S{}-D{}".format(*shape)


def gram_config_id(config):
    return f"hd{config['BLOCK_HD']}-s{config['BLOCK_S']}-split{config['SPLIT_S']}"


GRAM_SAMPLED = [(shape, config) for i, shape in enumerate([(2, 2, 63, 64), (1, 3, 129, 32)])
                for config in gram_space.SPACE.sample(4, shape, SMEM_BYTES, seed=20 + i)]


def test_gram_sample_covers_split_s():
    assert any(c["SPLIT_S"] > 1 for _, c in GRAM_SAMPLED)


@pytest.mark.parametrize("shape, config", GRAM_SAMPLED,
                         ids=[gram_id(s) + "-" + gram_config_id(c) for s, c in GRAM_SAMPLED])
def test_gram_sampled_configs_match_reference(shape, config):
    dtype = DTYPES[sum(config.values()) % 3]
    inputs = family.make_gram_inputs(shape, dtype_id(dtype), "cpu", seed=2)
    assert_ok(family.compare_gram(run_gram(inputs["k"], config), ref.gram(inputs["k"]), inputs))


def test_gram_is_exactly_symmetric_and_deterministic():
    """Upper tiles mirrored, split partials summed in a fixed order: the same bits every run."""
    k = family.make_gram_inputs((2, 2, 150, 64), "float32", "cpu", seed=3)["k"]
    config = {"BLOCK_HD": 32, "BLOCK_S": 16, "SPLIT_S": 4, "num_warps": 4, "num_stages": 2}
    g = run_gram(k, config)
    assert torch.equal(g, g.transpose(1, 2))
    assert torch.equal(g, run_gram(k, config))


@pytest.mark.parametrize("layout", ["cache_slice", "token_major"])
def test_gram_reads_any_strides(layout):
    """A slice of a longer cache (as ShadowKV factors only the candidate chunks), and keys stored
    token-major `[B, S, H_kv, D]` viewed as `[B, H_kv, S, D]`."""
    full = family.make_gram_inputs((2, 2, 100, 64), "float16", "cpu", seed=4)["k"]
    k = full[:, :, 5:76] if layout == "cache_slice" else full.transpose(1, 2).contiguous().transpose(1, 2)
    assert not k.is_contiguous()
    config = {"BLOCK_HD": 64, "BLOCK_S": 32, "SPLIT_S": 2, "num_warps": 4, "num_stages": 2}
    assert_ok(family.compare_gram(run_gram(k, config), ref.gram(k), {"k": k}))


def test_gram_tolerance_catches_a_dropped_token():
    """The tolerance is tight enough to see one of S = 129 tokens missing from the sum."""
    k = family.make_gram_inputs((1, 2, 129, 64), "float32", "cpu", seed=5)["k"]
    assert family.compare_gram(ref.gram(k[:, :, 1:]), ref.gram(k), {"k": k}) is not None


# ================================================================================================
# Launchers: the projection a = K @ basis^T
# ================================================================================================

PROJECT_CONFIGS = [gram_space.PROJECT_CONFIG,
                   {"BLOCK_S": 16, "BLOCK_R": 16, "BLOCK_C": 32, "num_warps": 2, "num_stages": 2},
                   {"BLOCK_S": 32, "BLOCK_R": 64, "BLOCK_C": 16, "num_warps": 4, "num_stages": 1}]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", PROJECT_CONFIGS, ids=["project_config", "s16-r16-c32", "s32-r64-c16"])
@pytest.mark.parametrize("shape, rank", [((1, 1, 7, 64), 5), ((2, 3, 129, 64), 24), ((1, 2, 70, 128), 160),
                                         ((2, 3, 33, 10), 7)],
                         ids=["B1-H1-S7-D64-r5", "B2-H3-S129-D64-r24", "B1-H2-S70-D128-r160",
                              "B2-H3-S33-D10-r7-partial-column-tile"])
def test_project_matches_float64_product(shape, rank, config, dtype):
    batch, heads, seq, head_dim = shape
    k = family.make_gram_inputs(shape, dtype_id(dtype), "cpu", seed=6)["k"][:, :, :seq]
    gen = torch.Generator().manual_seed(7)
    basis = torch.randn(batch, rank, heads * head_dim, generator=gen).to(dtype)
    out = poison_(torch.empty(batch, seq, rank, dtype=dtype))
    assert project_triton(k, basis, config=config, out=out) is out
    exact = ref.merge_heads(k).double() @ basis.double().transpose(1, 2)
    bound = ref.merge_heads(k).double().abs() @ basis.double().abs().transpose(1, 2)
    err = (out.double() - exact).abs()
    # float32 accumulation over H_kv * D terms, then one rounding to dtype
    allowed = 2 * torch.finfo(dtype).eps * exact.abs() + 2 * heads * head_dim * 2.0**-24 * bound
    assert bool((err <= allowed).all()), f"max error {float(err.max())}"


# ================================================================================================
# Launchers: the fused reconstruction
# ================================================================================================

def reconstruct_id(shape):
    return "B{}-S{}-H{}-n{}-D{}-r{}".format(*shape)


def reconstruct_config_id(config):
    return f"n{config['BLOCK_N']}-r{config['BLOCK_R']}-w{config['num_warps']}-s{config['num_stages']}"


def run_reconstruct(inputs, config):
    out = poison_(family.new_reconstruct_output(inputs))
    result = reconstruct_keys_triton(inputs["a"], inputs["basis"], inputs["positions"], inputs["cos"],
                                     inputs["sin"], config=config, out=out, rope_positions=inputs.get("rope_positions"))
    assert result is out
    return out


def check_reconstruct(inputs, config):
    actual = run_reconstruct(inputs, config)
    assert_ok(family.compare_reconstruct(actual, family.reconstruct_reference(inputs), inputs))


RECONSTRUCT_SAMPLED = [(shape, config)
                       for i, shape in enumerate([(2, 100, 2, 33, 64, 40), (1, 150, 1, 70, 128, 160)])
                       for config in reconstruct_space.SPACE.sample(4, shape, SMEM_BYTES, seed=30 + i)]


@pytest.mark.parametrize("shape, config", RECONSTRUCT_SAMPLED,
                         ids=[reconstruct_id(s) + "-" + reconstruct_config_id(c) for s, c in RECONSTRUCT_SAMPLED])
def test_reconstruct_sampled_configs_match_reference(shape, config):
    dtype = DTYPES[sum(config.values()) % 3]
    check_reconstruct(family.make_reconstruct_inputs(shape, dtype_id(dtype), "cpu", seed=9), config)


def edge_positions(batch, heads, n, seq, dtype, seed):
    """Unsorted, with repeats, and containing 0 and S - 1 in every head."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, seq, (batch, heads, n), generator=gen)
    positions[..., 0] = seq - 1
    positions[..., 1] = 0
    positions[..., 2] = seq - 1
    positions[..., 3] = positions[..., 4]
    return positions.to(dtype)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=dtype_id)
@pytest.mark.parametrize("head_dim", [16, 64, 128], ids=lambda d: f"D{d}")
def test_reconstruct_positions_unsorted_repeated_at_both_ends(head_dim, index_dtype):
    """D = 16: each RoPE half (8 columns) is padded to the 16 a tl.dot needs, and masked."""
    shape = (2, 77, 2, 21, head_dim, 24)
    inputs = family.make_reconstruct_inputs(shape, "float32", "cpu", seed=10)
    inputs["positions"] = edge_positions(2, 2, 21, 77, index_dtype, seed=11)
    check_reconstruct(inputs, {"BLOCK_N": 16, "BLOCK_R": 16, "num_warps": 4, "num_stages": 2})


def chosen_rows(positions, head_dim):
    """RoPE rows of just the chosen tokens, and where each token's row is (as ShadowKVCache does)."""
    cos, sin = rope_rows(positions.flatten(), head_dim)
    return cos, sin, torch.arange(positions.numel()).view(positions.shape)


def test_reconstruct_with_rope_rows_of_the_chosen_tokens():
    """rope_positions index tables of the chosen tokens' rows only (fewer rows than S here)."""
    inputs = family.make_reconstruct_inputs((2, 300, 2, 9, 64, 24), "bfloat16", "cpu", seed=20)
    whole = run_reconstruct(inputs, reconstruct_space.DEFAULT_SMALL)
    cos, sin, rows = chosen_rows(inputs["positions"], 64)
    assert cos.shape[0] < 300
    chosen = dict(inputs, cos=cos, sin=sin, rope_positions=rows.to(torch.int32))
    actual = run_reconstruct(chosen, reconstruct_space.DEFAULT_SMALL)
    assert_ok(family.compare_reconstruct(actual, family.reconstruct_reference(chosen), chosen))
    assert torch.equal(actual, whole)  # the same table rows, bit for bit


def test_reconstruct_any_strides_and_writes_only_inside_out():
    shape = (2, 40, 2, 19, 64, 24)
    inputs = family.make_reconstruct_inputs(shape, "float16", "cpu", seed=12)
    inputs["a"] = inputs["a"].transpose(1, 2).contiguous().transpose(1, 2)  # rank-major a
    inputs["positions"] = inputs["positions"].transpose(1, 2).contiguous().transpose(1, 2)
    cos, sin = rope_tables(100, 64)
    inputs["cos"], inputs["sin"] = cos[::2], sin[::2]  # row stride 2 D, more rows than S
    buffer = poison_(torch.empty(2, 2, 19, 70, dtype=torch.float16))
    out = buffer[..., 3:67]
    reconstruct_keys_triton(inputs["a"], inputs["basis"], inputs["positions"], inputs["cos"], inputs["sin"],
                            config=reconstruct_space.DEFAULT_SMALL, out=out)
    assert_ok(family.compare_reconstruct(out, family.reconstruct_reference(inputs), inputs))
    assert bool(buffer[..., :3].isnan().all() and buffer[..., 67:].isnan().all()), "wrote outside `out`"


def test_reconstruct_tolerance_catches_a_dropped_rank_term():
    inputs = family.make_reconstruct_inputs((1, 50, 2, 9, 64, 40), "float32", "cpu", seed=13)
    truncated = dict(inputs, a=inputs["a"].clone())
    truncated["a"][..., -1] = 0  # the smallest of 40 terms
    wrong = family.reconstruct_reference(truncated)
    assert family.compare_reconstruct(wrong, family.reconstruct_reference(inputs), inputs) is not None


# ================================================================================================
# Public ops, every backend
# ================================================================================================

@pytest.fixture(params=["cpu-auto", "triton", "reference"])
def backend(request, monkeypatch):
    if request.param != "cpu-auto":
        monkeypatch.setenv("KERNELHUB_BACKEND", request.param)
    return request.param


def relative_error(approx, exact):
    return float((approx - exact).norm() / exact.norm())


def factor_tolerance(dtype):
    """Allowed Frobenius distance of a @ basis from the optimal rank-r reconstruction, relative to
    ||K||: rounding a and basis to dtype costs about eps / 3 (one rounding of each, errors
    uncorrelated), allowed eps; the float32 Gram and eigh cost kappa^2 u sqrt(S) ~ 1e-6 on these
    spectra (kappa = sigma_1 / sigma_r = 3.3), allowed 1e-5."""
    return torch.finfo(dtype).eps + 1e-5


LOWRANK_CASES = [  # (B, H_kv, S, D, rank, dtype)
    (1, 1, 63, 64, 5, torch.float32),
    (2, 2, 129, 64, 24, torch.bfloat16),
    (1, 8, 100, 16, 12, torch.float16),  # H_kv = 8, D = 16
    (2, 1, 77, 128, 40, torch.float32),
    (1, 8, 130, 64, 100, torch.bfloat16),  # H_kv * D = 512 > S: the rank limit is S
    (1, 5, 300, 120, 48, torch.float32),  # H_kv * D = 600: the CPU Gram's block rows, the last partial
]


def lowrank_id(case):
    return "B{}-H{}-S{}-D{}-r{}-".format(*case[:5]) + dtype_id(case[5])


@pytest.mark.parametrize("case", LOWRANK_CASES, ids=lowrank_id)
def test_lowrank_keys_reaches_the_svd_optimum(backend, case):
    """Eckart-Young: no rank-r matrix beats the truncated SVD; ours must match it within the
    rounding of the factors, and agree with the reference's reconstruction."""
    batch, heads, seq, head_dim, rank, dtype = case
    k = keys_with_spectrum(batch, heads, seq, head_dim, rank, dtype, seed=sum(case[:5]))
    a, basis = ops.lowrank_keys(k, rank)
    assert a.shape == (batch, seq, rank) and basis.shape == (batch, rank, heads * head_dim)
    assert a.dtype == dtype and basis.dtype == dtype
    merged = ref.merge_heads(k).double()
    approx = a.double() @ basis.double()
    u, singular, vh = torch.linalg.svd(merged, full_matrices=False)
    optimal = (u[..., :rank] * singular[:, None, :rank]) @ vh[:, :rank]
    tol = factor_tolerance(dtype)
    for b in range(batch):
        optimum = float(singular[b, rank:].square().sum().sqrt())
        error = float((merged[b] - approx[b]).norm())
        scale = float(merged[b].norm())
        assert error >= optimum * (1 - 1e-9), "better than the optimum: the check itself is broken"
        assert error <= optimum + tol * scale, f"batch {b}: error {error / scale:.3g} vs optimum {optimum / scale:.3g}"
        distance = relative_error(approx[b], optimal[b]) * float(optimal[b].norm()) / scale
        assert distance <= tol, f"batch {b}: {distance:.3g} from the optimal reconstruction"
    a_ref, basis_ref = ref.lowrank_keys(k, rank)
    assert relative_error(approx, a_ref.double() @ basis_ref.double()) <= 2 * tol
    # Factors in order of decreasing singular value: column j of a has norm sigma_j.
    torch.testing.assert_close(a.double().norm(dim=1), singular[:, :rank], rtol=tol, atol=0)
    # Orthonormal rows: to the rounding of the factor, and float32 eigh's O(HD u) loss of orthogonality.
    gram_of_rows = basis.double() @ basis.double().transpose(1, 2)
    allowed = 4 * torch.finfo(dtype).eps + heads * head_dim * 2.0**-24
    assert float((gram_of_rows - torch.eye(rank, dtype=torch.float64)).abs().max()) <= allowed


@pytest.mark.parametrize("gram", ops.GRAM_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_lowrank_keys_full_rank_is_exact(backend, dtype, gram):
    """rank = H_kv * D keeps every direction: a @ basis is K up to rounding (with either Gram
    matrix: a is projected from the keys themselves)."""
    gen = torch.Generator().manual_seed(14)
    k = torch.randn(2, 2, 150, 32, generator=gen).to(dtype)
    a, basis = ops.lowrank_keys(k, 64, gram=gram)
    merged = ref.merge_heads(k).double()
    tol = 8 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
    assert relative_error(a.double() @ basis.double(), merged) <= tol


# -- gram="int8": the Gram matrix of the keys quantised per channel ------------------------------

def int8_error_allowance(k, rank):
    """How far the int8 method may be from the optimum, relative to ||K||: the quantisation noise
    (a step s / sqrt(12) per element) seen in the kept directions, with a margin of 2."""
    merged = ref.merge_heads(k).double()
    _, scale = ref.channel_quantized_keys(k)
    noise = float((scale.double().square().sum(dim=1) * merged.shape[1] / 12).sum().sqrt())
    return 2 * noise * (rank / merged.shape[-1]) ** 0.5 / float(merged.norm())


INT8_GRAM_CASES = [  # (B, H_kv, S, D, rank, dtype), every S > H_kv * D
    (1, 1, 200, 64, 5, torch.float32),
    (2, 2, 300, 64, 24, torch.bfloat16),
    (1, 8, 300, 16, 12, torch.float16),
    (2, 1, 400, 128, 40, torch.float32),
    (1, 5, 700, 120, 48, torch.float32),  # H_kv * D = 600: the int8 Gram's block rows, the last partial
]


@pytest.mark.parametrize("case", INT8_GRAM_CASES, ids=lowrank_id)
def test_int8_gram_matches_its_reference_near_the_optimum(backend, case):
    """The CPU path computes the reference's quantised Gram matrix exactly (integer sums), so its
    reconstruction is the reference's up to float32 eigh; both are near the SVD optimum. The
    Triton path computes the float32 Gram for either method: its result is gram="float32"'s."""
    batch, heads, seq, head_dim, rank, dtype = case
    k = keys_with_spectrum(batch, heads, seq, head_dim, rank, dtype, seed=sum(case[:5]) + 1)
    a, basis = ops.lowrank_keys(k, rank, gram="int8")
    assert a.shape == (batch, seq, rank) and basis.shape == (batch, rank, heads * head_dim)
    assert a.dtype == dtype and basis.dtype == dtype
    a_float, basis_float = ops.lowrank_keys(k, rank)
    if backend == "triton":
        assert torch.equal(a, a_float) and torch.equal(basis, basis_float)
        return
    assert not torch.equal(basis, basis_float)  # the int8 method ran
    approx = a.double() @ basis.double()
    a_ref, basis_ref = ref.lowrank_keys_int8_gram(k, rank)
    tol = factor_tolerance(dtype)
    assert relative_error(approx, a_ref.double() @ basis_ref.double()) <= 2 * tol
    merged = ref.merge_heads(k).double()
    singular = torch.linalg.svdvals(merged)
    for b in range(batch):
        optimum = float(singular[b, rank:].square().sum().sqrt())
        error = float((merged[b] - approx[b]).norm())
        scale = float(merged[b].norm())
        assert error >= optimum * (1 - 1e-9)
        assert error <= optimum + (tol + int8_error_allowance(k[b:b + 1], rank)) * scale
    gram_of_rows = basis.double() @ basis.double().transpose(1, 2)
    allowed = 4 * torch.finfo(dtype).eps + heads * head_dim * 2.0**-24
    assert float((gram_of_rows - torch.eye(rank, dtype=torch.float64)).abs().max()) <= allowed


@pytest.mark.parametrize("case", [case for case in LOWRANK_CASES if case[2] <= case[1] * case[3]], ids=lowrank_id)
def test_int8_gram_with_no_more_tokens_than_columns_is_the_float32_method(backend, case):
    """S <= H_kv * D: the float32 Gram is cheap, and the quantised keys' span is not the keys' (at
    rank = S the int8 basis would not rebuild them), so gram="int8" gives gram="float32"'s result."""
    batch, heads, seq, head_dim, rank, dtype = case
    k = keys_with_spectrum(batch, heads, seq, head_dim, rank, dtype, seed=sum(case[:5]) + 2)
    a, basis = ops.lowrank_keys(k, rank, gram="int8")
    a_float, basis_float = ops.lowrank_keys(k, rank)
    assert torch.equal(a, a_float) and torch.equal(basis, basis_float)


def test_int8_gram_at_rank_s_rebuilds_the_keys():
    k = torch.randn(1, 1, 10, 129, generator=torch.Generator().manual_seed(23))
    a, basis = ops.lowrank_keys(k, 10, gram="int8")
    merged = ref.merge_heads(k).double()
    assert relative_error(a.double() @ basis.double(), merged) <= 1e-5


def test_int8_gram_allowance_is_tight_enough_to_fail():
    """The allowance above is not vacuous: the basis from the Gram matrix of the same keys
    quantised 18 times coarser (4-bit channels) lands outside it."""
    k = keys_with_spectrum(1, 2, 129, 64, 24, torch.float32, seed=5)
    merged = ref.merge_heads(k).double()
    columns = merged[0].t()
    scale = columns.abs().amax(dim=1, keepdim=True) / 7
    coarse = (columns / scale).round() * scale  # 4-bit channels
    _, vectors = torch.linalg.eigh(coarse @ coarse.t())
    basis = vectors[:, -24:].t()
    error = float((merged[0] - merged[0] @ basis.t() @ basis).norm())
    optimum = float(torch.linalg.svdvals(merged[0])[24:].square().sum().sqrt())
    assert error > optimum + (factor_tolerance(torch.float32) + int8_error_allowance(k, 24)) * float(merged.norm())


def channel_test_keys(dtype):
    """`[2, 3, 23, 9]` keys stored D-major and sliced, with an all-zero channel, a subnormal one
    (quotients up to 191, clamped), a huge one and a constant one."""
    gen = torch.Generator().manual_seed(21)
    full = torch.randn(2, 3, 40, 9, generator=gen)
    full[0, 1, :, 2] = 0.0
    if dtype == torch.float32:
        full[1, 0, :, 4] *= 1e-39  # a subnormal scale: quotients up to 191, clamped
    full[1, 2, :, 0] *= 1e4 if dtype == torch.float16 else 1e30  # within the dtype's range
    full[0, 2, :, 8] = -0.75
    return full.to(dtype).transpose(2, 3).contiguous().transpose(2, 3)[:, :, 3:26]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_int8_channel_quantisation_is_the_reference_bit_for_bit(dtype, cpu_quantiser, monkeypatch):
    """Chunks of 7 tokens (the last one partial) and torch's blocks of 5 within them, into a
    poisoned q."""
    monkeypatch.setattr(lowrank_cpu, "_TOKENS_PER_BLOCK", 5)
    monkeypatch.setattr(lowrank_cpu, "_TOKENS_PER_CHUNK", 7)
    k = channel_test_keys(dtype)
    scale = lowrank_cpu.channel_scales(k)
    q = torch.full((2, 23, 27), 99, dtype=torch.int8)  # 99 is no quantised key
    for b in range(2):
        for start in range(0, 23, 7):
            lowrank_cpu.quantize_channels(k[b, :, start:start + 7], scale[b], q[b, start:start + 7])
    q_ref, scale_ref = ref.channel_quantized_keys(k)
    assert torch.equal(scale.reshape(2, 27), scale_ref)
    assert torch.equal(q, q_ref)
    if dtype == torch.float32:
        assert int(q[1, :, 4].abs().max()) == 127  # the subnormal channel was clamped


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_int8_gram_is_exact_over_chunks_of_tokens(dtype, cpu_quantiser, monkeypatch):
    """int8_gram sums Q^T Q chunk by chunk in one reused buffer: its lower triangle is the exact
    integer product of the reference's int8 keys, scaled as the op does, to the last bit."""
    monkeypatch.setattr(lowrank_cpu, "_TOKENS_PER_CHUNK", 7)
    monkeypatch.setattr(lowrank_cpu, "_GRAM_BLOCK", 5)
    k = channel_test_keys(dtype)
    gram = lowrank_cpu.int8_gram(k)
    q, scale = ref.channel_quantized_keys(k)
    scale = scale.double()
    unit = scale / scale.amax(dim=1, keepdim=True)
    exact = q.double().transpose(1, 2) @ q.double()  # integer sums, exact in float64
    expected = (exact * unit[:, :, None] * unit[:, None, :]).float()
    assert torch.equal(torch.tril(gram), torch.tril(expected))


def test_int8_gram_of_non_finite_keys_is_none(cpu_quantiser):
    k = torch.randn(1, 2, 30, 4)
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = k.clone()
        poisoned[0, 1, 17, 3] = bad
        assert lowrank_cpu.int8_gram(poisoned) is None


def test_int8_gram_sums_long_sequences_without_int32_overflow():
    """S * 127**2 passes 2**31 from S = 133,144: the product is summed in chunks, in int64."""
    q = torch.full((140_000, 2), 127, dtype=torch.int8)
    q[::2, 1] = -127
    gram = lowrank_cpu._integer_gram(q)
    exact = q.to(torch.float64).t() @ q.to(torch.float64)
    assert gram.dtype == torch.int64
    assert torch.equal(torch.tril(gram), torch.tril(exact).to(torch.int64))
    assert int(gram[0, 0]) == 140_000 * 127**2 > 2**31


def test_int8_gram_in_chunks_matches_the_reference(monkeypatch):
    monkeypatch.setattr(lowrank_cpu, "MAX_TOKENS_PER_PRODUCT", 7)
    monkeypatch.setattr(lowrank_cpu, "_GRAM_BLOCK", 5)
    k = keys_with_spectrum(2, 3, 61, 4, 5, torch.float32, seed=22)
    a, basis = ops.lowrank_keys(k, 5, gram="int8")
    a_ref, basis_ref = ref.lowrank_keys_int8_gram(k, 5)
    assert relative_error(a.double() @ basis.double(), a_ref.double() @ basis_ref.double()) <= 1e-5


def test_lowrank_keys_reads_a_cache_slice_in_place(monkeypatch):
    """The Triton path reads strided keys: same bits as on a contiguous copy."""
    monkeypatch.setenv("KERNELHUB_BACKEND", "triton")
    full = keys_with_spectrum(1, 2, 120, 64, 20, torch.float16, seed=15)
    k = full[:, :, :97]
    a, basis = ops.lowrank_keys(k, 20)
    a_copy, basis_copy = ops.lowrank_keys(k.contiguous(), 20)
    assert torch.equal(a, a_copy) and torch.equal(basis, basis_copy)


RECONSTRUCT_CASES = [  # (B, S, H_kv, n, D, rank, dtype, index dtype)
    (1, 7, 1, 1, 64, 5, torch.float32, torch.int64),
    (2, 63, 2, 33, 64, 24, torch.bfloat16, torch.int32),
    (1, 129, 8, 7, 16, 40, torch.float16, torch.int64),
    (2, 100, 1, 20, 128, 160, torch.float16, torch.int32),
]


def reconstruct_case_id(case):
    return "B{}-S{}-H{}-n{}-D{}-r{}-".format(*case[:6]) + dtype_id(case[6]) + "-" + dtype_id(case[7])


@pytest.mark.parametrize("case", RECONSTRUCT_CASES, ids=reconstruct_case_id)
def test_reconstruct_keys_matches_reference(backend, case):
    *shape, dtype, index_dtype = case
    batch, seq, heads, n, _, _ = shape
    inputs = family.make_reconstruct_inputs(tuple(shape), dtype_id(dtype), "cpu", seed=sum(shape))
    inputs["positions"] = edge_positions(batch, heads, n, seq, index_dtype, seed=16) if n >= 5 else \
        torch.full((batch, heads, n), seq - 1, dtype=index_dtype)
    args = [inputs[name] for name in ("a", "basis", "positions", "cos", "sin")]
    expected = ref.reconstruct_keys(*args)
    actual = ops.reconstruct_keys(*args)
    assert_ok(family.compare_reconstruct(actual, expected, inputs))
    out = poison_(torch.empty_like(expected))
    assert ops.reconstruct_keys(*args, out=out) is out
    assert_ok(family.compare_reconstruct(out, expected, inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_reconstruct_keys_with_rope_positions(backend, dtype):
    inputs = family.make_reconstruct_inputs((2, 200, 2, 13, 64, 40), dtype_id(dtype), "cpu", seed=21)
    args = [inputs[name] for name in ("a", "basis", "positions", "cos", "sin")]
    whole = ops.reconstruct_keys(*args)
    cos, sin, rows = chosen_rows(inputs["positions"], 64)
    chosen = ops.reconstruct_keys(*args[:3], cos, sin, rope_positions=rows)
    assert torch.equal(chosen, whole)
    expected = ref.reconstruct_keys(*args[:3], cos, sin, rows)
    assert_ok(family.compare_reconstruct(chosen, expected, dict(inputs, cos=cos, sin=sin, rope_positions=rows)))


def test_full_rank_round_trip_gives_roped_keys(backend):
    """lowrank_keys then reconstruct_keys at full rank is RoPE of the original keys."""
    gen = torch.Generator().manual_seed(17)
    k = torch.randn(2, 2, 80, 32, generator=gen)
    a, basis = ops.lowrank_keys(k, 64)
    positions = edge_positions(2, 2, 11, 80, torch.int64, seed=18)
    cos, sin = rope_tables(80, 32)
    keys = ops.reconstruct_keys(a, basis, positions, cos, sin)
    exact = apply_rope(torch.gather(k, 2, positions[..., None].expand(-1, -1, -1, 32)), positions, cos, sin)
    assert relative_error(keys.double(), exact.double()) <= 1e-5


def test_empty_token_list():
    a, basis = torch.zeros(1, 5, 3), torch.zeros(1, 3, 64)
    cos, sin = rope_tables(5, 64)
    assert ops.reconstruct_keys(a, basis, torch.zeros(1, 1, 0, dtype=torch.int64), cos, sin).shape == (1, 1, 0, 64)


def test_compile_fullgraph_traces_both_ops():
    def prefill_then_decode(k, positions, cos, sin):
        a, basis = ops.lowrank_keys(k, 8)
        rows = torch.arange(positions.numel()).view(positions.shape)
        chosen = ops.reconstruct_keys(a, basis, positions, cos[positions.flatten()], sin[positions.flatten()],
                                      rope_positions=rows)
        return ops.reconstruct_keys(a, basis, positions, cos, sin) + chosen

    gen = torch.Generator().manual_seed(19)
    k = torch.randn(1, 2, 40, 16, generator=gen)
    positions = torch.randint(0, 40, (1, 2, 5), generator=gen)
    cos, sin = rope_tables(40, 16)
    compiled = torch.compile(prefill_then_decode, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(k, positions, cos, sin), prefill_then_decode(k, positions, cos, sin))


# ================================================================================================
# Bad input: a clear error naming the argument, before anything runs
# ================================================================================================

@pytest.fixture
def nothing_runs(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("an op ran although its arguments are invalid")

    monkeypatch.setattr(ops, "_lowrank_keys", fail)
    monkeypatch.setattr(ops, "_reconstruct_keys", fail)


@pytest.mark.parametrize("k, rank, error, fragment", [
    (torch.zeros(1, 2, 8, 4, dtype=torch.int32), 2, TypeError, "k: expected dtype float16 or bfloat16 or float32"),
    (torch.zeros(2, 8, 4), 2, ValueError, "k: expected a 4-D tensor"),
    ("keys", 2, TypeError, "k: expected a torch.Tensor"),
    (torch.zeros(1, 2, 8, 4), 2.0, TypeError, "rank: expected an int, got float"),
    (torch.zeros(1, 2, 8, 4), True, TypeError, "rank: expected an int, got bool"),
    (torch.zeros(1, 2, 8, 4), 0, ValueError, r"rank: expected 1 <= rank <= min\(S, H_kv \* D\) = min\(8, 8\) = 8, got 0"),
    (torch.zeros(1, 2, 5, 4), 6, ValueError, r"= min\(5, 8\) = 5, got 6"),
    (torch.zeros(1, 1, 9, 4), 5, ValueError, r"= min\(9, 4\) = 4, got 5"),
], ids=["int-keys", "3d-keys", "not-a-tensor", "float-rank", "bool-rank", "rank-0", "rank-over-S", "rank-over-HD"])
def test_lowrank_keys_bad_input_names_the_argument(nothing_runs, k, rank, error, fragment):
    with pytest.raises(error, match=fragment):
        ops.lowrank_keys(k, rank)


@pytest.mark.parametrize("gram", ["bfloat16", "INT8", None, 8])
def test_lowrank_keys_bad_gram_names_the_argument(nothing_runs, gram):
    with pytest.raises(ValueError, match=r"gram: expected one of 'float32', 'int8', got "):
        ops.lowrank_keys(torch.zeros(1, 2, 8, 4), 2, gram=gram)


def good_reconstruct_args():
    """B = 2, S = 10, rank = 3, H_kv = 2, D = 8, n = 4."""
    cos, sin = rope_tables(12, 8)
    return dict(a=torch.zeros(2, 10, 3), basis=torch.zeros(2, 3, 16),
                positions=torch.zeros(2, 2, 4, dtype=torch.int64), cos=cos, sin=sin)


@pytest.mark.parametrize("change, error, fragment", [
    (dict(a=torch.zeros(2, 10, 3, dtype=torch.int8)), TypeError, "a: expected dtype float16 or bfloat16 or float32"),
    (dict(a=torch.zeros(10, 3)), ValueError, "a: expected a 3-D tensor"),
    (dict(basis=torch.zeros(2, 3, 16, dtype=torch.float16)), TypeError, "basis: expected dtype float32, got float16"),
    (dict(basis=torch.zeros(2, 4, 16)), ValueError, r"basis: expected shape \[B, rank, H_kv \* D\] .* rank = a.shape\[2\] = 3"),
    (dict(basis=torch.zeros(1, 3, 16)), ValueError, r"basis: expected shape .* B = a.shape\[0\] = 2"),
    (dict(basis=torch.zeros(2, 3, 14)), ValueError, r"basis: head dimension D = basis.shape\[2\] / H_kv = 14 / 2 = 7"),
    (dict(basis=torch.zeros(2, 3, 1024)), ValueError, "basis: head dimension .* = 512; .* D must be in \\[2, 256\\]"),
    (dict(positions=torch.zeros(2, 2, 4)), TypeError, "positions: expected dtype int32 or int64, got float32"),
    (dict(positions=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "positions: expected a 3-D tensor"),
    (dict(positions=torch.zeros(3, 2, 4, dtype=torch.int64)), ValueError, r"positions: expected shape \[B, H_kv, n\] with B = a.shape\[0\] = 2"),
    (dict(positions=torch.zeros(2, 3, 4, dtype=torch.int64)), ValueError, r"positions: H_kv = positions.shape\[1\] = 3 must divide basis.shape\[2\]"),
    (dict(positions=torch.full((2, 2, 4), 10)), ValueError, r"positions: expected values in \[0, S\) = \[0, 10\), got values in \[10, 10\]"),
    (dict(positions=torch.full((2, 2, 4), -1, dtype=torch.int32)), ValueError, r"positions: expected values in \[0, S\)"),
    (dict(cos=torch.zeros(12, 8, dtype=torch.float64)), TypeError, "cos: expected dtype float32, got float64"),
    (dict(sin=torch.zeros(12, 8, 1)), ValueError, "sin: expected a 2-D tensor"),
    (dict(cos=torch.zeros(12, 16), sin=torch.zeros(12, 16)), ValueError, r"cos: expected shape \[P, D\] with D = 8"),
    (dict(sin=torch.zeros(13, 8)), ValueError, r"sin: expected the shape of cos \(12, 8\), got \(13, 8\)"),
    (dict(cos=torch.zeros(9, 8), sin=torch.zeros(9, 8)), ValueError, "cos: the tables have 9 positions but a holds S = 10 tokens"),
    (dict(positions=torch.zeros(2, 2, 4, dtype=torch.int64, device="meta")), ValueError,
     "positions is on meta but a is on cpu"),
    (dict(out=torch.zeros(2, 2, 4, 8, dtype=torch.float16)), ValueError, r"out: expected shape \(2, 2, 4, 8\), dtype float32"),
    (dict(rope_positions=torch.zeros(2, 2, 4)), TypeError, "rope_positions: expected dtype int32 or int64, got float32"),
    (dict(rope_positions=torch.zeros(2, 2, 5, dtype=torch.int64)), ValueError,
     r"rope_positions: expected the shape of positions \(2, 2, 4\), got \(2, 2, 5\)"),
    (dict(rope_positions=torch.full((2, 2, 4), 12)), ValueError, r"rope_positions: expected values in \[0, P\) = \[0, 12\)"),
    (dict(rope_positions=torch.zeros(2, 2, 4, dtype=torch.int64, device="meta")), ValueError,
     "rope_positions is on meta but a is on cpu"),
], ids=["int8-a", "2d-a", "basis-dtype", "basis-rank", "basis-batch", "odd-head-dim", "huge-head-dim",
        "float-positions", "2d-positions", "positions-batch", "heads-do-not-divide", "position-S", "position-negative",
        "float64-cos", "3d-sin", "cos-head-dim", "sin-shape", "tables-shorter-than-S", "positions-device", "out-dtype",
        "float-rope-positions", "rope-positions-shape", "rope-position-P", "rope-positions-device"])
def test_reconstruct_keys_bad_input_names_the_argument(nothing_runs, change, error, fragment):
    kwargs = good_reconstruct_args() | change
    with pytest.raises(error, match=fragment):
        ops.reconstruct_keys(**kwargs)


def test_good_arguments_pass_validation(nothing_runs):
    """Guards the table above: its starting point is valid, so each row fails for its own change."""
    with pytest.raises(AssertionError, match="an op ran"):
        ops.reconstruct_keys(**good_reconstruct_args())
    with pytest.raises(AssertionError, match="an op ran"):
        ops.lowrank_keys(torch.zeros(1, 2, 8, 4), 8)
    short_tables = good_reconstruct_args() | dict(cos=torch.zeros(3, 8), sin=torch.zeros(3, 8),
                                                  rope_positions=torch.full((2, 2, 4), 2))
    with pytest.raises(AssertionError, match="an op ran"):  # rope_positions lift the P >= S rule
        ops.reconstruct_keys(**short_tables)


# ================================================================================================
# Spaces, buckets
# ================================================================================================

def test_gram_constraints_reject_what_a_gpu_cannot_run():
    shape = (1, 8, 32768, 128)
    infeasible = gram_space.SPACE.infeasibility
    big = {"BLOCK_HD": 128, "BLOCK_S": 128, "SPLIT_S": 1, "num_warps": 8, "num_stages": 4}
    assert "shared memory" in infeasible(big, shape, H100_SMEM_BYTES)
    spill = {"BLOCK_HD": 128, "BLOCK_S": 16, "SPLIT_S": 1, "num_warps": 2, "num_stages": 1}
    assert "registers" in infeasible(spill, shape, H100_SMEM_BYTES)
    wide = {"BLOCK_HD": 128, "BLOCK_S": 16, "SPLIT_S": 1, "num_warps": 8, "num_stages": 1}
    assert "padded problem size" in infeasible(wide, (1, 1, 32768, 64), H100_SMEM_BYTES)
    split = {"BLOCK_HD": 32, "BLOCK_S": 64, "SPLIT_S": 32, "num_warps": 4, "num_stages": 2}
    assert "S tiles" in infeasible(split, (1, 8, 1000, 128), H100_SMEM_BYTES)


def test_reconstruct_constraints_reject_what_a_gpu_cannot_run():
    shape = (1, 32768, 8, 2048, 128, 160)
    infeasible = reconstruct_space.SPACE.infeasibility
    big = {"BLOCK_N": 128, "BLOCK_R": 128, "num_warps": 8, "num_stages": 4}
    assert "shared memory" in infeasible(big, shape, H100_SMEM_BYTES)
    spill = {"BLOCK_N": 128, "BLOCK_R": 16, "num_warps": 2, "num_stages": 1}
    assert "registers" in infeasible(spill, shape, H100_SMEM_BYTES)
    wide = {"BLOCK_N": 64, "BLOCK_R": 16, "num_warps": 4, "num_stages": 1}
    assert "padded problem size" in infeasible(wide, (1, 100, 8, 20, 128, 160), H100_SMEM_BYTES)
    for config in reconstruct_space.SPACE.sample(30, shape, SMEM_BYTES, seed=0):
        assert min(config["BLOCK_N"], config["BLOCK_R"]) >= 16  # tl.dot's minimum


def test_buckets_and_distances():
    assert gram_space.bucket((3, 8, 100000, 128)) == (4, 8, 131072, 128)
    gd = gram_space.bucket_distance
    assert gd((1, 8, 32768, 128), (1, 4, 32768, 128)) is None  # other H_kv: never reused
    assert gd((1, 8, 8192, 128), (1, 8, 131072, 128)) is None  # 4 doublings: too far
    assert gd((1, 8, 32768, 128), (1, 8, 65536, 128)) < gd((1, 8, 32768, 128), (1, 8, 16384, 128))
    assert reconstruct_space.bucket((3, 100000, 8, 2000, 128, 160)) == (4, 131072, 8, 2048, 128, 160)
    rd = reconstruct_space.bucket_distance
    here = (1, 32768, 8, 2048, 128, 160)
    assert rd(here, (1, 32768, 8, 2048, 128, 128)) is None  # other rank
    assert rd(here, (8, 32768, 8, 2048, 128, 160)) is None  # 3 doublings of B
    assert rd(here, (1, 131072, 8, 2048, 128, 160)) < rd(here, (2, 32768, 8, 2048, 128, 160))  # S barely counts
    assert rd(here, (2, 32768, 8, 2048, 128, 160)) < rd(here, (1, 32768, 8, 1024, 128, 160))
