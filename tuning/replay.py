"""Replay the tuner's search against a recorded sweep: compare samplers with no GPU.

A sweep (tuning/sweep.py) holds every feasible config of one (device, family, shape, dtype) with
its measured time. Replaying runs an Optuna study per (shape, sampler, seed) the way the Tuner
runs one, except that a trial's time is looked up instead of measured:

- the sampler comes from a `sampler(seed)` factory, the tuner's own (`DEFAULT_SAMPLER`) for the
  row named "tuner", so the replayed default is exactly what `kernelhub tune` runs;
- the shape's DEFAULT is enqueued first, as the Tuner does (it also enqueues the best configs of
  neighbouring buckets, which a replay has no database for); a shape whose sweep holds at most
  `budget` configs is enumerated, as the Tuner enumerates a space that fits `--trials` (the
  DEFAULT, then the space's order), so there every sampler's row is the same;
- configs are suggested by the space (`SearchSpace.suggest`), so the samplers see the same
  categorical parameters;
- a config the sweep does not hold is one the constraints rejected, and a config recorded as
  failed failed its check: both are told to Optuna exactly as the tuner tells it (`_failed`, the
  one place that follows tuning/tuner.py), and a trial counts towards the best only when the
  tuner's own test (`tuner._timed`) says it was timed.

Not modelled: the Tuner's compile check (a sweep times every config the constraints accept, so a
config the compiler would prune is replayed as timed).

A trial is a config tried, failed or infeasible ones too, as they count against `--trials`; a
proposal of a config already tried is answered from the record and does not count, and a sampler
that only proposes tried configs ends the run: the Tuner's own `Budget`, `earlier_outcome` and
`answer_repeat`. A run lasts as many trials as the sweep has configs, or stops sooner once it is
within 3% of the sweep's best and past the last checkpoint, or when the Tuner would stop.
Reported per sampler, median over seeds: trials to reach within 3% of the sweep's best, and the
best reached (as a ratio to the sweep's best) after 10%, 20% and 50% of the sweep's size in
trials, and after a fixed budget (`kernelhub tune`'s default of 50 trials).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import optuna

from kernelhub.errors import KernelhubError
from kernelhub.space import Config, SearchSpace
from kernelhub.tuning import tuner
from kernelhub.tuning.sweep import config_key

WITHIN = 1.03  # "found it": within 3% of the sweep's best
CHECKPOINTS = (0.1, 0.2, 0.5)  # fractions of the sweep's size, in trials
DEFAULT_BUDGET = 50  # `kernelhub tune --trials` default
DEFAULT_SEEDS = 5

Params = Mapping[str, Sequence[int]]
SamplerFactory = Callable[[Params, int], optuna.samplers.BaseSampler]


# -- samplers ------------------------------------------------------------------------------------

def _qmc_skip_reason() -> str | None:
    try:
        import scipy  # noqa: F401  (Optuna's QMCSampler draws its sequences from scipy.stats.qmc)
    except ImportError:
        return "needs scipy, which kernelhub does not install"
    return None


@dataclass(frozen=True)
class SamplerChoice:
    name: str
    describe: str
    make: SamplerFactory | None  # None: skipped, for `skipped`'s reason
    skipped: str | None = None


SAMPLERS: dict[str, SamplerChoice] = {s.name: s for s in (
    SamplerChoice("tuner", "the tuner's DEFAULT_SAMPLER (tuning/tuner.py)",
                  lambda params, seed: tuner.DEFAULT_SAMPLER(seed)),
    # Optuna's TPE default changed in 5.0 from independent to multivariate: both are named explicitly.
    SamplerChoice("tpe-independent", "TPESampler(multivariate=False): one model per tunable",
                  lambda params, seed: optuna.samplers.TPESampler(seed=seed, multivariate=False)),
    SamplerChoice("tpe-multivariate", "TPESampler(multivariate=True): the tunables modelled jointly",
                  lambda params, seed: optuna.samplers.TPESampler(seed=seed, multivariate=True)),
    SamplerChoice("random", "RandomSampler", lambda params, seed: optuna.samplers.RandomSampler(seed=seed)),
    SamplerChoice("grid", "GridSampler over every combination, feasible or not, in a seeded order",
                  lambda params, seed: optuna.samplers.GridSampler({k: list(v) for k, v in params.items()}, seed=seed)),
    SamplerChoice("qmc", "QMCSampler, scrambled Sobol (one coordinate per categorical tunable)",
                  None if _qmc_skip_reason() else
                  (lambda params, seed: optuna.samplers.QMCSampler(scramble=True, seed=seed)),
                  _qmc_skip_reason()),
    SamplerChoice("cmaes", "CmaEsSampler", None,
                  "every tunable is categorical, which Optuna's CmaEsSampler does not model (it samples them "
                  "at random, so it would be the random row), and it needs the cmaes package"),
)}


def sampler_names(names: Sequence[str] | None) -> list[str]:
    """`names` checked against SAMPLERS (all of them when None)."""
    if not names:
        return list(SAMPLERS)
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        raise KernelhubError(f"--samplers: unknown {', '.join(unknown)}; expected some of {', '.join(SAMPLERS)}")
    return list(dict.fromkeys(names))


# -- one shape of a sweep --------------------------------------------------------------------------

@dataclass(frozen=True)
class Landscape:
    """One shape of a sweep, as the tuner would meet it: what each config costs, or why it cannot run."""

    shape: str
    params: dict[str, list[int]]
    default: Config
    times: dict[tuple[int, ...], float]  # completed configs -> median ms
    failures: dict[tuple[int, ...], tuple[str, str]]  # configs that failed their check -> (state, reason)

    @classmethod
    def from_sweep(cls, params: Mapping[str, list[int]], entry: Mapping) -> "Landscape":
        """`entry` is one validated item of a sweep's "shapes"."""
        default_key = config_key(entry["default"], params)
        times, failures = {}, {}
        for item in entry["configs"]:
            key = config_key(item["config"], params)
            # A DEFAULT that the constraints reject is measured, but the tuner only runs it as the
            # shape's own DEFAULT; any other time, the constraint rejects it.
            if "infeasible" in item and key != default_key:
                continue
            if item["state"] == "complete":
                times[key] = item["median_ms"]
            else:
                failures[key] = (item["state"], item["reason"])
        if not times:
            raise KernelhubError(f"shape {entry['shape']}: no config completed, so there is no best to reach")
        return cls(entry["shape"], dict(params), dict(entry["default"]), times, failures)

    @property
    def size(self) -> int:
        """Configs the tuner can pick here (feasible ones and the DEFAULT): an exhaustive sweep's cost in trials."""
        return len(self.times) + len(self.failures)

    def every_config(self) -> list[Config]:
        """The configs the Tuner would queue to enumerate this shape: the DEFAULT, then the sweep's in
        the space's order (a sweep holds the feasible configs, which is what the Tuner enumerates)."""
        held = self.times.keys() | self.failures.keys()
        rest = [c for c in SearchSpace(params=self.params).configs()
                if config_key(c, self.params) in held and c != self.default]
        return [dict(self.default), *rest]

    @property
    def best_ms(self) -> float:
        return min(self.times.values())

    def checkpoints(self) -> list[int]:
        return [max(1, math.ceil(f * self.size)) for f in CHECKPOINTS]


def _failed(trial: optuna.Trial, state: str, reason: str) -> float:
    """Tell Optuna about a config that was not timed (`state`: "constraint" or a runner's failure) as the tuner does.

    The tuner's own helper, so a change in how Tuner._objective treats failures reaches the
    replay; if the tuner stops returning a value here (raising, say), so does the replay.
    """
    return tuner._failed(trial, state, reason)


def replay_run(landscape: Landscape, make_sampler: SamplerFactory, seed: int, *, max_trials: int,
               stop_after: int, enumerate_all: bool = False) -> list[float]:
    """One study; the best time reached after each config tried, as a ratio to the sweep's best (inf before any).

    Stops after `max_trials` configs, or after `stop_after` once within WITHIN of the best, or
    when the Tuner's budget would stop it, or when the sampler stops the study itself (as the grid
    does once exhausted). `enumerate_all`: queue every config, as the Tuner does for a space that
    fits its budget.
    """
    space = SearchSpace(params=landscape.params)
    best_ms = landscape.best_ms
    budget = tuner.Budget(max_trials, landscape.every_config() if enumerate_all else None)
    trace: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        config = space.suggest(trial)
        earlier = tuner.earlier_outcome(trial.study, config)
        if earlier is not None:
            return tuner.answer_repeat(trial, earlier)
        key = config_key(config, landscape.params)
        if key in landscape.times:
            trial.set_user_attr("state", "complete")
            return landscape.times[key]
        if key in landscape.failures:
            return _failed(trial, *landscape.failures[key])
        return _failed(trial, "constraint", "not in the sweep: the constraints reject it")

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not tuner.is_repeat(trial):
            best = trace[-1] if trace else math.inf
            if tuner._timed(trial):
                best = min(best, trial.value / best_ms)
            trace.append(best)
            if len(trace) >= stop_after and best <= WITHIN:
                study.stop()
        budget.after_trial(study, trial)

    study = optuna.create_study(direction="minimize", sampler=make_sampler(landscape.params, seed))
    study.enqueue_trial(landscape.default)
    if budget.every_config is not None:
        tuner.enqueue_untried(study, budget.every_config)
    study.optimize(objective, n_trials=budget.trial_bound(study), callbacks=[after])
    return trace


# -- a whole sweep ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerResult:
    sampler: str
    traces: list[list[float]] = field(default_factory=list)  # one per seed
    skipped: str | None = None

    def trials_to_within(self) -> list[float]:
        """Per seed: trials until within WITHIN of the best (inf if the run never got there)."""
        return [next((i + 1 for i, r in enumerate(t) if r <= WITHIN), math.inf) for t in self.traces]

    def best_after(self, trials: int) -> list[float]:
        """Per seed: best ratio after `trials` trials (a run that stopped sooner had nothing left to find)."""
        return [t[min(trials, len(t)) - 1] for t in self.traces]


@dataclass(frozen=True)
class ShapeReport:
    landscape: Landscape
    max_trials: int
    results: list[SamplerResult]


@dataclass(frozen=True)
class ReplayReport:
    sweep: dict  # the sweep's header fields (no "shapes")
    seeds: int
    budget: int
    shapes: list[ShapeReport]


def replay_sweep(doc: dict, *, samplers: Sequence[str] | None = None, seeds: int = DEFAULT_SEEDS,
                 budget: int = DEFAULT_BUDGET, progress: Callable[[str], None] = lambda line: None) -> ReplayReport:
    """Replay every shape of a validated sweep document (`load_sweep`) with each sampler and seed."""
    if seeds < 1:
        raise KernelhubError(f"seeds: expected at least 1, got {seeds}")
    if budget < 1:
        raise KernelhubError(f"budget: expected at least 1, got {budget}")
    names = sampler_names(samplers)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    shapes = []
    for entry in doc["shapes"]:
        landscape = Landscape.from_sweep(doc["space"], entry)
        max_trials = max(landscape.size, budget)
        stop_after = max([*landscape.checkpoints(), budget])
        results = []
        for name in names:
            choice = SAMPLERS[name]
            if choice.make is None:
                results.append(SamplerResult(name, skipped=choice.skipped))
                continue
            with warnings.catch_warnings():
                # QMC is "experimental"; the grid warns when it revisits a point after its last one.
                warnings.simplefilter("ignore")
                traces = [replay_run(landscape, choice.make, seed, max_trials=max_trials, stop_after=stop_after,
                                     enumerate_all=landscape.size <= budget)
                          for seed in range(seeds)]
            results.append(SamplerResult(name, traces))
            progress(f"replayed {landscape.shape} with {name} ({seeds} seeds)")
        shapes.append(ShapeReport(landscape, max_trials, results))
    return ReplayReport({k: v for k, v in doc.items() if k != "shapes"}, seeds, budget, shapes)


# -- the table -------------------------------------------------------------------------------------

def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _ratio(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.3f}"


def _trials(value: float, cap: int) -> str:
    return f">{cap}" if math.isinf(value) else f"{value:g}"


def format_report(report: ReplayReport) -> str:
    """The replay as Markdown: one table per shape, then one over every shape."""
    sweep = report.sweep
    device = sweep["device"]
    lines = [f"Replay of the {sweep['family']} sweep on {device.get('name', device['key'])} "
             f"(key {device['key']}), dtype {sweep['dtype']}, kernel version {sweep['kernel_version']}; "
             f"{report.seeds} seeds per sampler, optuna {optuna.__version__}."]
    if sweep.get("note"):
        lines.append(f"Note: {sweep['note']}")
    lines += ["", *(f"- `{r.sampler}`: {SAMPLERS[r.sampler].describe}" for r in report.shapes[0].results)]
    fractions = [f"{f:.0%}" for f in CHECKPOINTS]
    for shape in report.shapes:
        land = shape.landscape
        checkpoints = land.checkpoints()
        default_ratio = land.times.get(config_key(land.default, land.params), math.nan) / land.best_ms
        lines += ["", f"### {land.shape}", "",
                  f"{land.size} configs ({len(land.failures)} failed), best {land.best_ms:.4g} ms, "
                  f"DEFAULT {_ratio(default_ratio)}x the best; runs of at most {shape.max_trials} trials"
                  + (f" (enumerated, as the tuner enumerates a space that fits {report.budget} trials: every "
                     "sampler tries the same configs in the same order)" if land.size <= report.budget else "")
                  + ".", "",
                  "| sampler | trials to 3% | reached | "
                  + " | ".join(f"best @{f} ({n})" for f, n in zip(fractions, checkpoints))
                  + f" | best @{report.budget} |",
                  "|---" * (4 + len(checkpoints)) + "|"]
        for result in shape.results:
            if result.skipped:
                lines.append(f"| {result.sampler} | skipped: {result.skipped} |" + " |" * (2 + len(checkpoints)))
                continue
            to_within = result.trials_to_within()
            reached = sum(math.isfinite(t) for t in to_within)
            cells = [_trials(_median(to_within), shape.max_trials), f"{reached}/{len(to_within)}",
                     *(_ratio(_median(result.best_after(n))) for n in [*checkpoints, report.budget])]
            lines.append(f"| {result.sampler} | " + " | ".join(cells) + " |")
    if len(report.shapes) > 1:
        lines += _summary(report, fractions)
    return "\n".join(lines)


def _summary(report: ReplayReport, fractions: list[str]) -> list[str]:
    """Every (shape, seed) run pooled: trials to 3% as a share of the sweep's size, ratios as they are."""
    lines = ["", "### All shapes", "",
             "Medians over every (shape, seed); trials to 3% as a share of the sweep's size.", "",
             "| sampler | trials to 3% | reached | " + " | ".join(f"best @{f}" for f in fractions)
             + f" | best @{report.budget} |", "|---" * (4 + len(fractions)) + "|"]
    for i, first in enumerate(report.shapes[0].results):
        if first.skipped:
            lines.append(f"| {first.sampler} | skipped |" + " |" * (2 + len(fractions)))
            continue
        shares, at = [], [[] for _ in range(len(fractions) + 1)]
        for shape in report.shapes:
            result = shape.results[i]
            shares += [t / shape.landscape.size for t in result.trials_to_within()]
            for column, n in zip(at, [*shape.landscape.checkpoints(), report.budget]):
                column += result.best_after(n)
        share = _median(shares)
        cells = ["not reached" if math.isinf(share) else f"{share:.1%}",
                 f"{sum(math.isfinite(s) for s in shares)}/{len(shares)}", *(_ratio(_median(c)) for c in at)]
        lines.append(f"| {first.sampler} | " + " | ".join(cells) + " |")
    return lines


def version_note(doc: dict) -> str | None:
    """A warning when the sweep is not of this kernelhub's kernel; None when it is.

    Not an error: a replay compares samplers on the recorded landscape, which stays a fair test of
    the search even after the kernel changed; only its best configs are out of date.
    """
    from kernelhub.kernels.loader import get_family

    try:
        spec = get_family(doc["family"])
    except KernelhubError:
        return f"family {doc['family']!r} is not registered here; replaying the recorded landscape as it is"
    if spec.kernel_version != doc["kernel_version"]:
        return (f"the sweep was recorded with {spec.name} kernel version {doc['kernel_version']}, this kernelhub's "
                f"is {spec.kernel_version}: the replay compares samplers on the old kernel's landscape")
    return None
