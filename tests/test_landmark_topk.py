"""Landmark chunk selection (ShadowKV) against `reference/landmark_topk.py`, on every backend,
beyond the contract suite (tests/test_contract.py runs every DEFAULT at the smoke shapes).

Without a GPU the Triton kernel runs in Triton's interpreter on CPU tensors. A top-k is judged by
the reference's scores of the chunks it chose (sorted), never by index order, since near-ties may be
broken either way; validity (in range, distinct, not excluded) is checked exactly. Launcher
outputs are poisoned first, so an unwritten index fails.
"""

import math

import pytest
import torch

from helpers import DEVICE, backend, dtype_id  # noqa: F401
from helpers import H100_SMEM_BYTES as H100_SMEM
from helpers import SMALLEST_SMEM_BYTES as SMALLEST_SMEM
from kernelhub import configs
from kernelhub.checking import INT_POISON, check_config, mismatch_close, poison_
from kernelhub.kernels.landmark_topk import ops, space
from kernelhub.kernels.landmark_topk import spec as family
from kernelhub.kernels.landmark_topk.kernel import landmark_topk_triton
from kernelhub.reference import landmark_topk as ref

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def shape_id(shape) -> str:
    return "B{}-Hq{}-Hkv{}-C{}-D{}-k{}".format(*shape)


def config_id(config) -> str:
    return (f"blk{config['BLOCK_C']}-split{config['SPLIT_C']}-w{config['num_warps']}"
            f"-s{config['num_stages']}")


def randn(*shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)


def assert_valid_topk(actual, inputs):
    """`actual` is a valid top-k whose selected scores match the reference's (family.compare)."""
    expected = ref.landmark_topk(inputs["q"], inputs["landmarks"], inputs["k"], inputs["exclude"])
    problem = family.compare(actual, expected, inputs)
    assert problem is None, problem


def topk_inputs(q, landmarks, k, exclude=None):
    return {"q": q, "landmarks": landmarks, "k": k, "exclude": exclude}


# --- landmarks -----------------------------------------------------------------------------------

LANDMARK_SHAPES = [(1, 1, 8, 64), (2, 4, 63, 128), (2, 8, 101, 64), (1, 2, 1000, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", LANDMARK_SHAPES, ids=lambda s: "B{}-H{}-S{}-D{}".format(*s))
def test_landmarks_match_reference(backend, shape, dtype):
    k_rope = randn(*shape, seed=sum(shape), dtype=dtype)
    actual = ops.landmarks(k_rope)
    expected = ref.landmarks(k_rope)
    assert actual.shape == (shape[0], shape[1], shape[2] // 8, shape[3]) and actual.dtype == dtype
    problem = mismatch_close(actual, expected, rtol=torch.finfo(dtype).eps, atol_frac=1e-6)
    assert problem is None, problem


@pytest.mark.parametrize("chunk_size", [8, 3, 1])
def test_landmarks_are_chunk_means_without_the_tail(backend, chunk_size):
    """Token t of chunk c holds c + (t mod chunk_size) / 8 (exact in bfloat16): the mean is
    c + (chunk_size - 1) / 16. The chunk_size - 1 tail tokens hold 1e4, which would show if counted."""
    c, tail = 12, chunk_size - 1
    t = torch.arange(c * chunk_size + tail, dtype=torch.float32)
    values = torch.where(t < c * chunk_size, (t // chunk_size) + (t % chunk_size) / 8, torch.tensor(1e4))
    k_rope = values[None, None, :, None].expand(2, 3, -1, 16).to(device=DEVICE, dtype=torch.bfloat16)
    actual = ops.landmarks(k_rope, chunk_size=chunk_size)
    expected = (torch.arange(c, dtype=torch.float32) + (chunk_size - 1) / 16)[None, None, :, None]
    assert torch.equal(actual.float().cpu(), expected.expand(2, 3, c, 16))


# --- outlier chunks ------------------------------------------------------------------------------

def assert_same_outlier_scores(actual, k_rope, landmarks, n, chunk_size=8):
    scores = ref.outlier_scores(k_rope, landmarks, chunk_size)
    assert actual.dtype == torch.int64 and actual.shape == (*landmarks.shape[:2], n)
    ordered = actual.sort(dim=-1).values
    assert not bool((ordered[..., 1:] == ordered[..., :-1]).any()), "a chunk listed twice"
    got = scores.gather(-1, actual)
    want = torch.topk(scores, n, dim=-1, largest=False).values
    assert bool((got[..., 1:] >= got[..., :-1]).all()), "not in ascending score order"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape, n", [((1, 1, 8, 64), 1), ((2, 4, 63, 128), 3), ((2, 8, 333, 64), 41)],
                         ids=["B1-H1-S8-n1", "B2-H4-S63-n3", "B2-H8-S333-n41"])
def test_outlier_chunks_match_reference(backend, shape, n, dtype):
    k_rope = randn(*shape, seed=n, dtype=dtype)
    landmarks = ref.landmarks(k_rope)
    assert_same_outlier_scores(ops.outlier_chunks(k_rope, landmarks, n), k_rope, landmarks, n)


def test_planted_outlier_chunk_comes_first(backend):
    """Keys along one direction with small noise, except one key of chunk 9 pointing the other way."""
    k_rope = randn(1, 2, 8 * 20 + 3, 64, seed=3) * 0.05
    k_rope[..., 0] += 1.0
    k_rope[:, 1, 9 * 8 + 4, 0] = -1.0
    landmarks = ops.landmarks(k_rope)
    outliers = ops.outlier_chunks(k_rope, landmarks, 4)
    assert int(outliers[0, 1, 0]) == 9
    assert_same_outlier_scores(outliers, k_rope, landmarks, 4)


def test_outlier_chunks_all_or_none(backend):
    k_rope = randn(2, 2, 8 * 7, 64, seed=4)
    landmarks = ops.landmarks(k_rope)
    assert ops.outlier_chunks(k_rope, landmarks, 0).shape == (2, 2, 0)
    every = ops.outlier_chunks(k_rope, landmarks, 7)
    assert torch.equal(every.sort(dim=-1).values.cpu(), torch.arange(7).expand(2, 2, 7))


def test_outlier_chunks_other_chunk_size(backend):
    k_rope = randn(1, 3, 50, 64, seed=5)
    landmarks = ops.landmarks(k_rope, chunk_size=4)
    actual = ops.outlier_chunks(k_rope, landmarks, 5, chunk_size=4)
    assert_same_outlier_scores(actual, k_rope, landmarks, 5, chunk_size=4)


# --- landmark top-k: every backend ---------------------------------------------------------------

# Odd C, MHA (g = 1) and GQA groups of 4 and 8, D 64 and 128, k from 1 to C; k <= C // 2 brings an
# exclude mask (family.make_inputs).
TOPK_SHAPES = [(1, 4, 4, 7, 64, 1), (2, 8, 1, 63, 128, 63), (1, 32, 4, 129, 64, 16),
               (2, 8, 2, 200, 128, 50), (1, 8, 8, 300, 64, 37)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", TOPK_SHAPES, ids=shape_id)
def test_landmark_topk_matches_reference(backend, shape, dtype):
    inputs = family.make_inputs(shape, dtype_id(dtype), DEVICE, seed=sum(shape))
    actual = ops.landmark_topk(inputs["q"], inputs["landmarks"], inputs["k"], exclude=inputs["exclude"])
    assert_valid_topk(actual, inputs)


@pytest.mark.parametrize("group", [1, 4, 8], ids=lambda g: f"g{g}")
def test_needle_chunk_is_always_selected(backend, group):
    """One chunk matches one query head of KV head 1's group strongly: it is that head's first pick."""
    b, h_kv, c, d = 2, 2, 77, 64
    q = randn(b, group * h_kv, d, seed=group)
    landmarks = randn(b, h_kv, c, d, seed=group + 1) * 0.3
    needle, head = 61, group * 1 + group - 1  # the last query head of KV head 1
    landmarks[:, 1, needle] += 4.0 * q[:, head] / q[:, head].norm(dim=-1, keepdim=True) * math.sqrt(d) / 8
    top = ops.landmark_topk(q, landmarks, 1)
    assert top[:, 1, 0].tolist() == [needle, needle]
    top5 = ops.landmark_topk(q, landmarks, 5)
    assert_valid_topk(top5, topk_inputs(q, landmarks, 5))
    assert top5[:, 1, 0].tolist() == [needle, needle]


def test_exclude_is_respected(backend):
    """An excluded needle is never returned, and neither is any other excluded chunk."""
    b, h_kv, g, c, d = 1, 2, 4, 50, 64
    q = randn(b, h_kv * g, d, seed=7)
    landmarks = randn(b, h_kv, c, d, seed=8) * 0.3
    landmarks[0, 0, 20] += q[0, 0] / 2
    exclude = torch.zeros(b, h_kv, c, dtype=torch.bool, device=DEVICE)
    exclude[..., ::3] = True  # 17 of 50, chunk 20 not among them
    assert int(ops.landmark_topk(q, landmarks, 1, exclude=exclude)[0, 0, 0]) == 20
    exclude[0, 0, 20] = True
    top = ops.landmark_topk(q, landmarks, c - 18, exclude=exclude)  # 32 left in row [0, 0]
    assert not bool(exclude.gather(-1, top).any())
    assert_valid_topk(top, topk_inputs(q, landmarks, c - 18, exclude))


def test_excluded_chunks_leave_the_softmax(backend):
    """Head 0 has logits A = 20, B = 5 (others 0); head 1 has C = 2 (others 0). With A excluded before
    the softmax, head 0 gives B about 0.96 and head 1 gives C about 0.51: B wins. Excluding A only
    after the softmax would leave B at 3e-7 and pick C."""
    d, c = 64, 8
    a_idx, b_idx, c_idx = 1, 4, 6
    q = torch.zeros(1, 2, d)
    q[0, 0, 0] = q[0, 1, 1] = math.sqrt(d)  # s[j, c] = landmarks[c, j] for j = 0, 1
    landmarks = torch.zeros(1, 1, c, d)
    landmarks[0, 0, a_idx, 0], landmarks[0, 0, b_idx, 0], landmarks[0, 0, c_idx, 1] = 20.0, 5.0, 2.0
    exclude = torch.zeros(1, 1, c, dtype=torch.bool)
    exclude[0, 0, a_idx] = True
    top = ops.landmark_topk(q.to(DEVICE), landmarks.to(DEVICE), 1, exclude=exclude.to(DEVICE))
    assert int(top[0, 0, 0]) == b_idx


@pytest.mark.parametrize("shape", [(1, 4, 4, 7, 64, 7), (2, 8, 2, 45, 128, 45)], ids=shape_id)
def test_k_equal_to_c_returns_every_chunk_once(backend, shape):
    inputs = family.make_inputs(shape, "float32", DEVICE, seed=9)
    top = ops.landmark_topk(inputs["q"], inputs["landmarks"], inputs["k"])
    c = shape[3]
    assert torch.equal(top.sort(dim=-1).values.cpu(), torch.arange(c).expand(shape[0], shape[2], c))
    assert_valid_topk(top, inputs)  # and in descending score order


def test_out_is_written_in_place(backend):
    inputs = family.make_inputs((2, 8, 2, 63, 64, 9), "bfloat16", DEVICE, seed=10)
    buffer = poison_(torch.empty(2, 2, 20, dtype=torch.int64, device=DEVICE))
    out = buffer[:, :, ::2][:, :, :9]  # strided
    result = ops.landmark_topk(inputs["q"], inputs["landmarks"], 9, exclude=inputs["exclude"], out=out)
    assert result is out
    assert_valid_topk(out, inputs)
    assert bool((buffer[:, :, 1::2] == INT_POISON).all()) and bool((buffer[:, :, 18] == INT_POISON).all()), \
        "wrote outside out"


def test_shadowkv_pipeline(backend):
    """k_rope -> landmarks -> outliers (+ the local window) excluded -> top-k, S not a multiple of 8."""
    b, h_kv, g, s, d = 2, 2, 4, 8 * 40 + 5, 64
    k_rope = randn(b, h_kv, s, d, seed=11, dtype=torch.bfloat16)
    q = randn(b, h_kv * g, d, seed=12, dtype=torch.bfloat16)
    landmarks = ops.landmarks(k_rope)
    outliers = ops.outlier_chunks(k_rope, landmarks, 3)
    exclude = torch.zeros(b, h_kv, landmarks.shape[2], dtype=torch.bool, device=DEVICE)
    exclude.scatter_(2, outliers, True)
    exclude[..., -2:] = True  # the local window
    top = ops.landmark_topk(q, landmarks, 12, exclude=exclude)
    assert_valid_topk(top, topk_inputs(q, landmarks, 12, exclude))


def test_triton_backend_uses_the_best_stored_config(monkeypatch):
    """The op looks up (B, H_q, H_kv, C, D, k) and the dtype name, and launches what it gets."""
    monkeypatch.setenv("KERNELHUB_BACKEND", "triton")
    chosen = dict(space.DEFAULT_SHORT, BLOCK_C=32, num_warps=2)
    seen = {}

    def fake_best_config(spec, shape, dtype, device):
        seen.update(spec=spec.name, shape=shape, dtype=dtype)
        return chosen

    monkeypatch.setattr(configs, "best_config", fake_best_config)
    launched = {}

    def spy(*args, config, **kwargs):
        launched["config"] = config
        return landmark_topk_triton(*args, config=config, **kwargs)

    monkeypatch.setattr(ops, "landmark_topk_triton", spy)
    inputs = family.make_inputs((1, 8, 2, 40, 64, 5), "float16", DEVICE, seed=13)
    top = ops.landmark_topk(inputs["q"], inputs["landmarks"], 5, exclude=inputs["exclude"])
    assert seen == {"spec": "landmark_topk", "shape": (1, 8, 2, 40, 64, 5), "dtype": "float16"}
    assert launched["config"] is chosen
    assert_valid_topk(top, inputs)


# --- the launcher: sampled configs ------------------------------------------------------------------

def assert_config_matches(shape, dtype, config, seed=0):
    outcome = check_config(family.SPEC, shape, dtype, config, device=DEVICE, seed=seed)  # poisons `out`
    assert outcome.ok, outcome.problem


SAMPLED_SHAPES = [(2, 8, 2, 333, 128, 40), (1, 4, 1, 200, 64, 17)]
SAMPLED_CASES = [(shape, config) for i, shape in enumerate(SAMPLED_SHAPES)
                 for config in space.SPACE.sample(3, shape, SMALLEST_SMEM, seed=20 + i)]


def test_sampled_configs_cover_splits_and_block_sizes():
    """Guards the sample below: it must keep exercising split C and more than one block size."""
    assert any(c["SPLIT_C"] > 1 for _, c in SAMPLED_CASES)
    assert len({c["BLOCK_C"] for _, c in SAMPLED_CASES}) > 1


@pytest.mark.parametrize("shape, config", SAMPLED_CASES,
                         ids=[shape_id(s) + "-" + config_id(c) for s, c in SAMPLED_CASES])
def test_sampled_configs_match_reference(shape, config):
    assert_config_matches(shape, "float32", config, seed=2)


def run_launcher(q, landmarks, k, config, exclude=None):
    out = poison_(torch.empty(q.shape[0], landmarks.shape[1], k, dtype=torch.int64, device=DEVICE))
    result = landmark_topk_triton(q, landmarks, k, config=config, out=out, exclude=exclude)
    assert result is out
    return out


def test_split_with_every_chunk_excluded_and_empty_splits():
    """C = 100 in blocks of 16 over 8 splits: 7 blocks, so the eighth split is empty; every chunk of
    the second split (block 1) is excluded in row [0, 1]. Both leave (m, l) = (-inf, 0) partials."""
    config = dict(space.DEFAULT_SHORT, BLOCK_C=16, SPLIT_C=8)
    q, landmarks = randn(1, 8, 64, seed=14), randn(1, 2, 100, 64, seed=15)
    exclude = torch.zeros(1, 2, 100, dtype=torch.bool, device=DEVICE)
    exclude[0, 1, 16:32] = True
    out = run_launcher(q, landmarks, 30, config, exclude)
    assert_valid_topk(out, topk_inputs(q, landmarks, 30, exclude))


@pytest.mark.parametrize("split_c", [1, 4], ids=["split1", "split4"])
def test_any_strides(split_c):
    """q as a head-major view, landmarks as a view of a [B, C, H_kv, D] cache with padded D."""
    b, h_q, h_kv, c, d = 2, 8, 2, 90, 64
    q = randn(h_q, b, d, seed=16, dtype=torch.float16).transpose(0, 1)  # [B, H_q, D], strides (D, B * D, 1)
    cache = randn(b, c, h_kv, d + 8, seed=17, dtype=torch.float16)
    landmarks = cache[..., :d].transpose(1, 2)  # [B, H_kv, C, D]
    exclude = torch.zeros(b, c, h_kv, dtype=torch.bool, device=DEVICE).transpose(1, 2)
    exclude[:, :, 5:9] = True
    config = dict(space.DEFAULT_SHORT, BLOCK_C=32, SPLIT_C=split_c)
    assert not q.is_contiguous() and not landmarks.is_contiguous() and not exclude.is_contiguous()
    out = run_launcher(q, landmarks, 11, config, exclude)
    assert_valid_topk(out, topk_inputs(q, landmarks, 11, exclude))


def test_group_padding_beyond_sixteen_heads():
    """g = 32 query heads per KV head (G_PAD 32 > the tl.dot minimum of 16), D = 40 (padded to 64).
    q and landmarks are views of storage whose columns past D hold NaN: a load without the D mask
    would bring NaN into the logits."""
    q_storage, lmk_storage = randn(1, 64, 64, seed=18), randn(1, 2, 70, 64, seed=19)
    q_storage[..., 40:] = float("nan")
    lmk_storage[..., 40:] = float("nan")
    q, landmarks = q_storage[..., :40], lmk_storage[..., :40]
    out = run_launcher(q, landmarks, 8, space.default_config((1, 64, 2, 70, 40, 8), "float32"))
    assert_valid_topk(out, topk_inputs(q, landmarks, 8))


# --- the family's check is not vacuous -----------------------------------------------------------

def test_compare_rejects_wrong_answers():
    inputs = family.make_inputs((1, 8, 2, 60, 64, 6), "float32", DEVICE, seed=21)
    expected = ref.landmark_topk(inputs["q"], inputs["landmarks"], 6, inputs["exclude"])
    assert family.compare(expected.clone(), expected, inputs) is None
    assert family.compare(expected.flip(-1), expected, inputs).startswith("not in descending score order")
    duplicate = expected.clone()
    duplicate[0, 0, 1] = duplicate[0, 0, 0]
    assert "chosen twice" in family.compare(duplicate, expected, inputs)
    out_of_range = expected.clone()
    out_of_range[0, 1, 2] = 60
    assert "out of range" in family.compare(out_of_range, expected, inputs)
    excluded = expected.clone()
    excluded[0, 1, 3] = int(inputs["exclude"][0, 1].nonzero()[0])
    assert "excluded chunk" in family.compare(excluded, expected, inputs)
    # The best chunk swapped for the best one not chosen: valid indices, wrong scores.
    scores = ref.chunk_scores(inputs["q"], inputs["landmarks"], inputs["exclude"])
    runner_up = int(torch.topk(scores[0, 0], 7).indices[6])
    swapped = expected.clone()
    swapped[0, 0, 0] = runner_up
    assert "selected scores differ" in family.compare(swapped, expected, inputs)
    assert family.score_tolerance(inputs) < 1e-3
    assert "int64" in family.compare(expected.int(), expected, inputs)


def test_planted_relevant_chunks_dominate():
    """make_inputs plants clearly relevant chunks: the best score of every row stands far above
    the typical (median) chunk's."""
    inputs = family.make_inputs((2, 32, 8, 1024, 128, 256), "float32", DEVICE, seed=22)
    scores = ref.chunk_scores(inputs["q"], inputs["landmarks"], inputs["exclude"])
    kept = scores.masked_fill(inputs["exclude"], float("nan"))
    assert bool((scores.amax(dim=-1) > 20 * kept.nanmedian(dim=-1).values).all())
    assert inputs["exclude"] is not None and bool(inputs["exclude"][..., -1].all())


# --- bad input: a clear error naming the argument, before anything launches ----------------------

@pytest.fixture
def launch_forbidden(monkeypatch):
    monkeypatch.setenv("KERNELHUB_BACKEND", "triton")

    def fail(*args, **kwargs):
        raise AssertionError("launched despite bad input")

    monkeypatch.setattr(ops, "landmark_topk_triton", fail)


def _good_topk():
    return dict(q=torch.zeros(2, 8, 64, dtype=torch.bfloat16),
                landmarks=torch.zeros(2, 4, 10, 64, dtype=torch.bfloat16),
                k=3, exclude=torch.zeros(2, 4, 10, dtype=torch.bool))


def _exclude_all_but(left: int):
    exclude = torch.zeros(2, 4, 10, dtype=torch.bool)
    exclude[1, 2, left:] = True
    return exclude


@pytest.mark.parametrize("change, error, fragment", [
    (dict(q=torch.zeros(2, 512, dtype=torch.bfloat16)), ValueError, r"q: expected a 3-D tensor"),
    (dict(q=torch.zeros(2, 8, 64, dtype=torch.int8)), TypeError, r"q: expected dtype float16 or bfloat16 or float32"),
    (dict(q="query"), TypeError, r"q: expected a torch.Tensor"),
    (dict(landmarks=torch.zeros(2, 4, 640, dtype=torch.bfloat16)), ValueError, r"landmarks: expected a 4-D tensor"),
    (dict(landmarks=torch.zeros(2, 4, 10, 64)), TypeError,
     r"landmarks: expected dtype bfloat16 \(the dtype of q\), got float32"),
    (dict(q=torch.zeros(2, 6, 64, dtype=torch.bfloat16)), ValueError,
     r"q: H_q = 6 query heads must be a multiple of H_kv = 4"),
    (dict(landmarks=torch.zeros(2, 4, 10, 32, dtype=torch.bfloat16)), ValueError,
     r"landmarks: expected shape \[B, H_kv, C, D\] with B = 2 and D = 64"),
    (dict(landmarks=torch.zeros(3, 4, 10, 64, dtype=torch.bfloat16)), ValueError,
     r"landmarks: expected shape \[B, H_kv, C, D\] with B = 2"),
    (dict(k=11), ValueError, r"k: expected 1 <= k <= C = 10 chunks, got 11"),
    (dict(k=0), ValueError, r"k: expected 1 <= k <= C = 10 chunks, got 0"),
    (dict(k=2.0), TypeError, r"k: expected an int, got float"),
    (dict(k=9, exclude=_exclude_all_but(8)), ValueError,
     r"k: 9 chunks requested but row \[1, 2\] has only 8 of C = 10 chunks left after exclude"),
    (dict(exclude=torch.zeros(2, 4, 10, dtype=torch.uint8)), TypeError, r"exclude: expected dtype bool, got uint8"),
    (dict(exclude=torch.zeros(2, 4, 9, dtype=torch.bool)), ValueError,
     r"exclude: expected shape \[B, H_kv, C\] = \(2, 4, 10\), got \(2, 4, 9\)"),
    (dict(exclude=torch.zeros(2, 4, 10, dtype=torch.bool, device="meta")), ValueError,
     r"exclude is on meta but q is on cpu"),
    (dict(out=torch.empty(2, 4, 3, dtype=torch.int32)), ValueError, r"out: expected shape \(2, 4, 3\), dtype int64"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_landmark_topk_bad_input_names_the_argument(launch_forbidden, change, error, fragment):
    kwargs = _good_topk() | change
    q, landmarks, k = kwargs.pop("q"), kwargs.pop("landmarks"), kwargs.pop("k")
    with pytest.raises(error, match=fragment):
        ops.landmark_topk(q, landmarks, k, **kwargs)


def test_landmark_topk_good_input_does_launch(launch_forbidden):
    """Guards the test above: the same call without the bad argument reaches the launcher."""
    good = _good_topk()
    with pytest.raises(AssertionError, match="launched despite bad input"):
        ops.landmark_topk(good["q"], good["landmarks"], good["k"], exclude=good["exclude"])


@pytest.mark.parametrize("k_rope, chunk_size, error, fragment", [
    (torch.zeros(2, 4, 64), 8, ValueError, r"k_rope: expected a 4-D tensor"),
    (torch.zeros(2, 4, 64, 8, dtype=torch.int32), 8, TypeError, r"k_rope: expected dtype float16"),
    (torch.zeros(2, 4, 64, 8), 0, ValueError, r"chunk_size: expected >= 1, got 0"),
    (torch.zeros(2, 4, 64, 8), 8.0, TypeError, r"chunk_size: expected an int"),
    (torch.zeros(2, 4, 5, 8), 8, ValueError, r"k_rope: S = 5 tokens is fewer than chunk_size = 8"),
], ids=["rank", "dtype", "chunk_size-0", "chunk_size-float", "S-too-short"])
def test_landmarks_bad_input_names_the_argument(k_rope, chunk_size, error, fragment):
    with pytest.raises(error, match=fragment):
        ops.landmarks(k_rope, chunk_size)


@pytest.mark.parametrize("landmarks, n, error, fragment", [
    (torch.zeros(2, 4, 8, 16), 9, ValueError, r"n: expected 0 <= n <= C = 8, got 9"),
    (torch.zeros(2, 4, 8, 16), -1, ValueError, r"n: expected 0 <= n <= C = 8, got -1"),
    (torch.zeros(2, 4, 7, 16), 1, ValueError, r"landmarks: expected shape \[B, H_kv, S // chunk_size, D\]"),
    (torch.zeros(2, 4, 8), 1, ValueError, r"landmarks: expected a 4-D tensor"),
    (torch.zeros(2, 4, 8, 16, dtype=torch.int64), 1, TypeError, r"landmarks: expected dtype"),
], ids=["n-above-C", "n-negative", "C-mismatch", "rank", "dtype"])
def test_outlier_chunks_bad_input_names_the_argument(landmarks, n, error, fragment):
    with pytest.raises(error, match=fragment):
        ops.outlier_chunks(torch.zeros(2, 4, 8 * 8 + 3, 16), landmarks, n)


# --- torch.compile -------------------------------------------------------------------------------

def test_compile_fullgraph_traces_every_op():
    def select(k_rope, q):
        landmarks = ops.landmarks(k_rope)
        outliers = ops.outlier_chunks(k_rope, landmarks, 2)
        exclude = torch.zeros(landmarks.shape[:3], dtype=torch.bool).scatter(2, outliers, True)
        return ops.landmark_topk(q, landmarks, 4, exclude=exclude)

    k_rope, q = randn(1, 2, 8 * 12 + 1, 64, seed=23), randn(1, 8, 64, seed=24)
    compiled = torch.compile(select, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(k_rope, q), select(k_rope, q))


# --- the search space -----------------------------------------------------------------------------

def test_default_narrows_for_large_groups_and_head_dims():
    """Beyond the shape sets: where a 64-chunk tile would not fit, BLOCK_C 16 does."""
    assert space.default_config((1, 32, 8, 4096, 128, 256), "float16")["BLOCK_C"] == 64
    for shape in [(1, 64, 1, 4096, 256, 256), (1, 128, 8, 100, 256, 10), (1, 256, 2, 100, 128, 10)]:
        config = space.default_config(shape, "float16")
        assert config["BLOCK_C"] == 16
        assert space.SPACE.infeasibility(config, shape, SMALLEST_SMEM) is None


def test_constraints_reject_what_a_gpu_cannot_run():
    shape = (1, 32, 8, 16384, 128, 256)
    sp = space.SPACE
    base = dict(space.DEFAULT_LONG)
    assert "shared memory" in sp.infeasibility(dict(base, BLOCK_C=256, num_stages=4), shape, SMALLEST_SMEM)
    assert "registers" in sp.infeasibility(dict(base, BLOCK_C=256, num_warps=2, num_stages=1), shape, H100_SMEM)
    assert "exceeds the padded number of chunks 64" in sp.infeasibility(
        dict(base, BLOCK_C=128, num_stages=1), (1, 32, 8, 63, 128, 8), SMALLEST_SMEM)
    assert "SPLIT_C=32 exceeds the 16 C tiles" in sp.infeasibility(dict(base, SPLIT_C=32), (1, 32, 8, 1024, 128, 8),
                                                                  SMALLEST_SMEM)
    for config in sp.sample(40, shape, SMALLEST_SMEM, seed=0):
        assert sp.infeasibility(config, shape, SMALLEST_SMEM) is None


def test_buckets_and_distance():
    assert space.bucket((8, 32, 8, 3000, 128, 256)) == (8, 32, 8, 4096, 128, 256)
    near, far = (8, 32, 8, 4096, 128, 256), (8, 32, 8, 16384, 128, 256)
    assert space.bucket_distance(near, far) == pytest.approx(2 - 0.25)
    assert space.bucket_distance(near, (8, 32, 8, 32768, 128, 256)) is None  # 3 doublings
    assert space.bucket_distance(near, (8, 32, 8, 4096, 128, 128)) is None  # another k
    assert space.bucket_distance(near, (1, 32, 8, 4096, 128, 256)) is None  # another batch
    # A tie between a smaller and a larger bucket goes to the larger.
    smaller, larger = (8, 32, 8, 2048, 128, 256), (8, 32, 8, 8192, 128, 256)
    assert space.bucket_distance(near, larger) < space.bucket_distance(near, smaller)


def test_bytes_dominate_and_scale_with_dtype():
    shape = (1, 32, 8, 16384, 128, 256)
    assert space.bytes_moved(shape, "bfloat16") > 32 * 2**20  # the landmarks: 8 * 16384 * 128 * 2 B
    assert space.bytes_moved(shape, "float32") > 1.9 * space.bytes_moved(shape, "bfloat16")
    assert space.flops(shape) / space.bytes_moved(shape, "bfloat16") < 10  # far below any GPU's ridge point
