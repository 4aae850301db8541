"""The int8 GEMM and int8 quantisation Triton kernels against `reference/int8_gemm.py`, beyond the
contract suite (tests/test_contract.py runs every DEFAULT at the smoke shapes): edge configs,
sampled configs, exactness, strides, empty sizes, the scaled epilogue, the quantiser.

Without a GPU (or with TRITON_INTERPRET=1) the kernels run in Triton's interpreter on CPU tensors.
The int32 GEMM and the quantiser must match the reference bit for bit; the scaled GEMM within the
family's tolerance (and bit for bit in float32, where only the epilogue's operation order matters).
Every output is poisoned before a launch, so an element a kernel forgets to write fails.
"""

import pytest
import torch

from helpers import DEVICE, SMALLEST_SMEM_BYTES, dtype_id
from kernelhub.checking import INT_POISON, mismatch_close, mismatch_exact, poison_
from kernelhub.kernels.int8_gemm import space
from kernelhub.kernels.int8_gemm.kernel import int8_gemm_triton
from kernelhub.kernels.int8_gemm.quantize import quantize_int8_triton
from kernelhub.reference import int8_gemm as ref


def config_id(config: dict) -> str:
    return (f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}-g{config['GROUP_M']}"
            f"-split{config['SPLIT_K']}-w{config['num_warps']}-s{config['num_stages']}")


def make_config(block_m, block_n, block_k, group_m=1, split_k=1, num_warps=4, num_stages=2) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m,
            "SPLIT_K": split_k, "num_warps": num_warps, "num_stages": num_stages}


def random_int8(*shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen).to(DEVICE)


def make_b(n: int, k: int, layout: str, seed: int) -> torch.Tensor:
    """`b [K, N]`, either contiguous or the transposed view of a weight `[N, K]` (nn.Linear layout)."""
    if layout == "kn":
        return random_int8(k, n, seed=seed)
    return random_int8(n, k, seed=seed).t()


def run_int32(a, b, config) -> torch.Tensor:
    out = poison_(torch.empty(a.shape[0], b.shape[1], dtype=torch.int32, device=DEVICE))
    result = int8_gemm_triton(a, b, config=config, out=out)
    assert result is out
    return out


def assert_exact(actual, expected):
    problem = mismatch_exact(actual, expected)
    assert problem is None, problem


# --- int8 x int8 -> int32 ------------------------------------------------------------------------

# Edge cases written out: partial K tiles, split-K with an uneven share of K tiles per split,
# grouped tile order with a partial last group, the smallest tiles.
EXPLICIT_CASES = [
    ((7, 63, 96), make_config(16, 32, 64)),  # K = 96: one full and one half K tile
    ((7, 63, 96), make_config(16, 32, 64, split_k=2)),  # ... split between two programs
    ((5, 129, 33), make_config(16, 32, 32)),  # K = 33: a single valid column in the second tile
    ((3, 63, 130), make_config(16, 32, 32, split_k=4)),  # 5 K tiles over 4 splits
    ((1, 129, 257), make_config(16, 64, 32, split_k=16)),  # 9 K tiles, 7 splits get 0 or 1
    ((257, 129, 96), make_config(32, 32, 32, group_m=4)),  # 9 tile rows: groups of 4, 4, 1
    ((257, 63, 130), make_config(64, 32, 64, group_m=8, split_k=2, num_warps=8)),
]


@pytest.mark.parametrize("layout", ["kn", "nk_t"])
@pytest.mark.parametrize("shape, config", EXPLICIT_CASES,
                         ids=["M{}-N{}-K{}-".format(*s) + config_id(c) for s, c in EXPLICIT_CASES])
def test_int32_edge_configs_match_reference(shape, config, layout):
    assert space.SPACE.validate(config) == config
    m, n, k = shape
    a, b = random_int8(m, k, seed=3), make_b(n, k, layout, seed=4)
    assert_exact(run_int32(a, b, config), ref.int8_gemm(a, b))


SAMPLED_SHAPES = [(33, 129, 130), (128, 63, 257)]
SAMPLED_CASES = [(shape, config) for i, shape in enumerate(SAMPLED_SHAPES)
                 for config in space.SPACE.sample(5, shape, smem_bytes=SMALLEST_SMEM_BYTES, seed=10 + i)]


def test_sampled_configs_cover_split_k_and_grouping():
    """Guards the sample below: it must keep exercising split-K and grouped tile order."""
    assert any(c["SPLIT_K"] > 1 for _, c in SAMPLED_CASES)
    assert any(c["GROUP_M"] > 1 for _, c in SAMPLED_CASES)


@pytest.mark.parametrize("shape, config", SAMPLED_CASES,
                         ids=["M{}-N{}-K{}-".format(*s) + config_id(c) for s, c in SAMPLED_CASES])
def test_int32_sampled_configs_match_reference(shape, config):
    m, n, k = shape
    a, b = random_int8(m, k, seed=5), make_b(n, k, "nk_t", seed=6)
    assert_exact(run_int32(a, b, config), ref.int8_gemm(a, b))


@pytest.mark.parametrize("split_k", [1, 4], ids=["split1", "split4"])
def test_int32_exact_beyond_float32_precision(split_k):
    """Sums of products of -128 and 127 pass 2**25: a float32 accumulator (24-bit significand) would round them."""
    m, n, k = 3, 33, 4096
    gen = torch.Generator().manual_seed(7)
    a = torch.where(torch.rand(m, k, generator=gen) < 0.9, -128, 127).to(torch.int8).to(DEVICE)
    b = torch.where(torch.rand(k, n, generator=gen) < 0.9, -128, 127).to(torch.int8).to(DEVICE)
    expected = ref.int8_gemm(a, b)
    assert int(expected.abs().max()) > 2**25
    assert_exact(run_int32(a, b, make_config(16, 32, 256, split_k=split_k)), expected)


@pytest.mark.parametrize("split_k", [1, 2], ids=["split1", "split2"])
def test_int32_any_strides_and_writes_only_inside_out(split_k):
    m, n, k = 33, 63, 96
    a = random_int8(k, m + 3, seed=8)[:, 1:m + 1].t()  # column-major, offset view
    b = random_int8(k, 2 * n, seed=9)[:, ::2]  # column stride 2
    buffer = poison_(torch.empty(m + 2, n + 5, dtype=torch.int32, device=DEVICE))
    out = buffer[1:m + 1, 2:n + 2]  # row stride n + 5, surrounded by poison
    result = int8_gemm_triton(a, b, config=make_config(16, 32, 64, split_k=split_k), out=out)
    assert result is out
    assert_exact(out, ref.int8_gemm(a, b))
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[1:m + 1, 2:n + 2] = False
    assert bool((buffer[outside] == INT_POISON).all()), "wrote outside `out`"


def test_int32_empty_m_or_n_leaves_out_alone():
    config = space.DEFAULT_SMALL_M
    out = torch.empty(0, 63, dtype=torch.int32, device=DEVICE)
    assert int8_gemm_triton(random_int8(0, 96, seed=1), make_b(63, 96, "nk_t", seed=2), config=config, out=out) is out
    out = torch.empty(7, 0, dtype=torch.int32, device=DEVICE)
    assert int8_gemm_triton(random_int8(7, 96, seed=1), make_b(0, 96, "nk_t", seed=2), config=config, out=out) is out


@pytest.mark.parametrize("split_k", [1, 2], ids=["split1", "split2"])
def test_int32_empty_k_gives_zeros(split_k):
    a, b = random_int8(7, 0, seed=1), make_b(63, 0, "nk_t", seed=2)
    assert_exact(run_int32(a, b, make_config(16, 32, 32, split_k=split_k)), ref.int8_gemm(a, b))


# --- scaled: (C * scale_a) * scale_b (+ bias) -> float ------------------------------------------

OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def scaled_inputs(m, n, k, bias_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = random_int8(m, k, seed=seed), make_b(n, k, "nk_t", seed=seed + 1)
    scale_a = (torch.rand(m, generator=gen) * 0.02 + 1e-3).to(DEVICE)
    scale_b = (torch.rand(n, generator=gen) * 0.02 + 1e-3).to(DEVICE)
    bias = None if bias_dtype is None else torch.randn(n, generator=gen).to(device=DEVICE, dtype=bias_dtype)
    return a, b, scale_a, scale_b, bias


def run_scaled(a, b, scale_a, scale_b, bias, out_dtype, config):
    out = poison_(torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=DEVICE))
    result = int8_gemm_triton(a, b, config=config, out=out, scale_a=scale_a, scale_b=scale_b, bias=bias)
    assert result is out
    return out


def assert_close_for_family(actual, expected):
    problem = mismatch_close(actual, expected, rtol=2 * torch.finfo(expected.dtype).eps, atol_frac=1e-6)
    assert problem is None, problem


@pytest.mark.parametrize("config", [make_config(16, 64, 32), make_config(32, 32, 64, group_m=4),
                                    make_config(16, 32, 32, split_k=4)], ids=config_id)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(7, 129, 130), (128, 63, 96)], ids=lambda s: "M{}-N{}-K{}".format(*s))
def test_scaled_matches_reference(shape, out_dtype, with_bias, config):
    a, b, scale_a, scale_b, bias = scaled_inputs(*shape, out_dtype if with_bias else None, seed=11)
    actual = run_scaled(a, b, scale_a, scale_b, bias, out_dtype, config)
    expected = ref.int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype)
    assert_close_for_family(actual, expected)
    if out_dtype == torch.float32:  # no final rounding to hide behind: same float32 operations, same order
        assert_exact(actual, expected)


@pytest.mark.parametrize("split_k", [1, 2], ids=["split1", "split2"])
@pytest.mark.parametrize("out_dtype, bias_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                   (torch.float16, torch.float32)], ids=dtype_id)
def test_scaled_bias_of_another_dtype(out_dtype, bias_dtype, split_k):
    a, b, scale_a, scale_b, bias = scaled_inputs(33, 63, 96, bias_dtype, seed=12)
    actual = run_scaled(a, b, scale_a, scale_b, bias, out_dtype, make_config(16, 32, 32, split_k=split_k))
    assert_close_for_family(actual, ref.int8_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype))


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_scaled_empty_k_gives_bias_only(with_bias):
    a, b, scale_a, scale_b, bias = scaled_inputs(7, 63, 0, torch.bfloat16 if with_bias else None, seed=13)
    actual = run_scaled(a, b, scale_a, scale_b, bias, torch.bfloat16, space.DEFAULT_SMALL_M)
    assert_exact(actual, ref.int8_scaled_gemm(a, b, scale_a, scale_b, bias, torch.bfloat16))


def test_scaled_split_k_with_strided_out():
    a, b, scale_a, scale_b, bias = scaled_inputs(7, 63, 130, torch.float32, seed=14)
    out = poison_(torch.empty(63, 7, dtype=torch.float32, device=DEVICE)).t()  # column-major out
    int8_gemm_triton(a, b, config=make_config(16, 32, 32, split_k=2), out=out,
                     scale_a=scale_a, scale_b=scale_b, bias=bias)
    assert_exact(out, ref.int8_scaled_gemm(a, b, scale_a, scale_b, bias, torch.float32))


# --- quantisation ----------------------------------------------------------------------------------

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_quantize(x):
    q = poison_(torch.empty(x.shape, dtype=torch.int8, device=DEVICE))
    scale = poison_(torch.empty(x.shape[0], dtype=torch.float32, device=DEVICE))
    q_result, scale_result = quantize_int8_triton(x, q_out=q, scale_out=scale)
    assert q_result is q and scale_result is scale
    return q, scale


def assert_quantize_matches_reference(x):
    q, scale = run_quantize(x)
    q_ref, scale_ref = ref.quantize_int8(x)
    assert_exact(scale, scale_ref)
    assert_exact(q, q_ref)
    return q, scale


@pytest.mark.parametrize("k", [1, 7, 63, 129, 1000], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_quantize_matches_reference(dtype, k):
    gen = torch.Generator().manual_seed(k)
    big = 5e3 if dtype == torch.float16 else 1e30  # finite: |randn| < 13 * 5e3 < 65504
    tiny = 1e-3 if dtype == torch.float16 else 1e-30
    x = torch.randn(6, k, generator=gen)
    x[1] = 0.0  # a zero row: scale 0, q 0
    x[2] *= big  # large magnitudes
    x[3] *= tiny  # small magnitudes
    x[4] = x[4].round()  # integers: many exact quotients
    x = x.to(device=DEVICE, dtype=dtype)
    q, scale = assert_quantize_matches_reference(x)
    assert float(scale[1]) == 0.0 and not bool(q[1].any())


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5], ids=lambda s: f"scale{s}")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_quantize_rounds_half_to_even(dtype, scale):
    """x / scale lands exactly on every k + 0.5 in [-127, 127]: ties must go to the even integer."""
    halves = torch.arange(-127, 127) + 0.5  # -126.5 ... 126.5, exact in every float dtype
    row = torch.cat([halves, torch.tensor([127.0, -127.0])]) * scale  # absmax 127 * scale, so scale is exact
    x = torch.stack([row, -row.flip(0)]).to(device=DEVICE, dtype=dtype)
    q, scales = assert_quantize_matches_reference(x)
    assert bool((scales == scale).all())
    assert bool((q[0, :254].to(torch.int32) % 2 == 0).all()), "a tie was not rounded to even"
    assert q[0, :254].tolist()[125:129] == [-2, 0, 0, 2]  # -1.5, -0.5, 0.5, 1.5


def test_quantize_tiny_rows_with_subnormal_or_zero_scale():
    """absmax / 127 rounds to 0 in the first row (so q is 0 although x is not) and to a subnormal in
    the second; a flush-to-zero or approximate division would show here."""
    x = torch.tensor([[1e-44, -5e-45, 0.0], [1e-40, -3e-41, 7e-42], [1e-38, 2e-39, -1e-38]])
    q, scale = assert_quantize_matches_reference(x.to(DEVICE))
    assert float(scale[0]) == 0.0 and not bool(q[0].any())
    assert 0.0 < float(scale[1]) < torch.finfo(torch.float32).tiny


def test_quantize_any_strides():
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(130, 2 * 9, generator=gen).to(DEVICE)[:, ::2].t()  # [9, 130], strides (2, 18)
    q = poison_(torch.empty(130, 9, dtype=torch.int8, device=DEVICE)).t()
    scale = poison_(torch.empty(9, 2, dtype=torch.float32, device=DEVICE))[:, 0]
    quantize_int8_triton(x, q_out=q, scale_out=scale)
    q_ref, scale_ref = ref.quantize_int8(x)
    assert_exact(scale, scale_ref)
    assert_exact(q, q_ref)


def test_quantize_empty():
    q, scale = run_quantize(torch.empty(0, 7, device=DEVICE))
    assert q.shape == (0, 7) and scale.shape == (0,)
    q, scale = run_quantize(torch.empty(3, 0, device=DEVICE))
    assert bool((scale == 0).all())
