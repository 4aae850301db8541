"""`kernelhub sweep` (every feasible config, measured, into a file) and `kernelhub replay` (samplers on it)."""

import dataclasses
import itertools
import json
import math
from pathlib import Path

import optuna
import pytest
import torch

from kernelhub import cli, registry
from kernelhub.checking import mismatch_exact
from kernelhub.device import current_device
from kernelhub.errors import KernelhubError
from kernelhub.kernels import loader
from kernelhub.registry import FamilySpec
from kernelhub.space import SearchSpace
from kernelhub.tuning import replay, tuner
from kernelhub.tuning.sweep import SweepFileError, load_sweep, run_sweep, validate_sweep, write_sweep
from kernelhub.tuning.trial import InProcessRunner

FAMILY = "test_sweep_doubling"
DEFAULT = {"BLOCK": 16, "WIDE": 0, "BROKEN": 0}
WIDE_DEFAULT = {"BLOCK": 64, "WIDE": 1, "BROKEN": 0}  # a second DEFAULT that the constraint rejects


def _no_wide_64(config, shape, smem_bytes):
    return "BLOCK=64 with WIDE=1 does not fit" if config["BLOCK"] == 64 and config["WIDE"] else None


def _family() -> FamilySpec:
    """A test-only family that tunes on CPU: out = 2 * x, computed wrongly whenever BROKEN=1."""

    def launch(inputs, config, out):
        out.copy_(inputs["x"] * (3 if config["BROKEN"] else 2))
        return out

    return FamilySpec(
        name=FAMILY, summary="test only", shape_names=("N",), dtypes=("int32", "int64"),
        space=SearchSpace(params={"BLOCK": (16, 32, 64), "WIDE": (0, 1), "BROKEN": (0, 1)}, constraints=(_no_wide_64,)),
        default_config=lambda shape, dtype: dict(DEFAULT), defaults=(DEFAULT, WIDE_DEFAULT),
        make_inputs=lambda shape, dtype, device, seed: {"x": torch.randint(
            1, 100, shape, generator=torch.Generator().manual_seed(seed), dtype=getattr(torch, dtype))},
        reference=lambda inputs: inputs["x"] * 2, launch=launch,
        new_output=lambda inputs: torch.empty_like(inputs["x"]),
        compare=lambda actual, expected, inputs: mismatch_exact(actual, expected),
        shape_sets={"smoke": [(5,), (9,)], "tune": [(5,)], "bench": [(5,)]},
        bucket=lambda shape: shape, bucket_distance=lambda a, b: None,
        flops=lambda shape: 0, bytes_moved=lambda shape, dtype: 8 * shape[0],
        source_files=(Path(__file__),), tunes_on_cpu=True,
    )


@pytest.fixture
def family(monkeypatch):
    """The test family, registered for this test only; `kernelhub sweep` runs its trials in process.

    (The CLI's isolated worker process has a registry of its own, which never sees this family.)
    """
    loader.families()  # the built-in families first, so the monkeypatched entry is the only change
    spec = _family()
    monkeypatch.setitem(registry._FAMILIES, FAMILY, spec)
    monkeypatch.setattr(cli, "_trial_runner", lambda torch_device, trial_timeout: InProcessRunner(torch_device))
    return spec


def _key(config):
    return tuple(config[name] for name in ("BLOCK", "WIDE", "BROKEN"))


# -- sweep -----------------------------------------------------------------------------------------

def test_sweep_holds_every_feasible_config_once_with_its_timing_or_failure(family, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert cli.main(["sweep", "--gpu", "cpu", "--kernel", FAMILY, "--shapes", "smoke", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    doc = load_sweep(out)
    assert (doc["family"], doc["dtype"], doc["shape_set"]) == (FAMILY, "int32", "smoke")
    assert doc["kernel_version"] == family.kernel_version and doc["device"] == current_device().to_dict()
    assert [s["shape"] for s in doc["shapes"]] == ["N=5", "N=9"]
    every = [dict(zip(("BLOCK", "WIDE", "BROKEN"), v)) for v in itertools.product((16, 32, 64), (0, 1), (0, 1))]
    feasible = [c for c in every if _no_wide_64(c, None, 0) is None]
    for shape in doc["shapes"]:
        keys = [_key(c["config"]) for c in shape["configs"]]
        assert len(keys) == len(set(keys))  # once each
        assert set(keys) == {_key(c) for c in feasible} | {_key(WIDE_DEFAULT)}
        assert shape["default"] == DEFAULT
        for entry in shape["configs"]:
            assert ("infeasible" in entry) == (entry["config"] == WIDE_DEFAULT)
            if entry["config"]["BROKEN"]:
                assert entry["state"] == "mismatch" and "differ" in entry["reason"] and "median_ms" not in entry
            else:
                assert entry["state"] == "complete" and "reason" not in entry
                assert 0 < entry["p20_ms"] <= entry["median_ms"] <= entry["p80_ms"]


class _CountingRunner(InProcessRunner):
    """Runs trials in process; counts them, and raises KeyboardInterrupt at shape `stop_at` if given."""

    def __init__(self, stop_at=None):
        super().__init__(torch.device("cpu"))
        self.shapes, self.stop_at = [], stop_at

    def run(self, spec, shape, dtype, config, seed):
        if shape == self.stop_at:
            raise KeyboardInterrupt
        self.shapes.append(shape)
        return super().run(spec, shape, dtype, config, seed)


def test_interrupted_sweep_keeps_finished_shapes_and_resumes(family, tmp_path):
    out, device = tmp_path / "sweep.json", current_device()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(family, "smoke", "int32", device, out, runner=_CountingRunner(stop_at=(9,)), progress=lambda s: None)
    assert [s["shape"] for s in load_sweep(out)["shapes"]] == ["N=5"]
    runner = _CountingRunner()
    doc = run_sweep(family, "smoke", "int32", device, out, runner=runner, progress=lambda s: None)
    assert set(runner.shapes) == {(9,)}  # N=5 was not measured again
    assert [s["shape"] for s in doc["shapes"]] == ["N=5", "N=9"] == [s["shape"] for s in load_sweep(out)["shapes"]]


def test_sweep_never_overwrites_another_sweep(family, tmp_path):
    out = tmp_path / "sweep.json"
    run_sweep(family, "tune", "int32", current_device(), out, progress=lambda s: None)
    before = out.read_bytes()
    with pytest.raises(KernelhubError, match="already holds another sweep.*dtype.*nothing was overwritten"):
        run_sweep(family, "tune", "int64", current_device(), out, progress=lambda s: None)
    assert out.read_bytes() == before


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "cpu", "--kernel", "int8_gemm", "--shapes", "smoke"], "refusing to tune int8_gemm on cpu"),
    (["--gpu", "h100", "--kernel", FAMILY, "--shapes", "smoke"], "--gpu h100 does not match"),
    (["--gpu", "cpu", "--kernel", "no_such_kernel", "--shapes", "smoke"], "unknown kernel family 'no_such_kernel'"),
    (["--gpu", "cpu", "--kernel", FAMILY, "--shapes", "huge"], "unknown shape set 'huge'"),
    (["--gpu", "cpu", "--kernel", FAMILY, "--shapes", "smoke", "--dtype", "float8"], "--dtype float8"),
], ids=["interpreter-family-on-cpu", "another-gpu", "unknown-family", "unknown-shape-set", "unknown-dtype"])
def test_sweep_refusals_are_one_line_and_write_nothing(family, tmp_path, capsys, argv, message):
    out = tmp_path / "sweep.json"
    assert cli.main(["sweep", *argv, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# -- replay ------------------------------------------------------------------------------------------

PARAMS = {"A": [1, 2, 3, 4], "B": [1, 2, 3], "C": [0, 1]}  # 24 configs


def _sweep_doc(times, *, default=None, failures=(), family="synthetic_test", kernel_version="v1"):
    """A sweep file's document: `times` maps config tuples to ms; `failures` are configs that mismatched."""
    configs = [{"config": dict(zip(PARAMS, key)), "state": "complete", "median_ms": ms, "p20_ms": ms, "p80_ms": ms}
               for key, ms in times.items()]
    configs += [{"config": dict(zip(PARAMS, key)), "state": "mismatch", "reason": "1 of 4 elements differ"}
                for key in failures]
    doc = {"format": "kernelhub-sweep", "version": 1, "device": {"key": "test"}, "family": family,
           "kernel_version": kernel_version, "dtype": "int32", "shape_set": "smoke", "space": PARAMS,
           "shapes": [{"shape": "N=1", "default": dict(zip(PARAMS, default or (1, 1, 0))), "configs": configs}]}
    validate_sweep(doc)
    return doc


def _all_configs():
    return list(itertools.product(*PARAMS.values()))


def test_grid_finds_a_ten_times_faster_config_within_the_sweep():
    fast = (3, 2, 1)
    doc = _sweep_doc({key: 0.1 if key == fast else 1.0 for key in _all_configs()})
    report = replay.replay_sweep(doc, samplers=["grid", "random"], seeds=3, budget=5)
    (shape,) = report.shapes
    size = shape.landscape.size
    assert size == 24 and shape.landscape.checkpoints() == [3, 5, 12]
    grid, random = shape.results
    # The grid covers every combination; its proposal of the enqueued DEFAULT is a repeat, not a trial.
    assert all(t <= size for t in grid.trials_to_within())
    assert grid.best_after(size) == [1.0, 1.0, 1.0]
    for result in (grid, random):
        for trace in result.traces:
            assert trace[0] == 10.0  # the DEFAULT runs first, 10x slower than the best
            assert set(trace) <= {10.0, 1.0} and trace == sorted(trace, reverse=True)
            assert len(trace) <= max(size, report.budget)


def test_a_best_default_is_found_at_the_first_trial_by_every_sampler():
    times = {key: 1.0 + sum(key) / 10 for key in _all_configs()}
    times[(2, 3, 1)] = 0.5  # the DEFAULT
    report = replay.replay_sweep(_sweep_doc(times, default=(2, 3, 1)), seeds=2, budget=4)
    ran = [r for r in report.shapes[0].results if not r.skipped]
    assert {r.sampler for r in ran} >= {"tuner", "tpe-independent", "tpe-multivariate", "random", "grid"}
    for result in ran:
        assert result.trials_to_within() == [1, 1]
        assert result.best_after(1) == [1.0, 1.0]


def test_failed_and_infeasible_configs_never_count_as_best():
    keys = _all_configs()
    infeasible = [k for k in keys if k[0] == 4]  # not in the sweep: the constraints rejected them
    failed = [k for k in keys if k[0] == 3]
    times = {k: 1.0 + k[1] / 10 + k[2] / 100 for k in keys if k not in infeasible and k not in failed}
    doc = _sweep_doc(times, failures=failed)
    report = replay.replay_sweep(doc, seeds=3, budget=30)
    land = report.shapes[0].landscape
    assert land.size == len(times) + len(failed) and land.best_ms == 1.1
    possible = {ms / land.best_ms for ms in times.values()}
    for result in report.shapes[0].results:
        for trace, to_within in zip(result.traces, result.trials_to_within()):
            assert set(trace) <= possible and trace == sorted(trace, reverse=True)
            assert 1 <= to_within <= len(trace) or (math.isinf(to_within) and trace[-1] > replay.WITHIN)
            if math.isfinite(to_within):
                assert trace[to_within - 1] <= replay.WITHIN and all(r > replay.WITHIN for r in trace[:to_within - 1])


def test_the_tuner_row_uses_the_tuners_sampler_factory(monkeypatch):
    made = []

    def factory(seed):
        made.append(seed)
        return optuna.samplers.RandomSampler(seed=seed)

    monkeypatch.setattr(tuner, "DEFAULT_SAMPLER", factory)
    doc = _sweep_doc({key: 1.0 + sum(key) / 10 for key in _all_configs()})
    tuner_row, random_row = replay.replay_sweep(doc, samplers=["tuner", "random"], seeds=3, budget=5).shapes[0].results
    assert made == [0, 1, 2]
    assert tuner_row.traces == random_row.traces


def test_report_table_has_every_sampler_and_the_reason_for_a_skip():
    doc = _sweep_doc({key: 1.0 + sum(key) / 10 for key in _all_configs()})
    text = replay.format_report(replay.replay_sweep(doc, samplers=["random", "cmaes"], seeds=2, budget=5))
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| sampler | trials to 3% | reached | best @10% (3) | best @20% (5) | best @50% (12)")
    assert rows[1].startswith("| random | ") and rows[1].count("|") == rows[0].count("|")
    assert rows[2].startswith("| cmaes | skipped: ") and "categorical" in rows[2]


def test_cli_round_trip_sweep_then_replay(family, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert cli.main(["sweep", "--gpu", "cpu", "--kernel", FAMILY, "--shapes", "smoke", "-o", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["replay", str(out), "--seeds", "2", "--samplers", "grid", "tuner", "--budget", "4"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err  # this kernel version, a registered family
    assert "### N=5" in captured.out and "### N=9" in captured.out and "### All shapes" in captured.out
    assert captured.out.count("| grid | ") == 3 and captured.out.count("| tuner | ") == 3


def test_replay_of_another_kernel_version_warns_and_still_runs(family, tmp_path, capsys):
    out = tmp_path / "old.json"
    doc = _sweep_doc({key: 1.0 + sum(key) / 10 for key in _all_configs()}, family=FAMILY, kernel_version="0ld")
    write_sweep(out, doc)
    assert cli.main(["replay", str(out), "--seeds", "1", "--samplers", "random"]) == 0
    captured = capsys.readouterr()
    assert f"warning: the sweep was recorded with {FAMILY} kernel version 0ld" in captured.err
    assert "| random | " in captured.out


def _mutate(doc, change):
    change(doc)
    return doc


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ('["a list"]', "not a kernelhub-sweep document"),
    (json.dumps({"format": "kernelhub-sweep", "version": 2}), "version 2, this kernelhub reads 1; upgrade kernelhub"),
    (lambda d: d.pop("space"), "field 'space' is missing"),
    (lambda d: d["shapes"][0]["configs"][0]["config"].update(D=1), "unknown keys ['D']"),
    (lambda d: d["shapes"][0]["configs"][1].update(config=d["shapes"][0]["configs"][0]["config"]), "appears twice"),
    (lambda d: d["shapes"][0]["configs"][3].update(median_ms=-1), "median_ms is -1, expected a positive number"),
    (lambda d: d["shapes"][0]["configs"][3].update(state="lost"), "state is 'lost'"),
    (lambda d: d["shapes"][0]["configs"].pop(0), "the DEFAULT {'A': 1, 'B': 1, 'C': 0} was not measured"),
], ids=["not-json", "not-an-object", "newer-version", "no-space", "unknown-tunable", "duplicate", "negative-time",
        "unknown-state", "default-missing"])
def test_malformed_sweep_files_are_refused_with_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.json"
    if callable(text):
        text = json.dumps(_mutate(_sweep_doc({key: 1.0 for key in _all_configs()}), text))
    path.write_text(text)
    with pytest.raises(SweepFileError, match="bad.json"):
        load_sweep(path)
    assert cli.main(["replay", str(path)]) == 1
    err = capsys.readouterr().err
    assert message in err and f"sweep file {path}" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--samplers", "annealing"], "--samplers: unknown annealing"),
], ids=["unknown-sampler"])
def test_replay_argument_errors(tmp_path, capsys, argv, message):
    path = tmp_path / "sweep.json"
    write_sweep(path, _sweep_doc({key: 1.0 for key in _all_configs()}))
    assert cli.main(["replay", str(path), *argv]) == 1
    assert message in capsys.readouterr().err


# -- the replay is the tuner ---------------------------------------------------------------------------

class _SweepRunner:
    """A trial runner that answers from a sweep's landscape, as a replay looks a trial up."""

    def __init__(self, landscape):
        self.landscape = landscape

    def run(self, spec, shape, dtype, config, seed):
        from kernelhub.tuning.timing import Timing
        from kernelhub.tuning.trial import TrialOutcome

        key = tuple(config[name] for name in PARAMS)
        if key in self.landscape.failures:
            return TrialOutcome(*self.landscape.failures[key])
        ms = self.landscape.times[key]
        return TrialOutcome("complete", timing=Timing(ms, ms, ms))

    def close(self):
        pass


@pytest.mark.parametrize("budget", [6, 30], ids=["sampled", "enumerated"])
def test_the_tuner_row_replays_what_the_tuner_does(budget):
    """The Tuner, with trials answered from a sweep, tries the same configs in the same order as the
    replay's "tuner" row: same sampler, DEFAULT first, repeats not counted, enumeration when the sweep fits."""
    from kernelhub.db import ConfigStore

    keys = _all_configs()
    failed = [k for k in keys if k[0] == 3]
    times = {k: 1.0 + k[1] / 10 + k[2] / 100 + k[0] / 1000 for k in keys if k[0] != 4 and k not in failed}
    doc = _sweep_doc(times, failures=failed)  # A=4 is infeasible: not in the sweep
    land = replay.Landscape.from_sweep(doc["space"], doc["shapes"][0])
    assert (land.size <= budget) == (budget == 30)

    def in_sweep(config, shape, smem):
        key = tuple(config[name] for name in PARAMS)
        return None if key in land.times or key in land.failures else "not in the sweep"

    spec = dataclasses.replace(_family(), name="test_replayed", space=SearchSpace(PARAMS, constraints=(in_sweep,)),
                               default_config=lambda shape, dtype: dict(land.default))
    store = ConfigStore("sqlite://")
    device = dataclasses.replace(current_device(), key="test-cpu")
    tuner.Tuner(store, tuner.study_storage("sqlite://"), device, seed=2, runner=_SweepRunner(land),
                progress=lambda line: None).tune(spec, (5,), "int32", n_trials=budget)
    best, tuned = math.inf, []
    for row in store.trials():
        if row.state == "complete":
            best = min(best, row.median_ms / land.best_ms)
        tuned.append(best)
    replayed = replay.replay_run(land, replay.SAMPLERS["tuner"].make, 2, max_trials=budget, stop_after=budget,
                                 enumerate_all=land.size <= budget)
    assert tuned == replayed and len(tuned) == min(budget, land.size)
