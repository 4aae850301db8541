"""How many launches the tuner's compile pruning saves on int8_gemm's `tune` search space, on CPU.

    python benchmarks/cpu_compile_pruning.py                  # M=128 and M=1 (N=K=4096), bfloat16, 40 trials, 3 seeds
    python benchmarks/cpu_compile_pruning.py --markdown benchmarks/results/cpu_compile_pruning.md
    python benchmarks/cpu_compile_pruning.py --quick          # M=1, 8 trials, 1 seed

For each shape and seed the tuner runs the same study twice, same budget: without a compile check,
and with the real one for sm_90 (`kernelhub.tuning.tuner.compile_check_for` of an H100's identity:
`kernelhub.compiler.ConfigCheck`, which captures the launch on meta tensors and builds it with
Triton and ptxas on this CPU, cached on disk). Nothing is launched: the runner is a fake that
answers with the H100 roofline model of docs/sweeps/synthetic_int8_gemm.py (`modelled_seconds`)
and counts what it was asked to run. On a GPU each of those launches is a Triton compile plus
`do_bench`'s warm-up and repetitions.

Counted per run: configs tried (the budget), timed launches, configs pruned by the space's
constraints and by the compiler, proposals of configs already tried (answered from the record,
not run), and the time spent in the compile check. Then every config the run without the check
launched is compile-checked as well: how many of its launches were of configs the compiler
refuses, i.e. what that run spent on configs a GPU should never time.
"""

from __future__ import annotations

import collections
import importlib.util
import math
import random
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import optuna

from kernelhub.db import ConfigStore
from kernelhub.kernels.loader import get_family
from kernelhub.tuning.timing import Timing
from kernelhub.tuning.trial import TrialOutcome
from kernelhub.tuning.tuner import REPEAT_ATTR, Tuner, compile_check_for, study_storage

from harness import BenchmarkParser, fixed, markdown_table, publish

ROOT = Path(__file__).resolve().parent.parent
SPEC = get_family("int8_gemm")
DTYPE = "bfloat16"
NOISE = 0.015


def _synthetic_model():
    """docs/sweeps/synthetic_int8_gemm.py: the H100 roofline model and the identity it is a model of."""
    path = ROOT / "docs" / "sweeps" / "synthetic_int8_gemm.py"
    spec = importlib.util.spec_from_file_location("synthetic_int8_gemm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODEL = _synthetic_model()


class ModelTimer:
    """A trial runner that launches nothing: the model's time (noise fixed per config and shape). Keeps what it ran."""

    def __init__(self):
        self.launched: list[dict] = []

    def run(self, spec, shape, dtype, config, seed) -> TrialOutcome:
        self.launched.append(dict(config))
        seconds = MODEL.modelled_seconds(config, shape, out_bytes={"int32": 4, "float32": 4}.get(dtype, 2))
        rng = random.Random(zlib.crc32(repr((sorted(config.items()), shape)).encode()))
        ms = seconds * 1e3 * math.exp(rng.gauss(0, NOISE))
        return TrialOutcome("complete", timing=Timing(ms, ms, ms))

    def close(self) -> None:
        pass


class TimedCheck:
    """Wraps a compile check: counts its calls and the seconds spent in them."""

    def __init__(self, check):
        self.check, self.calls, self.seconds = check, 0, 0.0

    def __call__(self, spec, shape, dtype, config):
        started = time.perf_counter()
        try:
            return self.check(spec, shape, dtype, config)
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - started


def run_study(shape: tuple[int, int, int], n_trials: int, seed: int, compile_check=None) -> dict:
    """One tuning study of int8_gemm at `shape` on the model of an H100; what it tried, by outcome."""
    timer = ModelTimer()
    store, storage = ConfigStore("sqlite://"), study_storage("sqlite://")
    check = TimedCheck(compile_check) if compile_check is not None else None
    started = time.perf_counter()
    result = Tuner(store, storage, MODEL.DEVICE, seed=seed, runner=timer, progress=lambda line: None,
                   compile_check=check).tune(SPEC, shape, DTYPE, n_trials=n_trials)
    wall = time.perf_counter() - started
    trials = store.trials()
    compiler = [t for t in trials if t.state == "constraint" and t.reason.startswith("compiler:")]
    (study,) = optuna.get_all_study_summaries(storage)
    repeats = sum(REPEAT_ATTR in t.user_attrs
                  for t in optuna.load_study(study_name=study.study_name, storage=storage).trials)
    return {"M": shape[0], "N": shape[1], "K": shape[2], "seed": seed, "check": "sm_90" if check else "off",
            "tried": result.trials, "launched": len(timer.launched),
            "by constraints": sum(t.state == "constraint" for t in trials) - len(compiler),
            "by compiler": len(compiler), "repeats": repeats,
            "best ms": result.best.median_ms if result.best else None,
            "check s": check.seconds if check else None, "wall s": wall,
            "_launched": timer.launched, "_reasons": [t.reason for t in compiler],
            "_default": SPEC.default_config(shape, DTYPE)}


def refused_launches(row: dict, check) -> list[str]:
    """The compiler's reasons for the configs `row`'s run launched (its DEFAULT aside: always measured)."""
    return [reason for config in row["_launched"] if config != row["_default"]
            for reason in [check(SPEC, (row["M"], row["N"], row["K"]), DTYPE, config)] if reason]


def _reason_kind(reason: str) -> str:
    """What kind of refusal a compiler reason (`kernelhub.compiler.verdict`) is, to count them."""
    for text, kind in ((" spills ", "spills registers"), ("of shared memory per block", "exceeds shared memory"),
                       ("does not fit an SM", "no block fits an SM")):
        if text in reason:
            return kind
    return "does not compile"


def measure(shapes: Sequence[tuple[int, int, int]], n_trials: int,
            seeds: Sequence[int]) -> tuple[list[dict], list[str]]:
    """One row per (shape, seed, with or without the check); one summary line per shape."""
    rows, notes = [], []
    check = compile_check_for(MODEL.DEVICE)
    try:
        for shape in shapes:
            refused_total = launched_total = pruned_total = 0
            kinds = collections.Counter()
            for seed in seeds:
                without = run_study(shape, n_trials, seed)
                with_check = run_study(shape, n_trials, seed, compile_check=check)
                refused = refused_launches(without, check)
                without["refused launches"], with_check["refused launches"] = len(refused), 0
                rows += [without, with_check]
                refused_total += len(refused)
                launched_total += without["launched"]
                pruned_total += with_check["by compiler"]
                kinds.update(_reason_kind(r) for r in with_check["_reasons"] + refused)
            notes.append(f"M={shape[0]}, {len(seeds)} seeds: without the check, {refused_total} of {launched_total} "
                         f"launches were of configs the compiler refuses; with it, {pruned_total} configs were pruned "
                         "before launch. Refusals seen: "
                         + (", ".join(f"{kind} ({n})" for kind, n in kinds.most_common()) or "none"))
    finally:
        check.close()
    return rows, notes


COLUMNS = ("M", "N", "K", "seed", "check", "tried", "launched", "by constraints", "by compiler", "repeats",
           "refused launches", "best ms", "check s", "wall s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser(__file__, __doc__, quick={"ms": [1], "trials": 8, "seeds": 1})
    parser.add_argument("--ms", type=int, nargs="+", default=[128, 1], help="M values (N = K = 4096)")
    parser.add_argument("--trials", type=int, default=40, help="tuner budget per study (default 40)")
    parser.add_argument("--seeds", type=int, default=3, help="studies per shape and setting, seeds 0..N-1")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rows, notes = measure([(m, 4096, 4096) for m in args.ms], args.trials, range(args.seeds))
    header = (f"int8_gemm ({DTYPE} out) tuned on the H100 model ({MODEL.DEVICE.key}: times from "
              f"docs/sweeps/synthetic_int8_gemm.py, nothing launched), compile check for sm_90, {args.trials} "
              f"trials per study, optuna {optuna.__version__}.\n\n"
              "tried: configs with an outcome (the budget); launched: timed by the runner; by constraints / by "
              "compiler: pruned before launch; repeats: proposals of configs already tried, not run; refused "
              "launches: launches of configs the compiler refuses (checked afterwards); check s: seconds in the "
              "compile check (builds come from the compile cache once built); best ms: the model's.")
    text = header + "\n\n" + markdown_table(rows, COLUMNS, {"check s": fixed(1), "wall s": fixed(1)})
    publish(text + "\n\n" + "\n".join(f"- {note}" for note in notes), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
