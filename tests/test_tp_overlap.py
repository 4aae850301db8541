"""Tensor-parallel overlap (Flux): the chunk GEMM in the interpreter, the collectives on local gloo
ranks, beyond the contract suite (tests/test_contract.py runs every DEFAULT at the smoke shapes).

Collective inputs are small integers, so the reference, the overlapped schedules (every chunking
and order), the Triton chunk GEMM and world size 1 must all agree exactly (atol = 0). Each world
size gets one set of local ranks for the whole module (starting ranks costs seconds).
"""

import pytest
import torch

import kernelhub.ops as ops
import tp_overlap_cases as cases
from helpers import local_worlds as worlds  # noqa: F401
from kernelhub.checking import poison_
from kernelhub.db import BestConfig, ConfigStore
from kernelhub.device import current_device
from kernelhub.kernels.tp_overlap.all_gather_space import ORDER_CHOICES
from kernelhub.kernels.tp_overlap.kernel import gemm_triton
from kernelhub.kernels.tp_overlap.overlap import chunk_bounds
from kernelhub.kernels.tp_overlap.space import CHUNK_CHOICES
from kernelhub.kernels.tp_overlap.spec import AG_SPEC, GEMM_SPEC, RS_SPEC
from kernelhub.local_world import LocalWorld, LocalWorldError
from kernelhub.reference import tp_overlap as ref

# -- the chunk GEMM (one process, Triton's interpreter) -----------------------------------------

GEMM_SHAPES = [(1, 1, 1), (7, 63, 33), (63, 17, 129), (129, 40, 16)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunk_gemm_matches_reference_into_a_row_slice(shape, dtype):
    """The chunk GEMM writes exactly its rows of a larger output (as the schedules use it)."""
    m, n, k = shape
    inputs = GEMM_SPEC.make_inputs(shape, dtype, "cpu", seed=m + n)
    big = poison_(torch.empty(m + 5, n, dtype=inputs["a"].dtype))
    target = big[2:2 + m]
    config = GEMM_SPEC.default_config(shape, dtype)
    gemm_triton(inputs["a"], inputs["b"], config=config, out=target)
    assert GEMM_SPEC.compare(target, ref.gemm(inputs["a"], inputs["b"]), inputs) is None
    assert big[:2].isnan().all() and big[2 + m:].isnan().all()  # nothing outside its rows written


def test_chunk_gemm_sampled_configs_match_reference():
    shape = (33, 65, 70)
    for config in GEMM_SPEC.space.sample(4, shape, current_device().shared_memory_bytes, seed=1):
        inputs = GEMM_SPEC.make_inputs(shape, "float32", "cpu", seed=3)
        out = poison_(GEMM_SPEC.new_output(inputs))
        assert GEMM_SPEC.compare(GEMM_SPEC.launch(inputs, config, out), GEMM_SPEC.reference(inputs), inputs) is None, config


@pytest.mark.parametrize("rows,chunks", [(1, 1), (1, 8), (7, 2), (8, 8), (9, 4), (130, 8)])
def test_chunk_bounds_cover_rows_in_near_equal_nonempty_pieces(rows, chunks):
    bounds = chunk_bounds(rows, chunks)
    assert len(bounds) == min(rows, chunks)
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(lo < hi for lo, hi in bounds) and all(b[1] == c[0] for b, c in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_spaces_reject_configs_that_cannot_differ():
    assert "exceeds the 3 rows" in AG_SPEC.space.infeasibility({"CHUNKS": 4, "ORDER": 0}, (2, 3, 8, 8), 0)
    assert "same schedule" in AG_SPEC.space.infeasibility({"CHUNKS": 2, "ORDER": 1}, (2, 8, 8, 8), 0)
    assert AG_SPEC.space.infeasibility({"CHUNKS": 2, "ORDER": 1}, (3, 8, 8, 8), 0) is None
    assert "exceeds the 2 rows" in RS_SPEC.space.infeasibility({"CHUNKS": 4}, (4, 8, 8, 8), 0)


def test_ops_without_a_process_group_say_so():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        ops.all_gather_gemm(torch.ones(2, 3), torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="init_process_group"):
        ops.gemm_reduce_scatter(torch.ones(2, 3), torch.ones(3, 4))


# -- the collectives on local ranks (`worlds`: the helpers' local_worlds) --------------------------

def _cases(world_size, dtype):
    """Every chunking and order of both ops at odd sizes (M_local, N never a block multiple), plus the public ops."""
    ag = [("all_gather_gemm", m, n, k, dtype, config)
          for m, n, k in [(1, 13, 24), (7, 33, 17)]
          for config in [None, *({"CHUNKS": c, "ORDER": o} for c in CHUNK_CHOICES for o in ORDER_CHOICES)]
          if config is None or AG_SPEC.space.infeasibility(config, (world_size, m, n, k), 0) is None]
    rs = [("gemm_reduce_scatter", world_size * m, n, k, dtype, config)
          for m, n, k in [(1, 13, 24), (5, 33, 17)]
          for config in [None, *({"CHUNKS": c} for c in CHUNK_CHOICES)]
          if config is None or RS_SPEC.space.infeasibility(config, (world_size, world_size * m, n, k), 0) is None]
    return ag + rs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_overlapped_equals_reference_exactly(worlds, world_size, dtype):
    failures = worlds(world_size).run(cases.exact_cases, _cases(world_size, dtype))
    assert failures == [[]] * world_size


@pytest.mark.parametrize("world_size", [2, 3])
def test_triton_chunk_gemm_inside_the_schedules_is_exact(worlds, world_size):
    chosen = [c for c in _cases(world_size, "bfloat16") if c[-1] is None or c[-1]["CHUNKS"] == 2]
    assert chosen
    failures = worlds(world_size).run(cases.exact_cases, chosen, "triton")
    assert failures == [[]] * world_size



def _list_cases(world_size, dtype):
    """all_gather_gemm with a list of b (odd widths, a width-1 b) under every feasible chunking and
    order, plus the public op (config None)."""
    return [(m, widths, k, dtype, config)
            for m, widths, k in [(1, (13, 1), 24), (7, (33, 5, 17), 17)]
            for config in [None, *({"CHUNKS": c, "ORDER": o} for c in CHUNK_CHOICES for o in ORDER_CHOICES)]
            if config is None or AG_SPEC.space.infeasibility(config, (world_size, m, sum(widths), k), 0) is None]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_list_of_b_shares_one_gather_and_equals_reference(worlds, world_size, dtype):
    assert worlds(world_size).run(cases.list_cases, _list_cases(world_size, dtype)) == [[]] * world_size


def test_list_of_b_with_the_triton_chunk_gemm(worlds):
    chosen = [c for c in _list_cases(2, "bfloat16") if c[-1] is None or c[-1]["CHUNKS"] == 2]
    assert worlds(2).run(cases.list_cases, chosen, "triton") == [[], []]


def test_list_of_b_reference_backend(worlds):
    chosen = [c for c in _list_cases(3, "float32") if c[-1] is None]
    assert worlds(3).run(cases.list_cases, chosen, "reference") == [[]] * 3


def test_list_of_b_errors_name_the_element(worlds):
    expected = [
        "TypeError: b[1]: expected dtype float32, got bfloat16",
        "ValueError: b[1]: expected shape [K, N] with K = a.shape[1] = 8, got (7, 4)",
        "ValueError: b: expected a [K, N] tensor or a non-empty list of them, got an empty list",
        "TypeError: b[1]: expected a torch.Tensor, got str",
        "TypeError: out: b is a list, so out must be a list of 2 tensors, got Tensor",
        "ValueError: out: expected 2 tensors, one per b[i], got 1",
        "ValueError: out[1]: expected shape (6, 4), dtype float32, device cpu; got (6, 5), float32, cpu",
        "ValueError: out[1]: overlaps out[0] in memory: each output needs its own memory",
    ]
    assert worlds(2).run(cases.list_argument_errors) == [expected, expected]
    for error in worlds(2).run(cases.list_differs_by_rank):
        assert error == ("ValueError: all_gather_gemm: every rank must pass the same shapes and dtype, got "
                         "rank 0: a [3, 8], b 2 matrices [8, N_i] with N_i summing to 9, float32; "
                         "rank 1: a [3, 8], b [8, 9], float32"), error
    assert worlds(2).run(cases.list_cases, [(3, (5, 4), 8, "float32", None)]) == [[], []]  # still in step


def test_list_of_b_world_size_one(worlds):
    assert worlds(1).run(cases.list_world_size_one) == [True]


def test_world_size_one_is_a_plain_gemm(worlds):
    assert worlds(1).run(cases.world_size_one) == [True]


def test_no_deprecated_collective_is_called(worlds):
    """torch 2.13 warns for all_gather_into_tensor / reduce_scatter_tensor: the ops and the
    references use the names it prefers (reference.tp_overlap.all_gather_single, ...)."""
    assert worlds(2).run(cases.future_warnings) == [[], []]


def test_shapes_that_differ_across_ranks_are_an_error_on_every_rank(worlds):
    errors = worlds(2).run(cases.shapes_differ_by_rank)
    for error in errors:
        assert error.startswith("ValueError: all_gather_gemm: every rank must pass the same shapes"), error
        assert "rank 0: a [3, 8]" in error and "rank 1: a [4, 8]" in error


def test_one_rank_with_bad_arguments_fails_every_rank_without_a_hang(worlds):
    errors = worlds(3).run(cases.bad_dtype_on_last_rank)
    assert errors[2] == "TypeError: a: expected dtype float32 or float16 or bfloat16, got int32"
    for error in errors[:2]:
        assert error.startswith("CollectiveError: gemm_reduce_scatter: rank(s) [2] rejected their arguments"), error
    assert worlds(3).run(cases.both_ops_after_errors) == [True] * 3  # the group is still usable


def test_rows_not_divisible_by_world_size(worlds):
    for error in worlds(2).run(cases.rows_not_divisible):
        assert error == "ValueError: a: M = 3 is not divisible by the world size 2"


def test_ranks_use_rank_zeros_config_when_their_databases_differ(worlds, tmp_path):
    """Rank 1's database says CHUNKS=8 for these shapes, rank 0's has nothing (DEFAULT: 2 chunks).

    If each rank used its own, they would send different chunks (garbage or a hang)."""
    identity = current_device()
    urls = [f"sqlite:///{tmp_path / 'rank0.sqlite'}", f"sqlite:///{tmp_path / 'rank1.sqlite'}"]
    with ConfigStore(urls[1]) as store:
        for spec, shape in ((AG_SPEC, (2, 9, 7, 12)), (RS_SPEC, (2, 18, 7, 12))):
            config = dict(spec.default_config(shape, "float32"), CHUNKS=8)
            store.save_best(BestConfig(
                gpu_key=identity.key, family=spec.name, bucket=spec.format_shape(spec.bucket(shape)),
                dtype="float32", config=config, median_ms=1.0, p20_ms=1.0, p80_ms=1.0, throughput=None,
                throughput_unit=None, default_median_ms=2.0, trials=1, kernel_version=spec.kernel_version,
                triton_version=identity.triton_version, torch_version=identity.torch_version,
                cuda_version=identity.cuda_version, device=identity.to_dict()))
    assert worlds(2).run(cases.different_config_databases, urls) == [True, True]


def test_straggler_rank_changes_nothing(worlds):
    chosen = [c for c in _cases(3, "float32") if c[-1] is not None and c[-1]["CHUNKS"] in (1, 4)]
    assert worlds(3).run(cases.with_straggler, chosen, 0.02) == [[]] * 3


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_failing_rank_gives_the_others_an_error_not_a_hang(how):
    with LocalWorld(2, group_timeout_s=3, job_timeout_s=60) as world:
        if how == "raise":
            results = world.run(cases.one_rank_fails_mid_op, how)
        else:
            with pytest.raises(LocalWorldError) as info:
                world.run(cases.one_rank_fails_mid_op, how)
            assert "exited with code 3" in info.value.failures[1] or "died" in info.value.failures[1]
            results = [info.value.results[0], None]
    assert results[0].startswith("CollectiveError: all_gather_gemm: rank 0 exchanging row chunk"), results[0]
    seconds = float(results[0].rsplit(" after ", 1)[1].split()[0])
    assert seconds < 30  # the group timeout (3 s) or a closed connection, never a hang
    if how == "raise":
        assert results[1].startswith("RuntimeError: injected failure on rank 1")


# -- check and tune through the CLI (local ranks) -------------------------------------------------

def test_cli_check_runs_collectives_on_local_ranks(capsys):
    from kernelhub import cli

    assert cli.main(["check", "--kernel", "gemm_reduce_scatter", "--configs", "1"]) == 0
    out = capsys.readouterr().out
    smem = current_device().shared_memory_bytes
    runs = len(RS_SPEC.dtypes) * sum(
        len({str(c) for c in [*RS_SPEC.defaults, *RS_SPEC.space.sample(1, shape, smem, seed=0)]})
        for shape in RS_SPEC.shapes("smoke"))
    assert f"gemm_reduce_scatter: {runs} runs against the reference, all match" in out


def test_cli_tunes_a_collective_on_the_cpu_and_ops_use_the_winner(capsys, tmp_path, monkeypatch):
    from kernelhub import cli, configs

    url = f"sqlite:///{tmp_path / 'tune.sqlite'}"
    argv = ["tune", "--gpu", "cpu", "--kernel", "all_gather_gemm", "--shapes", "smoke", "--world-size", "2",
            "--dtype", "float32", "--trials", "3", "--db", url]
    assert cli.main(argv) == 0
    shapes = {(2, *shape[1:]) for shape in AG_SPEC.shapes("smoke")}
    with ConfigStore(url) as store:
        rows = store.best_configs(gpu_key="cpu", family="all_gather_gemm")
    assert {row.bucket for row in rows} == {AG_SPEC.format_shape(AG_SPEC.bucket(s)) for s in shapes}
    monkeypatch.setenv("KERNELHUB_DB", url)
    configs.clear_cache()
    # Three trials per shape, or every config the shape allows when they are fewer (the tuner
    # enumerates a space that small instead of sampling it, and never times a config twice).
    expected_trials = {}
    for shape in shapes:
        default = AG_SPEC.default_config(shape, "float32")
        distinct = [default] + [c for c in AG_SPEC.space.feasible(shape, 0) if c != default]
        expected_trials[AG_SPEC.format_shape(AG_SPEC.bucket(shape))] = min(3, len(distinct))
    for row in rows:
        bucket = AG_SPEC.parse_shape(row.bucket)
        assert row.trials == expected_trials[row.bucket] and row.median_ms > 0 and row.default_median_ms > 0
        assert configs.best_config(AG_SPEC, bucket, "float32", current_device()) == row.config


def test_cli_tune_refuses_a_world_of_no_ranks(capsys, tmp_path):
    from kernelhub import cli

    url = f"sqlite:///{tmp_path / 'tune.sqlite'}"
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error, before anything starts
        cli.main(["tune", "--gpu", "cpu", "--kernel", "all_gather_gemm", "--world-size", "0", "--db", url])
    assert exit_.value.code == 2
    assert "argument --world-size: expected an integer of at least 1, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "tune.sqlite").exists()
