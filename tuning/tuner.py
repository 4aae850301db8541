"""The Optuna tuner: one study per (GPU key, family, shape bucket, dtype).

A trial, in order:
1. take the next queued config (see "Start" and "Enumeration" below), else sample one (TPE, seeded);
2. a config this study has tried before is not run again (see "The budget");
3. constraints: an infeasible config is recorded as "constraint" with its reason, never launched;
4. compile check (see "Compile pruning"): a config the compiler refuses for the device's target is
   recorded as "constraint" with the compiler's reason, never launched;
5. correctness, through the runner (in a worker process with `IsolatedRunner`): the config runs on
   fresh random inputs into a poisoned output and is compared with the reference; a config that
   computes a wrong answer ("mismatch"), raises ("error"), kills its process ("crash") or does not
   finish in time ("timeout") fails with that reason and can never become best;
6. timing: median (and p20/p80) of the launch, after warm-up.
Every trial with an outcome of its own is written to the config database with its state and
reason, and the best trial so far, with its timing and the DEFAULT's timing, is the stored best.

Failures teach the sampler: Optuna's TPE ignores FAILED trials, so it would keep proposing a
region where every config crashes. A failed trial (constraint, compiler, mismatch, error, crash,
timeout) is instead told to Optuna as COMPLETE with the worst possible time (infinity): TPE ranks
it below every timed config and moves away from its region. Its `state` user attribute says it
failed, so it is never taken as best.

Start: the DEFAULT config and the best configs of neighbouring buckets are queued first, so the
search starts from what is known, and the speedup over the DEFAULT is always measured. The
DEFAULT is never pruned (neither by constraints nor by the compiler): it is what runs untuned.

The budget: `n_trials` (`kernelhub tune --trials`) counts distinct configs with an outcome (timed,
failed, or pruned by the constraints or the compiler), over every run of the study. TPE proposes
configs it has already tried, often in a small space; such a proposal is answered from the record
(Optuna is told the earlier trial's value again, the trial marked `repeat_of` that trial's number):
nothing runs, it is not written to the database and does not count. So the budget buys N
different configs, never one config twice. A sampler that proposes only configs the study has
tried, MAX_REPEATS_IN_A_ROW times in a row, has converged: the study ends there, short of N, and
says so (without that rule a study whose sampler is stuck would never end).

Enumeration: when the DEFAULT and every config the constraints accept at this shape number at most
`n_trials` (and the space has at most MAX_ENUMERATED_SPACE combinations to scan), the study
queues all of them, the DEFAULT first, then the space's order, instead of sampling, and ends when
each has an outcome: the exhaustive answer costs no more than the budget. A rerun queues those an
interrupted run left.

Compile pruning: with a `compile_check` (`kernelhub tune` builds one on an NVIDIA GPU, for the
device's `sm_XY`: `compile_check_for`), each config that passed the constraints is compiled for
the device before it is launched (`kernelhub.compiler.ConfigCheck`: capture on meta tensors and
`triton.compile` in a compile process, cached on disk). A config that does not compile, exceeds
the target's limits (shared memory per block, no block fits an SM) or spills registers to local
memory is a "constraint" with the compiler's reason ("compiler: int8_gemm_kernel spills 672 B
per thread to local memory (255 registers)"). The check runs just before its trial, not ahead:
the sampler proposes a config only once the previous outcome is told, so there is nothing to
compile ahead but guesses. A check that cannot run (its process died or gave no answer) never
stops tuning: the config is timed as before, with a note; after MAX_COMPILE_CHECK_FAILURES such
failures in a row the check is off for the rest of the run. Collective families (their trials run
on a process group) get no check, nor do launches that compile no Triton kernel. Measured on CPU
(`benchmarks/cpu_compile_pruning.py`): see README.md, "Tuning".

Shared studies: several tuner processes may run one study (the storage below); each stops when
the study holds `n_trials` configs. Two workers that draw the same untried config at the same
moment both measure it (Optuna has no lock for that); a config with an outcome is never run again.
Workers that open a fresh study together may each queue its starting configs (Optuna's check for
a queued copy and the enqueue are not one step), and a copy can be queued after the study is done.
So each worker, when its run of a study ends, answers every queued copy of a config the study has
tried as a repeat of it (`_drain_tried_from_queue`): a finished study keeps no stale queue.

Resume: studies live in an Optuna storage that outlives the process (see `study_storage`);
the study name holds the kernel version, so re-running continues the same study, its tried
configs count against `--trials` and are not measured again, and a changed kernel starts afresh.
A run killed at any moment (even `kill -9`) loses only the trial in flight: the database rows
follow Optuna's record of finished trials, and a rerun writes any row the kill cut off.

Studies belong to their config database: a SQLite database `NAME` keeps them in `NAME.optuna-journal`
beside it, and every study carries the database's id (`ConfigStore.database_id`) as a user
attribute. A tuner refuses studies of another id (the database was deleted and made again, or
the journal copied from elsewhere), so it never stores another database's timings as its own.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import optuna
import sqlalchemy.exc
import torch

from kernelhub.compiler import ConfigCheck
from kernelhub.compiler.pool import DEFAULT_TIMEOUT_S as COMPILE_TIMEOUT_S
from kernelhub.compiler.targets import target
from kernelhub.db import BestConfig, ConfigStore, TrialRecord
from kernelhub.db.store import database_where, sqlite_path, study_journal_path
from kernelhub.device import DeviceIdentity
from kernelhub.errors import ConfigDBError, KernelhubError
from kernelhub.registry import FamilySpec, Shape
from kernelhub.space import Config
from kernelhub.tuning.timing import Timing
from kernelhub.tuning.trial import InProcessRunner, TrialRunner

DATABASE_ID_ATTR = "kernelhub_database_id"  # study user attribute: the config database it belongs to
STORAGE_ATTEMPTS = 5
MIN_FLOPS_PER_BYTE = 16
FAILED_TRIAL_VALUE = math.inf  # what Optuna is told for a failed trial: worse than any time
REPEAT_ATTR = "repeat_of"  # trial user attribute: the number of the earlier trial of the same config
MAX_REPEATS_IN_A_ROW = 10  # proposals of tried configs in a row after which a study has converged
MAX_ENUMERATED_SPACE = 100_000  # combinations scanned for feasible configs before giving up on enumerating
MAX_COMPILE_CHECK_FAILURES = 3  # compile checks in a row that could not run before the check is turned off

# compile_check(spec, shape, dtype, config): why the compiler refuses `config` for the device ("compiler:
# ..."), or None; raises when it cannot tell. `kernelhub.compiler.ConfigCheck` is the real one.
CompileCheck = Callable[[FamilySpec, Shape, str, Config], "str | None"]


def DEFAULT_SAMPLER(seed: int) -> optuna.samplers.BaseSampler:
    """The sampler every study uses unless told otherwise: seeded multivariate TPE (docs/tuning.md says why).

    Named explicitly: Optuna's TPE default is independent before 5.0 and multivariate from 5.0.
    """
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def study_storage(config_db_url: str) -> optuna.storages.BaseStorage:
    """Where studies live, chosen to be safe for several tuner processes at once.

    Next to a SQLite config database: Optuna's journal file of that database (`study_journal_path`:
    append-only, file-locked), because Optuna's own SQLite storage is not meant for parallel
    workers ("database is locked"). With a server database (PostgreSQL, MySQL): Optuna's RDB
    storage in that same database, so every worker on every machine shares the studies.
    """
    path = sqlite_path(config_db_url)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend

        journal = study_journal_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
        except OSError as exc:
            raise ConfigDBError(f"cannot open the study journal {journal.absolute()}: {exc.strerror or exc}; "
                                "its directory must be writable") from None
    if config_db_url.startswith("sqlite"):
        return optuna.storages.InMemoryStorage()  # in-memory config database: nothing to resume
    # Workers that start together against an empty database all create Optuna's tables; all but
    # one collide (duplicate table or type). Those find the tables there when they try again.
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(config_db_url)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            if attempt == STORAGE_ATTEMPTS - 1:
                reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ConfigDBError(f"cannot open Optuna's study tables in {database_where(config_db_url)}: "
                                    f"{reason}") from None
            time.sleep(0.2 * (attempt + 1))


def compile_check_for(device: DeviceIdentity, *, timeout: float = COMPILE_TIMEOUT_S,
                      workers: int = 1) -> ConfigCheck | None:
    """The compile check for `device`'s target (CUDA compute capability 9.0 -> `sm_90`), in `workers`
    compile processes, each build given `timeout` seconds; None where there is no target to compile
    for: a CPU, an AMD GPU, or an architecture `kernelhub.compiler` does not know. The caller closes it."""
    if device.vendor != "nvidia" or not device.compute_capability:
        return None
    try:
        t = target("sm_" + device.compute_capability.replace(".", ""))
    except ValueError:
        return None
    return ConfigCheck(t, workers=workers, timeout=timeout)


@dataclass(frozen=True)
class StudyResult:
    family: str
    bucket: str
    dtype: str
    best_config: Config | None  # None if no trial completed
    best: Timing | None
    default: Timing | None
    trials: int  # distinct configs tried in the study (any outcome), over every run

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
    run (default: in this process; `kernelhub tune` isolates each trial in a worker process with
    `kernelhub.tuning.isolation.IsolatedRunner`); `sampler(seed)` makes each study's Optuna sampler;
    `compile_check` prunes with the compiler (module docstring; None: no compile pruning).
    """

    def __init__(self, store: ConfigStore, storage: optuna.storages.BaseStorage, device: DeviceIdentity, *,
                 seed: int = 0, allow_interpreter: bool = False, progress: Callable[[str], None] = print,
                 runner: TrialRunner | None = None,
                 sampler: Callable[[int], optuna.samplers.BaseSampler] = DEFAULT_SAMPLER,
                 compile_check: CompileCheck | None = None):
        self.store = store
        self.storage = storage
        self.device = device
        self.torch_device = torch.device("cuda" if device.is_gpu else "cpu")
        self.seed = seed
        self.allow_interpreter = allow_interpreter
        self.progress = progress
        self.runner = runner or InProcessRunner(self.torch_device)
        self.sampler = sampler
        self.compile_check = compile_check
        self._compile_check_failures = 0  # in a row
        self._database_id: str | None = None  # known once the studies were checked (first `tune`)

    @property
    def database_id(self) -> str:
        """The config database's id, once every study in the storage was checked to be of it."""
        if self._database_id is None:
            database_id = self.store.database_id()
            for study in self.storage.get_all_studies():
                self._check_owner(study.user_attrs, database_id)
            self._database_id = database_id
        return self._database_id

    def _check_owner(self, user_attrs: dict, database_id: str) -> None:
        """Refuse a study of another config database (see the module docstring); the studies are left as they are."""
        owner = user_attrs.get(DATABASE_ID_ATTR)
        if owner is None or owner == database_id:
            return
        path = self.store.path
        where = (f"the study journal {study_journal_path(path).absolute()}" if path is not None
                 else f"Optuna's tables in {database_where(self.store.url)}")
        fix = (f"move {study_journal_path(path).absolute()} away (this database's studies then start afresh)"
               if path is not None else "drop Optuna's tables from it, or use a fresh database")
        raise KernelhubError(f"the tuning studies in {where} belong to another config database (id {owner}), not "
                             f"to {self.store.where} (id {database_id}): it was made again or the studies "
                             f"were copied, and their timings are not this database's. Nothing was tuned; {fix}")

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
        """Run the study of `shape`'s bucket until it holds `n_trials` tried configs, or has tried every
        config it can, or its sampler converged (module docstring, "The budget"), or `timeout` s passed."""
        self.check_tunable(spec)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        name = self.study_name(spec, shape, dtype)
        database_id = self.database_id
        opened_at = datetime.now(timezone.utc)
        study = optuna.create_study(study_name=name, storage=self.storage, direction="minimize",
                                    sampler=self.sampler(self.seed), load_if_exists=True)
        self._check_owner(study.user_attrs, database_id)
        if DATABASE_ID_ATTR not in study.user_attrs:
            study.set_user_attr(DATABASE_ID_ATTR, database_id)
        default = spec.default_config(shape, dtype)
        if not study.trials:
            # A fresh study: trials the database holds under its name are of an earlier study (whose
            # journal was moved away); they stand aside instead of being replaced trial by trial.
            self.store.archive_trials(name, before=opened_at)
            for config in [default, *self._neighbour_configs(spec, shape, dtype)]:
                study.enqueue_trial(config, skip_if_exists=True)
        every_config = self._enumerated_configs(spec, shape, dtype, n_trials)
        if every_config is not None:
            enqueue_untried(study, every_config)

        self._record_missing_trials(spec, shape, dtype, study)

        budget = Budget(n_trials, every_config)
        started = time.monotonic()

        def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if not is_repeat(trial):
                self._save_trial(spec, shape, dtype, study, trial, default)
            budget.after_trial(study, trial)  # may stop the study
            self._report(spec, shape, dtype, study, trial, budget, default, started)

        # Other workers may share the study: the budget counts the study's configs, not this worker's.
        if not budget.done(study):
            study.optimize(lambda trial: self._objective(spec, shape, dtype, name, trial),
                           n_trials=budget.trial_bound(study), timeout=timeout, callbacks=[after_trial])
        self._drain_tried_from_queue(spec, study)
        if budget.stopped_because:
            self.progress(f"{self._label(spec, shape, dtype)} done after {len(tried_trials(study))} configs: "
                          f"{budget.stopped_because}")
        return self._record_best(spec, shape, dtype, study, default)

    def _drain_tried_from_queue(self, spec: FamilySpec, study: optuna.Study) -> None:
        """Answer each queued trial whose config `study` has already tried as a repeat of that trial
        (module docstring, "Shared studies"). A copy another worker claims first is left to it."""
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        tried = {_config_key(t.params): t for t in tried_trials(study)}
        stale = [(t, tried[key]) for t in waiting
                 if (key := _config_key(t.system_attrs.get("fixed_params", {}))) in tried]
        if not stale:
            return
        study_id = self.storage.get_study_id_from_name(study.study_name)
        for queued, earlier in stale:
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, queued.number)
            try:
                if not self.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING):
                    continue  # another worker popped it
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            trial = optuna.Trial(study, trial_id)
            spec.space.suggest(trial)  # records the queued values as the trial's params
            study.tell(trial, answer_repeat(trial, earlier))

    def _enumerated_configs(self, spec: FamilySpec, shape: Shape, dtype: str, n_trials: int) -> list[Config] | None:
        """Every config a study of `shape` can try, the DEFAULT first, then each one the constraints
        accept in the space's order, if they are at most `n_trials`; None when the study samples."""
        space = spec.space
        if math.prod(len(choices) for choices in space.params.values()) > MAX_ENUMERATED_SPACE:
            return None
        default = spec.default_config(shape, dtype)
        configs = [default]
        for config in space.configs():
            if config != default and space.infeasibility(config, shape, self.device.shared_memory_bytes) is None:
                configs.append(config)
                if len(configs) > n_trials:
                    return None
        return configs

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
        earlier = earlier_outcome(trial.study, config)
        if earlier is not None:
            return answer_repeat(trial, earlier)
        # The DEFAULT is what runs untuned, so it is always measured (the baseline of the speedup);
        # DEFAULTs are chosen to fit every GPU.
        if config != spec.default_config(shape, dtype):
            reason = (spec.space.infeasibility(config, shape, self.device.shared_memory_bytes)
                      or self._compiler_refusal(spec, shape, dtype, config, trial))
            if reason is not None:
                return _failed(trial, "constraint", reason)

        seed = zlib.crc32(f"{self.seed}/{study_name}/{trial.number}".encode())  # fresh inputs per trial
        outcome = self.runner.run(spec, shape, dtype, config, seed)
        if outcome.state != "complete":
            return _failed(trial, outcome.state, outcome.reason)
        timing = outcome.timing
        trial.set_user_attr("state", "complete")
        for key, value in (("p20_ms", timing.p20_ms), ("p80_ms", timing.p80_ms)):
            trial.set_user_attr(key, value)
        return timing.median_ms

    def _compiler_refusal(self, spec: FamilySpec, shape: Shape, dtype: str, config: Config,
                          trial: optuna.Trial) -> str | None:
        """The compile check's reason to prune `config`, or None to run it. A check that cannot run
        leaves a note on the trial instead (module docstring, "Compile pruning")."""
        if self.compile_check is None or spec.world_size is not None:
            return None
        try:
            reason = self.compile_check(spec, shape, dtype, config)
        except Exception as exc:  # whatever went wrong, it is the check's failure, not the config's
            self._compile_check_failures += 1
            trial.set_user_attr("note", f"not compile-checked: {type(exc).__name__}: {exc}"[:500])
            if self._compile_check_failures >= MAX_COMPILE_CHECK_FAILURES:
                self.compile_check = None
                self.progress(f"compile check off for the rest of this run: it could not run "
                              f"{MAX_COMPILE_CHECK_FAILURES} times in a row (last: {type(exc).__name__}: {exc})")
            return None
        self._compile_check_failures = 0
        return reason

    def _save_trial(self, spec: FamilySpec, shape: Shape, dtype: str, study: optuna.Study,
                    trial: optuna.trial.FrozenTrial, default: Config) -> None:
        """Write a finished trial to the database; a new best, or the DEFAULT's time, updates the stored best."""
        self.store.add_trial(self._trial_record(spec, shape, dtype, study.study_name, trial))
        if _timed(trial) and (trial.number == _best_trial(study).number or trial.params == default):
            self._record_best(spec, shape, dtype, study, default)

    def _record_missing_trials(self, spec: FamilySpec, shape: Shape, dtype: str, study: optuna.Study) -> None:
        """Write the finished trials the database lacks: a run killed after Optuna recorded a trial
        and before the database did."""
        recorded = {t.number for t in self.store.trials(study=study.study_name)}
        for trial in tried_trials(study):
            if trial.number not in recorded:
                self.store.add_trial(self._trial_record(spec, shape, dtype, study.study_name, trial))

    def _trial_record(self, spec: FamilySpec, shape: Shape, dtype: str, study_name: str,
                      trial: optuna.trial.FrozenTrial) -> TrialRecord:
        attrs = trial.user_attrs
        timed = _timed(trial)
        return TrialRecord(
            gpu_key=self.device.key, family=spec.name, bucket=spec.format_shape(spec.bucket(shape)), dtype=dtype,
            kernel_version=spec.kernel_version, study=study_name, number=trial.number, config=dict(trial.params),
            state=attrs["state"], reason="; ".join(filter(None, (attrs.get("reason"), attrs.get("note")))) or None,
            median_ms=trial.value if timed else None,
            p20_ms=attrs.get("p20_ms"), p80_ms=attrs.get("p80_ms"),
        )

    def _label(self, spec: FamilySpec, shape: Shape, dtype: str) -> str:
        return f"[{self.device.key} {spec.name} {spec.format_shape(shape)} {dtype}]"

    def _report(self, spec, shape, dtype, study, trial, budget: Budget, default, started) -> None:
        line = f"{self._label(spec, shape, dtype)} trial {len(tried_trials(study))}/{budget.goal}"
        best = _best_trial(study)
        if best is not None:
            line += f"  best {best.value:.4g} ms"
            default_trial = _trial_with_params(study, default)
            if default_trial is not None:
                line += f" ({default_trial.value / best.value:.2f}x vs default)"
        if is_repeat(trial):
            line += f"  last: trial {trial.user_attrs[REPEAT_ATTR]}'s config again, not run"
        else:
            line += f"  last: {trial.user_attrs.get('state', trial.state.name.lower())}"
            if _timed(trial):
                line += f" {trial.value:.4g} ms"
            elif "reason" in trial.user_attrs:
                line += f" ({trial.user_attrs['reason'][:80]})"
            if "note" in trial.user_attrs:
                line += f" (note: {trial.user_attrs['note'][:80]})"
        line += f"  [{time.monotonic() - started:.0f}s]"
        self.progress(line)

    def _record_best(self, spec: FamilySpec, shape: Shape, dtype: str, study: optuna.Study,
                     default: Config) -> StudyResult:
        bucket = spec.format_shape(spec.bucket(shape))
        best = _best_trial(study)
        finished = len(tried_trials(study))
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
        ), unless_outdated=True)  # another worker of this study may have saved a fuller result
        return StudyResult(spec.name, bucket, dtype, config, best_timing, default_timing, finished)


def _failed(trial: optuna.Trial, state: str, reason: str | None) -> float:
    """Mark `trial` as failed (`state`, `reason`); returns what Optuna is told (see the module docstring)."""
    trial.set_user_attr("state", state)
    if reason:
        trial.set_user_attr("reason", reason)
    return FAILED_TRIAL_VALUE


# -- the budget: distinct configs, repeats answered from the record (module docstring) ---------------

def tried_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's trials with an outcome of their own (timed, failed or pruned): one per config
    tried. Repeats are left out, as are trials an interrupted run left unfinished."""
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if "state" in t.user_attrs]


def is_repeat(trial: optuna.trial.FrozenTrial) -> bool:
    return REPEAT_ATTR in trial.user_attrs


def earlier_outcome(study: optuna.Study, config: Config) -> optuna.trial.FrozenTrial | None:
    """The trial that already tried `config` in `study`, if one did."""
    return next((t for t in tried_trials(study) if t.params == config), None)


def answer_repeat(trial: optuna.Trial, earlier: optuna.trial.FrozenTrial) -> float:
    """Mark `trial` as a repeat of `earlier`; returns what Optuna is told: `earlier`'s value again."""
    trial.set_user_attr(REPEAT_ATTR, earlier.number)
    return earlier.value


def _config_key(config: dict) -> tuple:
    return tuple(sorted(config.items()))


def enqueue_untried(study: optuna.Study, configs: Iterable[Config]) -> None:
    """Queue each of `configs` that the study has neither tried nor queued already."""
    held = {_config_key(t.params) for t in tried_trials(study)}
    held |= {_config_key(t.system_attrs.get("fixed_params", {}))
             for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))}
    for config in configs:
        if _config_key(config) not in held:
            study.enqueue_trial(config)
            held.add(_config_key(config))


class Budget:
    """When a study is done: it holds `n_trials` tried configs, or has tried every one of
    `every_config` (an enumerated space; None when it samples), or its sampler proposed only tried
    configs MAX_REPEATS_IN_A_ROW times in a row. `after_trial` is the Optuna callback that stops it."""

    def __init__(self, n_trials: int, every_config: Sequence[Config] | None = None):
        self.n_trials = n_trials
        self.every_config = every_config
        self.repeats_in_a_row = 0
        self.stopped_because: str | None = None  # why it ended short of n_trials

    @property
    def goal(self) -> int:
        """Configs the study will try if nothing stops it sooner."""
        return self.n_trials if self.every_config is None else min(self.n_trials, len(self.every_config))

    def done(self, study: optuna.Study) -> bool:
        tried = tried_trials(study)
        if len(tried) >= self.n_trials:
            return True
        if self.every_config is not None:
            keys = {_config_key(t.params) for t in tried}
            if all(_config_key(c) in keys for c in self.every_config):
                self.stopped_because = f"every config the constraints accept was tried ({len(self.every_config)})"
                return True
        if self.repeats_in_a_row >= MAX_REPEATS_IN_A_ROW:
            self.stopped_because = (f"the sampler proposed only configs already tried, {self.repeats_in_a_row} "
                                    "times in a row (it has converged)")
            return True
        return False

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.repeats_in_a_row = self.repeats_in_a_row + 1 if is_repeat(trial) else 0
        if self.done(study):
            study.stop()

    def trial_bound(self, study: optuna.Study) -> int:
        """Optuna trials one `optimize` call may take: each config still to try after at most
        MAX_REPEATS_IN_A_ROW - 1 repeats. `after_trial` stops the study sooner; this bound only
        makes sure that no mistake in it can make a study run forever."""
        return max(1, self.n_trials - len(tried_trials(study))) * MAX_REPEATS_IN_A_ROW


def _timed(trial: optuna.trial.FrozenTrial) -> bool:
    """True for a trial that passed and was timed; failed trials are COMPLETE too, marked by `state`."""
    return (trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs.get("state") == "complete"
            and trial.value is not None and math.isfinite(trial.value))


def _timed_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if _timed(t)]


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    timed = _timed_trials(study)
    return min(timed, key=lambda t: t.value) if timed else None


def _trial_with_params(study: optuna.Study, config: Config) -> optuna.trial.FrozenTrial | None:
    matches = [t for t in _timed_trials(study) if t.params == config]
    return min(matches, key=lambda t: t.value) if matches else None


def _timing_of(trial: optuna.trial.FrozenTrial) -> Timing:
    return Timing(trial.value, trial.user_attrs.get("p20_ms", trial.value), trial.user_attrs.get("p80_ms", trial.value))
