"""A cheap test-only family for tuner processes that share one database.

Imported through KERNELHUB_FAMILIES by the worker processes of tests/test_shared_tuning.py (tests/
must be on PYTHONPATH), which run `tune_worker`. `tunes_on_cpu=True`, so `kernelhub tune` and
the Tuner time it on a CPU.

Its launch doubles the input and then sleeps for a time set by the config, so the timings differ
by config and a study has a real best; sleeping, unlike busy work, keeps that order when four
processes share two cores. SLOW_EXTRA=1 makes a config twice as slow whatever its DELAY_US.

Start barrier: with START_BARRIER_ENV set to "DIR:N", the first launch in each process waits
until N processes are inside a launch. So N workers really contend: none can finish a trial of
the first study before every one of them is running one, instead of the first worker finishing
the study while the others are still importing torch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from kernelhub.checking import mismatch_exact
from kernelhub.registry import FamilySpec, register
from kernelhub.space import SearchSpace

NAME = "test_shared_sleep"
DEFAULT = {"DELAY_US": 800, "SLOW_EXTRA": 0}
SHAPES = [(5,), (9,)]  # two studies per dtype, tuned by every worker in the same order
START_BARRIER_ENV = "KERNELHUB_TEST_START_BARRIER"
BARRIER_TIMEOUT_S = 120
_waited = False  # this process has passed the start barrier


def _wait_for_the_other_workers(spec: str) -> None:
    directory, count = spec.rsplit(":", 1)
    (Path(directory) / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while len(list(Path(directory).glob("ready-*"))) < int(count):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{START_BARRIER_ENV}: fewer than {count} workers arrived in {BARRIER_TIMEOUT_S} s")
        time.sleep(0.02)


def _launch(inputs, config, out):
    global _waited
    if not _waited and os.environ.get(START_BARRIER_ENV):
        _wait_for_the_other_workers(os.environ[START_BARRIER_ENV])
        _waited = True
    torch.mul(inputs["x"], 2, out=out)
    time.sleep(config["DELAY_US"] * (2 if config["SLOW_EXTRA"] else 1) * 1e-6)
    return out


SPEC = register(FamilySpec(
    name=NAME, summary="test only: doubles its input, slowly by config", shape_names=("N",), dtypes=("int32",),
    space=SearchSpace(params={"DELAY_US": (100, 200, 400, 800), "SLOW_EXTRA": (0, 1)}),
    default_config=lambda shape, dtype: dict(DEFAULT), defaults=(DEFAULT,),
    make_inputs=lambda shape, dtype, device, seed: {
        "x": torch.randint(-50, 50, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32)},
    reference=lambda inputs: inputs["x"] * 2, launch=_launch,
    new_output=lambda inputs: torch.empty_like(inputs["x"]),
    compare=lambda actual, expected, inputs: mismatch_exact(actual, expected),
    shape_sets={"smoke": SHAPES, "tune": SHAPES, "bench": SHAPES},
    bucket=lambda shape: shape, bucket_distance=lambda a, b: None,
    flops=lambda shape: 0, bytes_moved=lambda shape, dtype: 8 * shape[0],
    source_files=(Path(__file__),), tunes_on_cpu=True,
))


def tune_worker(url: str, seed: str, trials: str) -> None:
    """Tune every study of this family in this process: what `kernelhub tune --kernel
    test_shared_sleep --db URL --seed SEED --trials TRIALS` does, minus the worker process the CLI
    runs trials in (a torch import per tuner, which would double the test's time)."""
    from kernelhub.db import ConfigStore
    from kernelhub.device import current_device
    from kernelhub.tuning.tuner import Tuner, study_storage

    with ConfigStore(url) as store:
        tuner = Tuner(store, study_storage(url), current_device(), seed=int(seed))
        for shape in SPEC.shapes("tune"):
            for dtype in SPEC.dtypes:
                tuner.tune(SPEC, shape, dtype, n_trials=int(trials))

