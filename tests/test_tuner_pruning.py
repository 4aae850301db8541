"""The tuner spends its budget on distinct configs: a config tried once is never run again, a space
that fits the budget is enumerated, and configs the compiler refuses for the device are pruned
before they are launched (a fake compile check, and the real compiler for sm_90 on a tiny space).
Trials run in a scripted runner: nothing is launched, every timing is made up.
"""

import dataclasses
import importlib
import importlib.util

import optuna
import pytest

from kernelhub import registry
from doubling import doubling_family
from kernelhub.db import ConfigStore
from kernelhub.device import current_device
from kernelhub.kernels.int8_gemm.spec import SPEC as INT8
from kernelhub.space import SearchSpace
from kernelhub.tuning import tuner as tuner_module
from kernelhub.tuning.timing import Timing
from kernelhub.tuning.trial import TrialOutcome
from kernelhub.tuning.tuner import REPEAT_ATTR, Tuner, compile_check_for, study_storage

TEST_DEVICE = dataclasses.replace(current_device(), key="test-cpu")


class ScriptedRunner:
    """Runs nothing: each config takes 1 + (the sum of its values) / 100 ms. Records what it was asked to run."""

    def __init__(self):
        self.ran = []

    def run(self, spec, shape, dtype, config, seed) -> TrialOutcome:
        self.ran.append(dict(config))
        ms = 1 + sum(config.values()) / 100
        return TrialOutcome("complete", timing=Timing(ms, ms, ms))

    def close(self) -> None:
        pass


def _family(params, default, constraints=()):
    spec = doubling_family("test_pruning", SearchSpace(params, constraints=constraints), default, launch=None)
    return dataclasses.replace(spec, tunes_on_cpu=False)


def _tune(spec, n_trials, *, store=None, storage=None, runner=None, seed=0, lines=None, **kwargs):
    store = store or ConfigStore("sqlite://")
    tuner = Tuner(store, storage or study_storage("sqlite://"), TEST_DEVICE, seed=seed, allow_interpreter=True,
                  runner=runner or ScriptedRunner(),
                  progress=lines.append if lines is not None else lambda line: None, **kwargs)
    return tuner.tune(spec, (7,), "int32", n_trials=n_trials), store


def _study(storage):
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def _keys(configs):
    return [tuple(sorted(c.items())) for c in configs]


# -- repeats --------------------------------------------------------------------------------------

def test_three_configs_and_ten_trials_measure_each_once_and_end(monkeypatch):
    monkeypatch.setattr(tuner_module, "MAX_ENUMERATED_SPACE", 0)  # the sampler proposes: repeats happen
    spec = _family({"BLOCK": (16, 32, 64)}, {"BLOCK": 16})
    runner, storage, lines = ScriptedRunner(), study_storage("sqlite://"), []
    result, store = _tune(spec, 10, runner=runner, storage=storage, lines=lines)
    assert sorted(c["BLOCK"] for c in runner.ran) == [16, 32, 64]  # each once
    assert result.trials == 3 and result.best_config == {"BLOCK": 16}
    assert [t.config["BLOCK"] for t in store.trials()].count(16) == 1 and len(store.trials()) == 3
    trials = _study(storage).trials
    repeats = [t for t in trials if REPEAT_ATTR in t.user_attrs]
    assert len(repeats) == len(trials) - 3 >= tuner_module.MAX_REPEATS_IN_A_ROW
    by_number = {t.number: t for t in trials}
    for t in repeats:  # Optuna was told the recorded outcome again
        earlier = by_number[t.user_attrs[REPEAT_ATTR]]
        assert t.params == earlier.params and t.value == earlier.value and "state" not in t.user_attrs
    assert len(lines) == len(trials) + 1 and "done after 3 configs: the sampler proposed only configs" in lines[-1]
    assert all("config again, not run" in line for line in lines[-1 - len(repeats):-1])


def test_a_pruned_config_proposed_again_is_not_checked_again(monkeypatch):
    monkeypatch.setattr(tuner_module, "MAX_ENUMERATED_SPACE", 0)

    def no_wide(config, shape, smem):
        return "too wide" if config["BLOCK"] == 64 else None

    checked = []

    def compile_check(spec, shape, dtype, config):
        checked.append(config["BLOCK"])
        return "compiler: spills 176 B per thread" if config["BLOCK"] == 32 else None

    spec = _family({"BLOCK": (16, 32, 64, 128)}, {"BLOCK": 16}, constraints=(no_wide,))
    runner = ScriptedRunner()
    result, store = _tune(spec, 30, runner=runner, compile_check=compile_check)
    assert sorted(c["BLOCK"] for c in runner.ran) == [16, 128]
    assert sorted(checked) == [32, 128]  # once each; the DEFAULT and the infeasible config never
    states = {t.config["BLOCK"]: (t.state, t.reason) for t in store.trials()}
    assert states == {16: ("complete", None), 32: ("constraint", "compiler: spills 176 B per thread"),
                      64: ("constraint", "too wide"), 128: ("complete", None)}
    assert result.trials == 4


# -- enumeration ----------------------------------------------------------------------------------

def _odd_sum_is_infeasible(config, shape, smem):
    return "odd" if (config["A"] + config["B"]) % 2 else None


ENUMERABLE = {"A": (1, 2, 3, 4), "B": (1, 2, 3)}  # 12 combinations, 6 feasible


def test_a_space_that_fits_the_budget_is_enumerated_default_first():
    spec = _family(ENUMERABLE, {"A": 2, "B": 1}, constraints=(_odd_sum_is_infeasible,))  # an infeasible DEFAULT
    runner, lines = ScriptedRunner(), []
    result, store = _tune(spec, 10, runner=runner, lines=lines)
    feasible = [c for c in spec.space.configs() if _odd_sum_is_infeasible(c, None, 0) is None]
    assert runner.ran == [{"A": 2, "B": 1}, *feasible]  # nothing infeasible proposed, nothing twice
    assert result.trials == 7 and [t.number for t in store.trials()] == list(range(7))
    assert "trial 7/7" in lines[-2] and "every config the constraints accept was tried (7)" in lines[-1]


def test_a_larger_budget_on_a_rerun_enumerates_what_is_left(private_config_db):
    spec = _family(ENUMERABLE, {"A": 1, "B": 1}, constraints=(_odd_sum_is_infeasible,))
    store, storage = ConfigStore(private_config_db), study_storage(private_config_db)
    first = ScriptedRunner()
    assert _tune(spec, 3, runner=first, store=store, storage=storage, seed=4)[0].trials == 3  # sampled
    second = ScriptedRunner()
    result, _ = _tune(spec, 50, runner=second, store=store, storage=storage, seed=4)
    assert sorted(_keys(first.ran + second.ran)) == sorted(_keys(spec.space.feasible((7,), 0)))  # each once
    assert result.trials == len(store.trials()) >= 6  # and any infeasible config the first run sampled
    assert _tune(spec, 50, runner=ScriptedRunner(), store=store, storage=storage)[0].trials == result.trials


# -- compile pruning ------------------------------------------------------------------------------

def test_configs_the_compiler_refuses_are_constraints_never_launched():
    refusals = {32: "compiler: int8_gemm_kernel spills 176 B per thread to local memory (255 registers)",
                64: "compiler: int8_gemm_kernel: needs 122880 B of shared memory per block, sm_86 allows 101376 B"}
    checked = []

    def compile_check(spec, shape, dtype, config):
        checked.append(config["BLOCK"])
        return refusals.get(config["BLOCK"])

    spec = _family({"BLOCK": (16, 32, 64, 128)}, {"BLOCK": 32})  # a DEFAULT the fake compiler refuses
    runner, storage = ScriptedRunner(), study_storage("sqlite://")
    result, store = _tune(spec, 4, runner=runner, storage=storage, compile_check=compile_check)
    assert runner.ran == [{"BLOCK": 32}, {"BLOCK": 16}, {"BLOCK": 128}]  # the DEFAULT is always measured
    assert checked == [16, 64, 128]
    (pruned,) = [t for t in store.trials() if t.state == "constraint"]
    assert pruned.config == {"BLOCK": 64} and pruned.reason == refusals[64] and pruned.median_ms is None
    (told,) = [t for t in _study(storage).trials if t.params == {"BLOCK": 64}]
    assert told.state == optuna.trial.TrialState.COMPLETE and told.value == tuner_module.FAILED_TRIAL_VALUE
    assert result.best_config == {"BLOCK": 16}


def test_collective_families_get_no_compile_check():
    def compile_check(*args):
        raise AssertionError("a collective family was compile-checked")

    spec = dataclasses.replace(_family({"BLOCK": (16, 32)}, {"BLOCK": 16}), world_size=lambda shape: 2)
    assert _tune(spec, 2, compile_check=compile_check)[0].trials == 2


def test_a_compile_check_that_cannot_run_leaves_a_note_and_is_turned_off():
    calls = []

    def broken_check(spec, shape, dtype, config):
        calls.append(config)
        raise RuntimeError("compile worker gone")

    spec = _family({"BLOCK": (16, 32, 64, 128, 256)}, {"BLOCK": 16})
    runner, lines = ScriptedRunner(), []
    result, store = _tune(spec, 5, runner=runner, lines=lines, compile_check=broken_check)
    assert result.trials == 5 and len(runner.ran) == 5  # every config timed as before
    assert len(calls) == tuner_module.MAX_COMPILE_CHECK_FAILURES
    noted = [t for t in store.trials() if t.reason]
    assert len(noted) == len(calls) and all(t.state == "complete" for t in noted)
    assert all(t.reason == "not compile-checked: RuntimeError: compile worker gone" for t in noted)
    assert any(line.startswith("compile check off for the rest of this run") for line in lines)


@pytest.fixture
def faults(monkeypatch):
    """tests/fault_families.py, registered here and (through KERNELHUB_FAMILIES) in the compile workers."""
    monkeypatch.setenv("KERNELHUB_FAMILIES", "fault_families")
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    module = importlib.import_module("fault_families")
    registry.register(module.FAULTY)
    return module


def test_a_compile_process_that_dies_does_not_stop_tuning(faults):
    """The real compile pool: capturing the SEGFAULT config kills its compile process (the runner,
    scripted, runs nothing); that config is timed with a note, and the next check gets a new process."""
    from kernelhub.compiler import ConfigCheck

    spec = dataclasses.replace(faults.FAULTY, space=SearchSpace({"FAULT": (faults.NONE, faults.SEGFAULT,
                                                                            faults.WRONG)}))
    runner = ScriptedRunner()
    with ConfigCheck("sm_90", timeout=60) as check:
        result, store = _tune(spec, 3, runner=runner, compile_check=check)
    assert result.trials == 3 and len(runner.ran) == 3
    reasons = {t.config["FAULT"]: t.reason for t in store.trials()}
    assert reasons[faults.SEGFAULT] == ("not compile-checked: CompileCheckError: capture: the compiler process "
                                        "killed by SIGSEGV")
    assert reasons[faults.WRONG] is None  # checked by a fresh process: it compiles no Triton kernel


@pytest.mark.parametrize("vendor, capability, arch", [("nvidia", "9.0", "sm_90"), ("nvidia", "8.6", "sm_86"),
                                                     ("nvidia", "7.0", None), ("amd", "9.4", None),
                                                     ("cpu", None, None)])
def test_the_compile_target_is_the_devices(vendor, capability, arch):
    device = dataclasses.replace(TEST_DEVICE, vendor=vendor, compute_capability=capability)
    check = compile_check_for(device)
    try:
        assert (check.target.arch if check is not None else None) == arch
    finally:
        if check is not None:
            check.close()


# -- the real compiler ----------------------------------------------------------------------------

CLEAN = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "SPLIT_K": 1, "num_warps": 2, "num_stages": 2}
SPILLS = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 256, "GROUP_M": 1, "SPLIT_K": 2, "num_warps": 4,
          "num_stages": 2}  # within the space's constraints (128 accumulator registers per thread, 128 KiB)


def test_the_real_compiler_for_sm_90_prunes_a_config_that_spills():
    """int8_gemm at a Llama-3-8B shape, on a space of its DEFAULT and two more configs; the compiler
    builds for real (a few seconds the first time, then from the compile cache)."""
    from kernelhub.compiler import ConfigCheck

    shape = (128, 4096, 4096)
    default = INT8.default_config(shape, "int32")
    chosen = [default, CLEAN, SPILLS]
    params = {name: tuple(dict.fromkeys(c[name] for c in chosen)) for name in INT8.space.params}

    def only_chosen(config, shape, smem):
        return None if config in chosen else "not one of the chosen"

    spec = dataclasses.replace(INT8, space=SearchSpace(params, constraints=(only_chosen,)))
    runner, store = ScriptedRunner(), ConfigStore("sqlite://")
    with ConfigCheck("sm_90") as check:
        Tuner(store, study_storage("sqlite://"), TEST_DEVICE, allow_interpreter=True, runner=runner,
              progress=lambda line: None, compile_check=check).tune(spec, shape, "int32", n_trials=3)
    assert runner.ran == [default, CLEAN]
    (pruned,) = [t for t in store.trials() if t.state == "constraint"]
    assert pruned.config == SPILLS
    assert pruned.reason.startswith("compiler: int8_gemm_kernel spills ")
    assert "B per thread to local memory" in pruned.reason


def test_the_pruning_benchmark_counts_launches_and_prunings():
    """benchmarks/cpu_compile_pruning.py on a short study, with a fake compile check."""
    import sys
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    if str(benchmarks) not in sys.path:  # the script imports its sibling `report`, as when run directly
        sys.path.insert(0, str(benchmarks))
    spec = importlib.util.spec_from_file_location("cpu_compile_pruning", benchmarks / "cpu_compile_pruning.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def refuse_wide_tiles(spec, shape, dtype, config):
        return "compiler: int8_gemm_kernel spills 8 B per thread to local memory (255 registers)" \
            if config["BLOCK_N"] >= 128 else None

    row = script.run_study((128, 4096, 4096), 12, 0, compile_check=refuse_wide_tiles)
    assert row["tried"] == 12 == row["launched"] + row["by constraints"] + row["by compiler"]
    assert row["by compiler"] == len(row["_reasons"]) > 0
    assert all(c["BLOCK_N"] < 128 for c in row["_launched"] if c != row["_default"])
    assert script.refused_launches(row, refuse_wide_tiles) == []


def test_kernelhub_tune_prunes_with_the_compiler_on_an_nvidia_gpu_only(capsys):
    from kernelhub import cli

    h100 = dataclasses.replace(TEST_DEVICE, key="h100", name="NVIDIA H100 80GB HBM3", vendor="nvidia",
                               compute_capability="9.0")
    check = cli._compile_check(h100, 60.0, wanted=True)
    try:
        assert check.target.arch == "sm_90"
        assert "compile check: every config is compiled for sm_90" in capsys.readouterr().out
    finally:
        check.close()
    assert cli._compile_check(h100, 60.0, wanted=False) is None
    assert cli.build_parser().parse_args(["tune", "--no-compile-check"]).no_compile_check
    assert cli._compile_check(TEST_DEVICE, 60.0, wanted=True) is None and capsys.readouterr().out == ""
    old = dataclasses.replace(h100, key="v100", compute_capability="7.0")
    assert cli._compile_check(old, 60.0, wanted=True) is None
    assert "no compile check: kernelhub.compiler has no target for v100" in capsys.readouterr().out
