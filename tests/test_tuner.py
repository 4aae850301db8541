"""The tuner's mechanics, in the Triton interpreter under a test key (timings are meaningless)."""

import dataclasses
from pathlib import Path

import optuna
import pytest
import torch

from kernelhub.checking import mismatch_exact
from kernelhub.db import BestConfig, ConfigStore
from kernelhub.device import current_device
from kernelhub.errors import KernelhubError
from kernelhub.kernels.int8_gemm.spec import SPEC as INT8
from kernelhub.registry import FamilySpec
from kernelhub.space import SearchSpace
from kernelhub.tuning.tuner import REPEAT_ATTR, Tuner, study_storage

TEST_DEVICE = dataclasses.replace(current_device(), key="test-cpu")


def _tuner(url, **kwargs):
    return Tuner(ConfigStore(url), study_storage(url), TEST_DEVICE, allow_interpreter=True,
                 progress=kwargs.pop("progress", lambda line: None), **kwargs)


def _doubling_family() -> FamilySpec:
    """A test-only family: out = 2 * x, computed wrongly whenever BROKEN=1."""

    def launch(inputs, config, out):
        out.copy_(inputs["x"] * (3 if config["BROKEN"] else 2))
        return out

    return FamilySpec(
        name="test_doubling", summary="test only", shape_names=("N",), dtypes=("int32",),
        space=SearchSpace(params={"BLOCK": (16, 32, 64, 128), "BROKEN": (0, 1)}),
        default_config=lambda shape, dtype: {"BLOCK": 16, "BROKEN": 0}, defaults=({"BLOCK": 16, "BROKEN": 0},),
        make_inputs=lambda shape, dtype, device, seed: {
            "x": torch.randint(1, 100, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32)},
        reference=lambda inputs: inputs["x"] * 2, launch=launch,
        new_output=lambda inputs: torch.empty_like(inputs["x"]),
        compare=lambda actual, expected, inputs: mismatch_exact(actual, expected),
        shape_sets={"smoke": [(7,)], "tune": [(7,)], "bench": [(7,)]},
        bucket=lambda shape: shape, bucket_distance=lambda a, b: None,
        flops=lambda shape: 0, bytes_moved=lambda shape, dtype: 8 * shape[0],
        source_files=(Path(__file__),),
    )


def test_refuses_interpreter_timings_by_default(private_config_db):
    tuner = Tuner(ConfigStore(private_config_db), study_storage(private_config_db), current_device())
    with pytest.raises(KernelhubError, match="refusing to tune int8_gemm on cpu"):
        tuner.tune(INT8, (7, 33, 40), "int32", n_trials=1)


def test_short_int8_study_records_best_default_and_trials(private_config_db):
    shape, lines = (7, 33, 40), []
    result = _tuner(private_config_db, progress=lines.append).tune(INT8, shape, "int32", n_trials=4)
    assert result.trials == 4 and result.best_config is not None
    assert result.default is not None  # the DEFAULT ran first, so the speedup is on record
    assert len(lines) == 4 and "trial 4/4" in lines[-1] and "vs default" in lines[-1]
    with ConfigStore(private_config_db) as store:
        (best,) = store.best_configs(gpu_key="test-cpu")
        trials = store.trials(gpu_key="test-cpu")
    assert best.bucket == "M=8,N=33,K=40" and best.config == result.best_config
    assert best.default_median_ms == result.default.median_ms and best.trials == 4
    assert best.kernel_version == INT8.kernel_version
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert trials[0].config == INT8.default_config(shape, "int32") and trials[0].state == "complete"
    for t in trials:
        if t.state == "constraint":
            assert t.reason and t.median_ms is None
    completed = [t for t in trials if t.state == "complete"]
    assert best.median_ms == min(t.median_ms for t in completed)


def test_wrong_configs_fail_and_never_win(private_config_db):
    spec = _doubling_family()
    result = _tuner(private_config_db, seed=3).tune(spec, (7,), "int32", n_trials=12)
    with ConfigStore(private_config_db) as store:
        trials = store.trials(family="test_doubling")
    failed = [t for t in trials if t.state == "mismatch"]
    assert failed and all(t.config["BROKEN"] == 1 for t in failed)
    assert all("differ" in t.reason for t in failed)
    assert all(t.config["BROKEN"] == 0 for t in trials if t.state == "complete")
    assert result.best_config["BROKEN"] == 0


def test_a_failed_default_is_never_the_baseline_of_the_speedup(private_config_db):
    spec = dataclasses.replace(_doubling_family(), default_config=lambda shape, dtype: {"BLOCK": 16, "BROKEN": 1})
    lines = []
    result = _tuner(private_config_db, seed=3, progress=lines.append).tune(spec, (7,), "int32", n_trials=8)
    with ConfigStore(private_config_db) as store:
        (best,) = store.best_configs(family="test_doubling")
        first = store.trials(family="test_doubling")[0]
    assert first.config == {"BLOCK": 16, "BROKEN": 1} and first.state == "mismatch"
    assert result.default is None and result.speedup is None and best.default_median_ms is None
    assert result.best_config["BROKEN"] == 0 and not any("vs default" in line for line in lines)


def test_rerun_resumes_the_same_study(private_config_db):
    spec = _doubling_family()
    first = _tuner(private_config_db, seed=1).tune(spec, (7,), "int32", n_trials=3)
    with ConfigStore(private_config_db) as store:
        before = {t.number: t for t in store.trials(family="test_doubling")}
    second = _tuner(private_config_db, seed=1).tune(spec, (7,), "int32", n_trials=5)
    assert (first.trials, second.trials) == (3, 5)
    with ConfigStore(private_config_db) as store:
        after = {t.number: t for t in store.trials(family="test_doubling")}
        (best,) = store.best_configs(family="test_doubling")
    assert len(after) == 5 and len({tuple(t.config.values()) for t in after.values()}) == 5  # 5 configs, once each
    for number, trial in before.items():  # finished trials were kept, not measured again
        assert after[number].created_at == trial.created_at and after[number].median_ms == trial.median_ms
    completed = [t.median_ms for t in after.values() if t.state == "complete"]
    assert best.median_ms == min(completed) and best.trials == 5
    # A third run with the same budget has nothing left to do.
    assert _tuner(private_config_db, seed=1).tune(spec, (7,), "int32", n_trials=5).trials == 5


def test_a_queued_copy_of_a_tried_config_is_answered_not_left_waiting(private_config_db):
    """What a worker that opened the study with others can leave: the DEFAULT queued again after
    the study tried it (Optuna's check for a queued copy and the enqueue are not one step)."""
    spec, tuner = _doubling_family(), _tuner(private_config_db, seed=1)
    first = tuner.tune(spec, (7,), "int32", n_trials=3)
    study = optuna.load_study(study_name=tuner.study_name(spec, (7,), "int32"), storage=tuner.storage)
    default = spec.default_config((7,), "int32")
    study.enqueue_trial(default)
    study.enqueue_trial(default)
    assert tuner.tune(spec, (7,), "int32", n_trials=3).trials == first.trials == 3  # nothing more to try
    every = study.get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in every)
    copies = every[-2:]
    (original,) = [t for t in every if t.params == default and REPEAT_ATTR not in t.user_attrs]
    assert all(t.user_attrs[REPEAT_ATTR] == original.number and (t.params, t.value) == (default, original.value)
               for t in copies)
    with ConfigStore(private_config_db) as store:  # a repeat is not a trial of its own
        assert len(store.trials(family="test_doubling")) == 3


def test_interrupted_run_resumes_where_it_stopped(private_config_db):
    spec = _doubling_family()
    launches = {"n": 0}
    good_launch = spec.launch

    def launch_then_interrupt(inputs, config, out):
        launches["n"] += 1
        if launches["n"] == 12:  # Ctrl-C in the middle of a later trial (each takes 1 to 5 launches)
            raise KeyboardInterrupt
        return good_launch(inputs, config, out)

    interrupted = dataclasses.replace(spec, launch=launch_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _tuner(private_config_db, seed=2).tune(interrupted, (7,), "int32", n_trials=6)
    with ConfigStore(private_config_db) as store:
        before = {t.number: t for t in store.trials(family="test_doubling")}
    assert before  # the trials finished before Ctrl-C were recorded
    result = _tuner(private_config_db, seed=2).tune(spec, (7,), "int32", n_trials=6)
    with ConfigStore(private_config_db) as store:
        after = {t.number: t for t in store.trials(family="test_doubling")}
    for number, trial in before.items():
        assert after[number].created_at == trial.created_at
    # The in-flight trial is lost (Optuna marks it failed); the rest of the budget is spent anew.
    assert result.trials == 6 and len(after) >= 5 and result.best_config["BROKEN"] == 0


def test_neighbour_buckets_best_configs_are_tried_first(private_config_db):
    neighbour = dict(INT8.default_config((32, 33, 40), "int32"), BLOCK_M=32, BLOCK_N=32, BLOCK_K=64)
    _tuner(private_config_db).store.save_best(BestConfig(
        gpu_key="test-cpu", family=INT8.name, bucket="M=32,N=33,K=40", dtype="int32", config=neighbour,
        median_ms=1.0, p20_ms=1.0, p80_ms=1.0, trials=1, kernel_version=INT8.kernel_version,
        torch_version=torch.__version__, triton_version=None))
    _tuner(private_config_db).tune(INT8, (7, 33, 40), "int32", n_trials=2)
    with ConfigStore(private_config_db) as store:
        first, second = store.trials(gpu_key="test-cpu", bucket="M=8,N=33,K=40")
    assert first.config == INT8.default_config((7, 33, 40), "int32") and second.config == neighbour


# -- studies belong to their database ---------------------------------------------------------------


def _journal(path: Path) -> Path:
    from kernelhub.db.store import study_journal_path

    return study_journal_path(path)


def test_two_databases_in_one_directory_keep_their_own_studies(tmp_path):
    spec = _doubling_family()
    for name in ("a.sqlite", "b.sqlite"):  # b once took a's finished study as its own and measured nothing
        assert _tuner(f"sqlite:///{tmp_path / name}", seed=1).tune(spec, (7,), "int32", n_trials=3).trials == 3
    for name in ("a.sqlite", "b.sqlite"):
        with ConfigStore(tmp_path / name) as store:
            assert [t.number for t in store.trials()] == [0, 1, 2]
        assert _journal(tmp_path / name).exists()


def test_a_database_made_again_refuses_the_old_studies(tmp_path):
    spec, path = _doubling_family(), tmp_path / "a.sqlite"
    _tuner(f"sqlite:///{path}").tune(spec, (7,), "int32", n_trials=2)
    path.unlink()
    ConfigStore(path).close()  # a new, empty database under the old name, beside the old studies
    before = _journal(path).read_bytes()
    with pytest.raises(KernelhubError, match=rf"the tuning studies in the study journal {_journal(path)} belong to "
                                             rf"another config database .* Nothing was tuned; move {_journal(path)} "
                                             "away"):
        _tuner(f"sqlite:///{path}").tune(spec, (7,), "int32", n_trials=2)
    assert _journal(path).read_bytes() == before  # left as it was
    _journal(path).rename(tmp_path / "old-journal")  # as the message says
    assert _tuner(f"sqlite:///{path}").tune(spec, (7,), "int32", n_trials=2).trials == 2


def test_a_study_started_afresh_keeps_the_earlier_trials_beside_it(tmp_path):
    spec, path = _doubling_family(), tmp_path / "a.sqlite"
    _tuner(f"sqlite:///{path}", seed=1).tune(spec, (7,), "int32", n_trials=3)
    with ConfigStore(path) as store:
        earlier = store.trials()
    _journal(path).rename(tmp_path / "moved-away")
    _tuner(f"sqlite:///{path}", seed=2).tune(spec, (7,), "int32", n_trials=2)
    with ConfigStore(path) as store:
        study = earlier[0].study
        assert [t.number for t in store.trials(study=study)] == [0, 1]  # the new study's own trials
        (archived,) = {t.study for t in store.trials()} - {study}
        assert archived.startswith(f"{study}@")
        kept = store.trials(study=archived)
    assert [dataclasses.replace(t, id=None, study=study) for t in kept] == \
        [dataclasses.replace(t, id=None) for t in earlier]
