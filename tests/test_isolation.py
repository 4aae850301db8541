"""Trials in a worker process: every injected fault is recorded with its reason while the study goes
on, healthy workers are reused, and failures teach TPE to stay away.

The cost of isolation is a pytest-benchmark entry (disabled by default: each runs once, as a check):

    python -m pytest tests/test_isolation.py -k cost --benchmark-enable
"""

import dataclasses
import importlib
import os

import optuna
import pytest
import torch

from kernelhub import cli, registry
from kernelhub.db import ConfigStore
from kernelhub.device import current_device
from kernelhub.errors import KernelhubError
from kernelhub.space import SearchSpace
from kernelhub.tuning.isolation import IsolatedRunner
from kernelhub.tuning.timing import Timing
from kernelhub.tuning.trial import InProcessRunner, TrialOutcome
from kernelhub.tuning.tuner import DEFAULT_SAMPLER, Tuner, study_storage

TEST_DEVICE = dataclasses.replace(current_device(), key="test-cpu")
TRIAL_TIMEOUT_S = 2  # what the hanging config costs


@pytest.fixture
def faults(monkeypatch):
    """tests/fault_families.py, registered here and (through KERNELHUB_FAMILIES) in worker processes.

    The registry is restored afterwards, so no other test meets a family that segfaults.
    """
    monkeypatch.setenv("KERNELHUB_FAMILIES", "fault_families")
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    module = importlib.import_module("fault_families")
    for spec in (module.FAULTY, module.NAPPING):
        registry.register(spec)
    return module


def _run(runner, faults, fault: int) -> TrialOutcome:
    return runner.run(faults.FAULTY, (7,), "int32", {"FAULT": fault}, seed=fault)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # BruteForceSampler
def test_every_fault_is_recorded_with_its_reason_and_the_study_goes_on(faults):
    expected = {  # fault -> (state, part of the reason)
        faults.NONE: ("complete", None),
        faults.WRONG: ("mismatch", "7 of 7 elements differ"),
        faults.RAISE: ("error", "RuntimeError: injected launch failure"),
        faults.SEGFAULT: ("crash", "killed by SIGSEGV"),
        faults.ABORT: ("crash", "killed by SIGABRT"),
        faults.HANG: ("timeout", f"no result within {TRIAL_TIMEOUT_S} s"),
    }
    store = ConfigStore("sqlite://")
    with IsolatedRunner("cpu", trial_timeout=TRIAL_TIMEOUT_S) as runner:
        # Brute force tries each of the six configs once, in an order of its own, the DEFAULT first.
        tuner = Tuner(store, study_storage("sqlite://"), TEST_DEVICE, runner=runner, progress=lambda line: None,
                      sampler=lambda seed: optuna.samplers.BruteForceSampler(seed=seed))
        result = tuner.tune(faults.FAULTY, (7,), "int32", n_trials=len(expected))
    trials = store.trials(family="test_faults")
    assert sorted(t.config["FAULT"] for t in trials) == sorted(expected)
    for t in trials:
        state, reason = expected[t.config["FAULT"]]
        assert t.state == state, faults.FAULTS[t.config["FAULT"]]
        assert (t.reason is None) if reason is None else (reason in t.reason)
        assert (t.median_ms is not None) == (state == "complete")
    (best,) = store.best_configs(family="test_faults")
    assert result.trials == len(expected) and result.best_config == best.config == {"FAULT": faults.NONE}


def test_healthy_workers_are_reused_and_a_crashed_one_replaced(faults):
    with IsolatedRunner("cpu", trial_timeout=TRIAL_TIMEOUT_S) as runner:
        pids = []
        for _ in range(3):
            assert _run(runner, faults, faults.NONE).state == "complete"
            pids.append(runner.worker_pid)
        assert _run(runner, faults, faults.WRONG).state == "mismatch"  # a wrong answer leaves the worker healthy
        pids.append(runner.worker_pid)
        assert len(set(pids)) == 1 and pids[0] != os.getpid()

        unregistered = dataclasses.replace(faults.NAPPING, name="test_unregistered")
        with pytest.raises(KernelhubError, match="unknown kernel family 'test_unregistered'.*KERNELHUB_FAMILIES"):
            runner.run(unregistered, (7,), "int32", {"NAP_MS": 0}, seed=0)
        assert runner.worker_pid == pids[0]

        assert _run(runner, faults, faults.SEGFAULT).state == "crash"
        assert runner.worker_pid is None
        assert _run(runner, faults, faults.NONE).state == "complete"
        assert runner.worker_pid not in (None, pids[0])


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf")])
def test_trial_timeout_must_be_positive_seconds(timeout, capsys):
    with pytest.raises(KernelhubError, match="trial_timeout: expected a positive number of seconds"):
        IsolatedRunner("cpu", trial_timeout=timeout)
    with pytest.raises(SystemExit) as exit_info:  # refused by the parser: argparse's usage error
        cli.main(["tune", "--trial-timeout", str(timeout)])
    assert exit_info.value.code == 2
    assert "argument --trial-timeout: expected a positive number of seconds" in capsys.readouterr().err


# -- failures teach the sampler -------------------------------------------------------------------

# 128 configs: more than the budget, so the tuner samples instead of trying them all (tuning/tuner.py).
HALF_FAILING_SPACE = SearchSpace({"X": tuple(range(16)), "Y": tuple(range(8))})
FAILING_X = 8
N_TRIALS = 40


class ScriptedRunner:
    """Outcomes without running anything: every config with X >= 8 crashes, the others take 1 + X + Y/4 ms."""

    def run(self, spec, shape, dtype, config, seed) -> TrialOutcome:
        if config["X"] >= FAILING_X:
            return TrialOutcome("crash", "scripted crash")
        ms = 1 + config["X"] + config["Y"] / 4
        return TrialOutcome("complete", timing=Timing(ms, ms, ms))

    def close(self) -> None:
        pass


def _proposals_in_failing_half_by_the_tuner(spec, seed: int) -> int:
    store = ConfigStore("sqlite://")
    Tuner(store, study_storage("sqlite://"), TEST_DEVICE, seed=seed, runner=ScriptedRunner(),
          progress=lambda line: None).tune(spec, (7,), "int32", n_trials=N_TRIALS)
    trials = store.trials()
    assert len(trials) == N_TRIALS  # distinct configs: the tuner never tries one twice
    return sum(t.config["X"] >= FAILING_X for t in trials)


def _proposals_in_failing_half_with_plain_failed_trials(spec, seed: int) -> int:
    """The same study as the tuner's (same sampler, seed, DEFAULT first), but failures are Optuna FAILED."""
    study = optuna.create_study(sampler=DEFAULT_SAMPLER(seed))
    study.enqueue_trial(spec.default_config((7,), spec.dtypes[0]))

    def objective(trial):
        outcome = ScriptedRunner().run(spec, (7,), "int32", HALF_FAILING_SPACE.suggest(trial), seed)
        if outcome.state != "complete":
            raise RuntimeError(outcome.reason)
        return outcome.timing.median_ms

    study.optimize(objective, n_trials=N_TRIALS, catch=(RuntimeError,))
    return sum(t.params["X"] >= FAILING_X for t in study.trials)


def test_failed_trials_steer_tpe_away_from_the_failing_half(faults):
    default = {"X": 0, "Y": 0}
    spec = dataclasses.replace(faults.NAPPING, name="test_half_failing", space=HALF_FAILING_SPACE,
                               default_config=lambda shape, dtype: dict(default), defaults=(default,))
    seeds = range(3)
    taught = sum(_proposals_in_failing_half_by_the_tuner(spec, seed) for seed in seeds)
    plain = sum(_proposals_in_failing_half_with_plain_failed_trials(spec, seed) for seed in seeds)
    # Half the space fails, so blind sampling would put half the trials there. TPE that never sees its
    # failures puts more there (the region it has no data on keeps its prior weight); the tuner's, fewer.
    assert taught < 0.7 * plain, (taught, plain)
    assert taught < len(seeds) * N_TRIALS / 2


# -- what isolation costs -------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["in-process", "isolated", "isolated-fresh-worker"])
def test_cost_of_a_trial(benchmark, faults, where):
    """One cheap healthy trial: in the tuner's process, in a reused worker, and with a worker start each time."""
    runner = InProcessRunner(torch.device("cpu")) if where == "in-process" else IsolatedRunner("cpu")
    fresh_worker = where == "isolated-fresh-worker"
    try:
        if not fresh_worker:
            assert _run(runner, faults, faults.NONE).state == "complete"  # warm: imports done, worker started

        def trial():
            if fresh_worker:
                runner.close()  # the next run starts a worker
            return _run(runner, faults, faults.NONE)

        outcome = benchmark.pedantic(trial, rounds=5 if fresh_worker else 200)
        assert outcome.state == "complete"
    finally:
        runner.close()
