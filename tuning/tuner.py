"""The Optuna tuner: one study per (GPU key, family, shape bucket, dtype).

A trial, in order:
1. sample a config from the family's space (TPE, seeded);
2. constraints: an infeasible config is PRUNED with its reason and never launched;
3. correctness: the config runs on fresh random inputs into a poisoned output and is compared
   with the reference; a wrong or crashing config is FAILED and can never become best;
4. timing: median (and p20/p80) of the launch, after warm-up.
Every trial is also written to the config database, and the study's best, with its timing and
the DEFAULT's timing, becomes the stored best config.

The DEFAULT config and the best configs of neighbouring buckets are enqueued first, so the
search starts from what is known, and the speedup over the DEFAULT is always measured.

Resume: studies live in an Optuna storage that outlives the process (see `study_storage`);
the study name holds the kernel version, so re-running continues the same study, its finished
trials count against `--trials`, and a changed kernel starts afresh.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch

from kernelhub.db import BestConfig, ConfigStore, TrialRecord
from kernelhub.db.store import sqlite_path
from kernelhub.device import DeviceIdentity
from kernelhub.errors import KernelhubError
from kernelhub.registry import FamilySpec, Shape
from kernelhub.space import Config
from kernelhub.tuning.timing import Timing
from kernelhub.tuning.trial import InProcessRunner, TrialRunner

JOURNAL_NAME = "optuna-journal.log"
MIN_FLOPS_PER_BYTE = 16


def DEFAULT_SAMPLER(seed: int) -> optuna.samplers.BaseSampler:
    """The sampler every study uses unless told otherwise: seeded TPE."""
    return optuna.samplers.TPESampler(seed=seed)


def study_storage(config_db_url: str) -> optuna.storages.BaseStorage:
    """Where studies live, chosen to be safe for several tuner processes at once.

    Next to a SQLite config database: Optuna's journal file (append-only, file-locked), because
    Optuna's own SQLite storage is not meant for parallel workers ("database is locked"). With a
    server database (PostgreSQL, MySQL): Optuna's RDB storage in that same database, so every
    worker on every machine shares the studies.
    """
    path = sqlite_path(config_db_url)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend

        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path.with_name(JOURNAL_NAME))))
    if config_db_url.startswith("sqlite"):
        return optuna.storages.InMemoryStorage()  # in-memory config database: nothing to resume
    return optuna.storages.RDBStorage(config_db_url)


class _Rejected(Exception):
    """A config that computed a wrong answer or failed to launch: the trial is FAILED."""


@dataclass(frozen=True)
class StudyResult:
    family: str
    bucket: str
    dtype: str
    best_config: Config | None  # None if no trial completed
    best: Timing | None
    default: Timing | None
    trials: int  # finished trials in the study, over every run

    @property
    def speedup(self) -> float | None:
        if self.best is None or self.default is None:
            return None
        return self.default.median_ms / self.best.median_ms


class Tuner:
    """Tunes families on one device and records the results in a config store.

    `device` names the key results are stored under. Without a GPU only families whose CPU path
    is real (`FamilySpec.tunes_on_cpu`) are tuned: Triton interpreter timings are refused unless
    `allow_interpreter` (tests of the mechanics, under a test key). `runner` says where trials
    run (default: in this process); `sampler(seed)` makes each study's Optuna sampler.
    """

    def __init__(self, store: ConfigStore, storage: optuna.storages.BaseStorage, device: DeviceIdentity, *,
                 seed: int = 0, allow_interpreter: bool = False, progress: Callable[[str], None] = print,
                 runner: TrialRunner | None = None,
                 sampler: Callable[[int], optuna.samplers.BaseSampler] = DEFAULT_SAMPLER):
        self.store = store
        self.storage = storage
        self.device = device
        self.torch_device = torch.device("cuda" if device.is_gpu else "cpu")
        self.seed = seed
        self.allow_interpreter = allow_interpreter
        self.progress = progress
        self.runner = runner or InProcessRunner(self.torch_device)
        self.sampler = sampler

    def check_tunable(self, spec: FamilySpec) -> None:
        """Raise unless `spec`'s timings on this device are worth recording."""
        if not (self.device.is_gpu or spec.tunes_on_cpu or self.allow_interpreter):
            raise KernelhubError(f"refusing to tune {spec.name} on {self.device.describe()}: Triton interpreter "
                                 "timings say nothing about a GPU; run `kernelhub tune` on the GPU itself")

    # -- one study ---------------------------------------------------------------------------

    def study_name(self, spec: FamilySpec, shape: Shape, dtype: str) -> str:
        bucket = spec.format_shape(spec.bucket(shape))
        return f"{self.device.key}/{spec.name}/{bucket}/{dtype}/{spec.kernel_version}"

    def tune(self, spec: FamilySpec, shape: Shape, dtype: str, *, n_trials: int,
             timeout: float | None = None) -> StudyResult:
        """Run the study of `shape`'s bucket until it holds `n_trials` finished trials (or `timeout` s)."""
        self.check_tunable(spec)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        name = self.study_name(spec, shape, dtype)
        study = optuna.create_study(study_name=name, storage=self.storage, direction="minimize",
                                    sampler=self.sampler(self.seed), load_if_exists=True)
        default = spec.default_config(shape)
        if not study.trials:
            for config in [default, *self._neighbour_configs(spec, shape, dtype)]:
                study.enqueue_trial(config, skip_if_exists=True)

        remaining = n_trials - _finished(study)
        started = time.monotonic()
        if remaining > 0:
            study.optimize(
                lambda trial: self._objective(spec, shape, dtype, name, trial),
                n_trials=remaining, timeout=timeout, catch=(_Rejected,),
                callbacks=[lambda st, tr: self._report(spec, shape, dtype, st, tr, n_trials, default, started)],
            )
        return self._record_best(spec, shape, dtype, study, default)

    def _neighbour_configs(self, spec: FamilySpec, shape: Shape, dtype: str) -> list[Config]:
        """Best stored configs of nearby buckets (same rule as the runtime lookup), nearest first."""
        bucket = spec.bucket(shape)
        scored = []
        for row in self.store.best_configs(gpu_key=self.device.key, family=spec.name, dtype=dtype,
                                           kernel_version=spec.kernel_version):
            try:
                other = spec.parse_shape(row.bucket)
                config = spec.space.validate(row.config)
            except ValueError:
                continue
            distance = spec.bucket_distance(bucket, other)
            if other != bucket and distance is not None:
                scored.append((distance, row.bucket, config))
        return [config for _, _, config in sorted(scored, key=lambda s: s[:2])]

    def _objective(self, spec: FamilySpec, shape: Shape, dtype: str, study_name: str,
                   trial: optuna.Trial) -> float:
        config = spec.space.suggest(trial)
        bucket = spec.format_shape(spec.bucket(shape))

        def record(state: str, reason: str | None = None, timing: Timing | None = None) -> None:
            trial.set_user_attr("state", state)
            if reason:
                trial.set_user_attr("reason", reason)
            self.store.add_trial(TrialRecord(
                gpu_key=self.device.key, family=spec.name, bucket=bucket, dtype=dtype,
                kernel_version=spec.kernel_version, study=study_name, number=trial.number, config=config,
                state=state, reason=reason, median_ms=timing and timing.median_ms,
                p20_ms=timing and timing.p20_ms, p80_ms=timing and timing.p80_ms,
            ))

        # The DEFAULT is what runs untuned, so it is always measured (the baseline of the speedup);
        # DEFAULTs are chosen to fit every GPU.
        is_default = config == spec.default_config(shape)
        reason = None if is_default else spec.space.infeasibility(config, shape, self.device.shared_memory_bytes)
        if reason is not None:
            record("pruned", reason)
            raise optuna.TrialPruned(reason)

        seed = zlib.crc32(f"{self.seed}/{study_name}/{trial.number}".encode())  # fresh inputs per trial
        outcome = self.runner.run(spec, shape, dtype, config, seed)
        if outcome.state != "complete":
            record(outcome.state, outcome.reason)
            raise _Rejected(outcome.reason)
        timing = outcome.timing
        record("complete", timing=timing)
        for key, value in (("p20_ms", timing.p20_ms), ("p80_ms", timing.p80_ms)):
            trial.set_user_attr(key, value)
        return timing.median_ms

    def _report(self, spec, shape, dtype, study, trial, n_trials, default, started) -> None:
        done = _finished(study)
        label = f"[{self.device.key} {spec.name} {spec.format_shape(shape)} {dtype}]"
        line = f"{label} trial {done}/{n_trials}"
        best = _best_trial(study)
        if best is not None:
            line += f"  best {best.value:.4g} ms"
            default_trial = _trial_with_params(study, default)
            if default_trial is not None:
                line += f" ({default_trial.value / best.value:.2f}x vs default)"
        state = trial.user_attrs.get("state", trial.state.name.lower())
        line += f"  last: {state}"
        if trial.value is not None:
            line += f" {trial.value:.4g} ms"
        elif "reason" in trial.user_attrs:
            line += f" ({trial.user_attrs['reason'][:80]})"
        line += f"  [{time.monotonic() - started:.0f}s]"
        self.progress(line)

    def _record_best(self, spec: FamilySpec, shape: Shape, dtype: str, study: optuna.Study,
                     default: Config) -> StudyResult:
        bucket = spec.format_shape(spec.bucket(shape))
        best = _best_trial(study)
        finished = _finished(study)
        if best is None:
            return StudyResult(spec.name, bucket, dtype, None, None, None, finished)
        best_timing = _timing_of(best)
        default_trial = _trial_with_params(study, default)
        default_timing = _timing_of(default_trial) if default_trial is not None else None
        config = {k: best.params[k] for k in spec.space.params}
        flops, moved = spec.flops(shape), spec.bytes_moved(shape, dtype)
        seconds = best_timing.median_ms * 1e-3
        # Below this many FLOP per byte a kernel is memory-bound on every GPU: report bandwidth.
        compute_bound = flops >= MIN_FLOPS_PER_BYTE * moved
        throughput, unit = ((flops / seconds / 1e12, "TFLOP/s") if compute_bound
                            else (moved / seconds / 1e9, "GB/s"))
        identity = self.device.to_dict()
        self.store.save_best(BestConfig(
            gpu_key=self.device.key, family=spec.name, bucket=bucket, dtype=dtype, config=config,
            median_ms=best_timing.median_ms, p20_ms=best_timing.p20_ms, p80_ms=best_timing.p80_ms,
            throughput=throughput, throughput_unit=unit,
            default_median_ms=default_timing.median_ms if default_timing else None,
            trials=finished, kernel_version=spec.kernel_version,
            triton_version=identity["triton_version"], torch_version=identity["torch_version"],
            cuda_version=identity["cuda_version"], device=identity,
        ))
        return StudyResult(spec.name, bucket, dtype, config, best_timing, default_timing, finished)


def _finished(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())


def _completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    completed = [t for t in _completed(study) if t.value is not None and math.isfinite(t.value)]
    return min(completed, key=lambda t: t.value) if completed else None


def _trial_with_params(study: optuna.Study, config: Config) -> optuna.trial.FrozenTrial | None:
    matches = [t for t in _completed(study) if t.params == config]
    return min(matches, key=lambda t: t.value) if matches else None


def _timing_of(trial: optuna.trial.FrozenTrial) -> Timing:
    return Timing(trial.value, trial.user_attrs.get("p20_ms", trial.value), trial.user_attrs.get("p80_ms", trial.value))

