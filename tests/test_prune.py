"""`kernelhub show` marks stale rows; `kernelhub prune` lists them, asks, and deletes only those."""

from __future__ import annotations

import dataclasses
import io
from datetime import datetime, timezone

import pytest

from kernelhub import cli
from kernelhub.db import BestConfig, ConfigStore
from kernelhub.device import current_device
from kernelhub.kernels.int8_gemm import space
from kernelhub.kernels.int8_gemm.spec import SPEC

THIS_DEVICE = current_device()
BUCKET = "M=128,N=4096,K=4096"


def _row(**overrides) -> BestConfig:
    """A row tuned on this very device with the current kernel: fresh unless overridden."""
    values = dict(gpu_key=THIS_DEVICE.key, family=SPEC.name, bucket=BUCKET, dtype="bfloat16",
                  config=dict(space.DEFAULT_LARGE_M), median_ms=0.05, p20_ms=0.049, p80_ms=0.052, trials=40,
                  kernel_version=SPEC.kernel_version, torch_version=THIS_DEVICE.torch_version,
                  triton_version=THIS_DEVICE.triton_version, device=THIS_DEVICE.to_dict())
    return BestConfig(**(values | overrides))


H100 = dataclasses.replace(THIS_DEVICE, key="h100", name="NVIDIA H100 80GB HBM3", vendor="nvidia",
                           compute_capability="9.0", sm_count=132).to_dict()
ROWS = {
    "fresh": _row(),
    "fresh, another GPU": _row(gpu_key="h100", device=H100, triton_version="3.6.0"),
    "kernel changed": _row(dtype="float16", kernel_version="0123456789abcdef"),
    "triton changed": _row(bucket="M=1,N=4096,K=4096", triton_version="2.3.1"),
    "kernel changed, another GPU": _row(gpu_key="h100", device=H100, kernel_version="0123456789abcdef"),
    "unknown family": _row(family="retired_kernel", config={"BLOCK": 1}),
}
STALE = {"kernel changed", "triton changed", "kernel changed, another GPU"}


def _now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture
def seeded(private_config_db):
    with ConfigStore(private_config_db) as store:
        store.save_many(ROWS.values())
    return private_config_db


def _stored() -> set[str]:
    """Which of ROWS the database still holds."""
    with ConfigStore() as store:
        keys = {(r.gpu_key, r.family, r.bucket, r.dtype, r.kernel_version) for r in store.best_configs()}
    return {name for name, r in ROWS.items() if (r.gpu_key, r.family, r.bucket, r.dtype, r.kernel_version) in keys}


def _prune(monkeypatch, answer: str, *args: str) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(answer))
    return cli.main(["prune", *args])


def test_show_marks_every_stale_row(seeded, capsys):
    assert cli.main(["show"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("stale" in line for line in lines) == len(STALE) + 1  # and the unknown family's row
    assert sum("stale: kernel changed" in line for line in lines) == 2
    assert sum("stale: tuned with triton 2.3.1" in line for line in lines) == 1
    assert sum("stale: unknown kernel" in line for line in lines) == 1
    assert sum(line.rstrip().endswith(" ok") for line in lines) == 2


@pytest.mark.parametrize("answer", ["n\n", "\n", "", "nope\n"], ids=["no", "enter", "end-of-input", "other"])
def test_prune_asks_and_keeps_everything_unless_told_yes(seeded, capsys, monkeypatch, answer):
    assert _prune(monkeypatch, answer) == 0
    out = capsys.readouterr().out
    assert f"remove these {len(STALE)} rows" in out and "nothing removed" in out
    assert "0123456789abcdef" not in out and out.count("stale: kernel changed") == 2
    assert _stored() == set(ROWS)


@pytest.mark.parametrize("answer", ["y\n", "YES\n"])
def test_prune_removes_the_stale_rows_on_yes(seeded, capsys, monkeypatch, answer):
    assert _prune(monkeypatch, answer) == 0
    out = capsys.readouterr().out
    assert "removed 3 stale or invalid rows" in out
    assert "keeping 1 rows of kernels this install does not know" in out
    assert _stored() == set(ROWS) - STALE


def test_prune_yes_does_not_ask(seeded, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO())  # an answer would be read as "no"
    assert cli.main(["prune", "--yes"]) == 0
    assert "removed 3 stale or invalid rows" in capsys.readouterr().out
    assert _stored() == set(ROWS) - STALE
    assert cli.main(["prune", "--yes"]) == 0  # nothing left to do
    assert "no stale or invalid rows" in capsys.readouterr().out
    assert _stored() == set(ROWS) - STALE


def test_prune_filters_by_gpu(seeded, capsys, monkeypatch):
    assert _prune(monkeypatch, "", "--yes", "--gpu", "h100") == 0
    assert "removed 1 stale or invalid rows" in capsys.readouterr().out
    assert _stored() == set(ROWS) - {"kernel changed, another GPU"}


def test_prune_keeps_a_row_tuned_again_after_it_was_listed(seeded, capsys, monkeypatch):
    def answer_yes_while_a_tuner_rewrites_the_row(prompt: str) -> str:
        with ConfigStore() as store:  # the stale row's key, tuned again with the current Triton
            store.save_best(dataclasses.replace(ROWS["triton changed"], median_ms=0.04, created_at=_now(),
                                                triton_version=THIS_DEVICE.triton_version))
        return "y"

    monkeypatch.setattr("builtins.input", answer_yes_while_a_tuner_rewrites_the_row)
    assert cli.main(["prune"]) == 0
    assert "removed 2 stale or invalid rows; 1 changed since listed and were kept" in capsys.readouterr().out
    assert _stored() == set(ROWS) - STALE | {"triton changed"}


def test_prune_on_a_missing_database_creates_nothing(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'none.sqlite'}"
    assert cli.main(["prune", "--yes", "--db", url]) == 0
    assert "no config database yet" in capsys.readouterr().out
    assert not (tmp_path / "none.sqlite").exists()


def test_prune_rejects_an_unknown_kernel(seeded, capsys):
    assert cli.main(["prune", "--kernel", "nope"]) == 1
    assert "unknown kernel family 'nope'" in capsys.readouterr().err
    assert _stored() == set(ROWS)
