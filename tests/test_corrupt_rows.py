"""Rows corrupted behind kernelhub's back (raw sqlite3 edits of a database ConfigStore made): every
reader survives them. `show` lists each as `invalid: <why>` beside the good rows, `export` skips
them and says how many, `prune` deletes them like stale rows, `report` lists them as skipped, and
the runtime lookup uses the good rows as if the bad ones were not there."""

from __future__ import annotations

import sqlite3

import pytest

from config_rows import best
from kernelhub import cli, configs
from kernelhub.db import ConfigStore
from kernelhub.device import current_device
from kernelhub.kernels.int8_gemm import space
from kernelhub.kernels.int8_gemm.spec import SPEC

HERE = current_device()
GOOD = "M=128,N=4096,K=4096"
TUNED = dict(space.DEFAULT_LARGE_M, BLOCK_M=64)  # the good row's config: not the DEFAULT, so its use shows

# bucket of the row -> (SQL that breaks it, what `show` must say about it)
CORRUPTIONS = {
    "M=128,N=16,K=4096": ("UPDATE kernelhub_best_configs SET median_ms = 0 WHERE bucket = ?",
                          "invalid: median_ms is 0.0, expected a finite number > 0"),
    "M=128,N=32,K=4096": ("UPDATE kernelhub_best_configs SET p20_ms = 'fast' WHERE bucket = ?",
                          "invalid: p20_ms is 'fast', expected a finite number > 0"),
    "M=128,N=48,K=4096": ("UPDATE kernelhub_best_configs SET config = '{not json' WHERE bucket = ?",
                          "invalid: config is '{not json', expected JSON text of an object of integers"),
    "M=128,N=64,K=4096": ("UPDATE kernelhub_best_configs SET config = '[[[[[[[[[[[[' || "
                          "replace(hex(zeroblob(50000)), '00', '[[') WHERE bucket = ?",
                          "invalid: config is '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[... (100012 characters)"),
    "M=128,N=80,K=4096": ("UPDATE kernelhub_best_configs SET created_at = 'last tuesday' WHERE bucket = ?",
                          "invalid: created_at is 'last tuesday', expected an ISO 8601 time"),
    "M=128,N=96,K=4096": ("UPDATE kernelhub_best_configs SET trials = 'many' WHERE bucket = ?",
                          "invalid: trials is 'many', expected an integer"),
    "M=128,N=112,K=4096": ("UPDATE kernelhub_best_configs SET dtype = 'bfloat16' || char(0) WHERE bucket = ?",
                           "invalid: dtype is 'bfloat16\\x00', expected printable text"),
    "M=128,N=128,K=4096": ("UPDATE kernelhub_best_configs SET throughput_unit = hex(zeroblob(100000)) "
                           "WHERE bucket = ?", "(200000 characters), expected at most 32 characters"),
    "M=128,N=144,K=4096": ("UPDATE kernelhub_best_configs SET config = '{\"BLOCK_M\": 3}' WHERE bucket = ?",
                           "invalid: config: missing keys"),  # JSON, but not a config of this kernel
}
BAD_DEVICE = "M=128,N=160,K=4096"  # its device row says sm_count 'lots'
UNKNOWN = "retired_kernel"


@pytest.fixture
def corrupted(private_config_db, tmp_path):
    with ConfigStore(private_config_db) as store:
        store.save_many([best(gpu_key=HERE.key, device=None, bucket=GOOD, config=TUNED)]
                        + [best(gpu_key=HERE.key, device=None, bucket=b) for b in [*CORRUPTIONS, "M=1,N=4096,K=4096"]]
                        + [best(gpu_key=HERE.key, bucket=BAD_DEVICE, device=HERE.to_dict() | {"name": "odd"}),
                           best(gpu_key=HERE.key, family=UNKNOWN, config={"B": 1}, device=None)])
    db = sqlite3.connect(tmp_path / "configs.sqlite")
    with db:
        for bucket, (sql, _) in CORRUPTIONS.items():
            db.execute(sql, (bucket,))
        db.execute("UPDATE kernelhub_devices SET sm_count = 'lots' WHERE name = 'odd'")
        # A row with NULLs where the schema forbids them: a database another tool wrote.
        db.execute("PRAGMA writable_schema = ON")
        db.execute("UPDATE sqlite_master SET sql = replace(sql, 'median_ms FLOAT NOT NULL', 'median_ms FLOAT') "
                   "WHERE name = 'kernelhub_best_configs'")
    db.close()
    db = sqlite3.connect(tmp_path / "configs.sqlite")
    with db:
        db.execute("UPDATE kernelhub_best_configs SET median_ms = NULL WHERE bucket = 'M=1,N=4096,K=4096'")
    db.close()
    return private_config_db


def test_show_marks_each_bad_row_and_shows_the_others(corrupted, capsys):
    assert cli.main(["show"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = {tuple(line.split()[1:3]): line for line in captured.out.splitlines()[2:]}
    assert len(lines) == len(CORRUPTIONS) + 4
    good = lines[SPEC.name, GOOD]
    assert good.rstrip().endswith("ok") and "0.05" in good and "BLOCK_M=64" in good
    for bucket, (_, shown) in CORRUPTIONS.items():
        assert shown in lines[SPEC.name, bucket], lines[SPEC.name, bucket]
    assert "invalid: device sm_count is 'lots', expected an integer" in lines[SPEC.name, BAD_DEVICE]
    assert "invalid: median_ms is None, expected a value, not null" in lines[SPEC.name, "M=1,N=4096,K=4096"]
    assert lines[UNKNOWN, GOOD].rstrip().endswith("stale: unknown kernel")


def test_export_skips_bad_rows_and_says_how_many(corrupted, capsys, tmp_path):
    assert cli.main(["export", "-o", str(tmp_path / "out.json")]) == 0
    err = capsys.readouterr().err
    assert "exported 1 configs" in err
    # The unknown kernel's row too: an import would refuse it.
    assert f"skipped {len(CORRUPTIONS) + 3} rows that an import would refuse" in err and "Traceback" not in err
    target = tmp_path / "other.sqlite"
    assert cli.main(["import", str(tmp_path / "out.json"), "--db", str(target)]) == 0  # what it wrote imports
    with ConfigStore(target) as store:
        assert [r.bucket for r in store.best_configs()] == [GOOD]


def test_prune_deletes_bad_rows_like_stale_ones(corrupted, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("n\n"))
    assert cli.main(["prune"]) == 0
    assert "nothing removed" in capsys.readouterr().out
    assert cli.main(["prune", "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"removed {len(CORRUPTIONS) + 2} stale or invalid rows" in out
    assert "keeping 1 rows of kernels this install does not know" in out
    with ConfigStore(create=False) as store:
        assert sorted(r.bucket for r in store.best_configs(include_invalid=True)) == [GOOD, GOOD]
        assert {r.family for r in store.best_configs()} == {SPEC.name, UNKNOWN}


def test_report_skips_bad_rows_with_their_reasons(corrupted, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    with sqlite3.connect(tmp_path / "configs.sqlite") as db:  # and a trial row gone bad
        db.execute("INSERT INTO kernelhub_trials (gpu_key, family, bucket, dtype, kernel_version, study, number, "
                   "config, state, median_ms, created_at) VALUES ('cpu', 'int8_gemm', ?, 'bfloat16', 'v', 's', "
                   "0, 'oops', 'complete', 'slow', '2025-01-01 00:00:00')", (GOOD,))
    db.close()
    assert cli.main(["report", "-o", str(tmp_path / "report")]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    summary = (tmp_path / "report" / "summary.md").read_text()
    skipped = summary.split("## Skipped")[1]
    assert "trial s 0" in skipped and "invalid: config is 'oops'" in skipped
    for bucket, (_, shown) in CORRUPTIONS.items():
        if shown.startswith("invalid: config:"):  # its values are sound: it is in the table, marked
            assert f"| {SPEC.name} | {bucket} |" in summary and "| invalid: config: missing keys" in summary
        else:
            assert f"config cpu {SPEC.name} {bucket} " in skipped
    assert f"| {SPEC.name} | {GOOD} |" in summary


def test_the_runtime_uses_the_good_rows(corrupted):
    configs.clear_cache()
    with ConfigStore(create=False) as store:  # the rows whose values are sound (one has another kernel's config)
        assert sorted(r.bucket for r in store.best_configs()) == ["M=128,N=144,K=4096", GOOD, GOOD]
    with pytest.warns(configs.ConfigDBWarning, match="ignoring stored int8_gemm config .* M=128,N=144,K=4096"):
        assert configs.best_config(SPEC, (128, 4096, 4096), "bfloat16", HERE) == TUNED
