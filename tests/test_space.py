"""`kernelhub.space.SearchSpace`, and what the int8 GEMM space adds to the contract suite's checks
(tests/test_contract.py): its constraints' reasons and its nearest-bucket rule."""

import pytest

from helpers import H100_SMEM_BYTES as H100_SMEM
from helpers import SMALLEST_SMEM_BYTES as SMALLEST_SMEM
from kernelhub.errors import InvalidConfigError
from kernelhub.kernels.int8_gemm import space as int8_space
from kernelhub.space import SearchSpace


def _small_space():
    def even_sum(config, shape, smem):
        return None if (config["A"] + config["B"]) % 2 == 0 else "A + B is odd"

    return SearchSpace(params={"A": (1, 2, 3), "B": (1, 2)}, constraints=(even_sum,))


def test_validate_accepts_members_and_returns_clean_copy():
    config = {"A": 3, "B": 1}
    clean = _small_space().validate(config)
    assert clean == config and clean is not config


@pytest.mark.parametrize("config, fragment", [
    ({"A": 1}, "missing keys ['B']"),
    ({"A": 1, "B": 1, "C": 0}, "unknown keys ['C']"),
    ({"A": 4, "B": 1}, "A=4 is not one of [1, 2, 3]"),
    ({"A": "1", "B": 1}, "A='1'"),
    ({"A": True, "B": 1}, "A=True"),
    ({"A": 1.0, "B": 1}, "A=1.0"),
    ([1, 2], "expected a mapping"),
], ids=["missing", "unknown", "out-of-choices", "string", "bool", "float", "not-a-dict"])
def test_validate_rejects_with_reason(config, fragment):
    with pytest.raises(InvalidConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        _small_space().validate(config, source="row 7")


def test_constraints_feasible_and_sample():
    space = _small_space()
    assert space.infeasibility({"A": 2, "B": 1}, (), 0) == "A + B is odd"
    feasible = space.feasible((), 0)
    assert feasible == [{"A": 1, "B": 1}, {"A": 2, "B": 2}, {"A": 3, "B": 1}]
    assert space.sample(2, (), 0, seed=1) == space.sample(2, (), 0, seed=1)
    assert len(space.sample(10, (), 0)) == 3
    assert all(c in feasible for c in space.sample(2, (), 0, seed=5))


def test_fingerprint_tracks_choices():
    assert _small_space().fingerprint() == _small_space().fingerprint()
    other = SearchSpace(params={"A": (1, 2, 3, 4), "B": (1, 2)}, constraints=_small_space().constraints)
    assert other.fingerprint() != _small_space().fingerprint()


# -- the int8 GEMM space ------------------------------------------------------------------------

def test_int8_constraints_reject_what_a_gpu_cannot_run():
    space = int8_space.SPACE
    big = dict(int8_space.DEFAULT_LARGE_M, BLOCK_M=256, BLOCK_N=256, BLOCK_K=256, num_stages=5, num_warps=8)
    assert "shared memory" in space.infeasibility(big, (8192, 8192, 8192), H100_SMEM)
    spill = dict(int8_space.DEFAULT_LARGE_M, BLOCK_M=256, BLOCK_N=256, BLOCK_K=32, num_stages=2, num_warps=4)
    assert "registers" in space.infeasibility(spill, (8192, 8192, 8192), H100_SMEM)
    wide = dict(int8_space.DEFAULT_LARGE_M)
    assert "exceeds the padded problem size" in space.infeasibility(wide, (1, 4096, 4096), H100_SMEM)
    split = dict(int8_space.DEFAULT_SMALL_M, SPLIT_K=16)
    assert "K tiles" in space.infeasibility(split, (1, 4096, 256), H100_SMEM)
    # Every sampled config is feasible and BLOCK_K is never below the int8 dot minimum.
    for config in space.sample(50, (257, 65, 63), SMALLEST_SMEM, seed=0):
        assert space.infeasibility(config, (257, 65, 63), SMALLEST_SMEM) is None
        assert config["BLOCK_K"] >= 32


def test_int8_buckets_and_distance():
    assert int8_space.bucket((7, 4096, 4096)) == (8, 4096, 4096)
    assert int8_space.bucket((129, 6144, 4096)) == (256, 6144, 4096)
    d = int8_space.bucket_distance
    assert d((128, 4096, 4096), (128, 4096, 14336)) is None  # other K: never reused
    assert d((128, 4096, 4096), (1024, 4096, 4096)) is None  # 3 doublings: too far
    # equal distance: the larger M wins (smaller score)
    assert d((128, 4096, 4096), (256, 4096, 4096)) < d((128, 4096, 4096), (64, 4096, 4096))
    assert d((128, 4096, 4096), (64, 4096, 4096)) < d((128, 4096, 4096), (512, 4096, 4096))
