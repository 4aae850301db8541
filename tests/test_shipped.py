"""Shipped configs (db/shipped.py): read after the user's database, before the DEFAULT, never trusted blindly."""

import json
import warnings

import pytest
import torch

from kernelhub import cli, configs
from kernelhub.db import BestConfig, ConfigStore
from kernelhub.device import current_device
from kernelhub.kernels.int8_gemm import space
from kernelhub.kernels.int8_gemm.spec import SPEC

CPU = current_device()
SHAPE = (1000, 4096, 4096)  # DEFAULT_LARGE_M's bucket on the CPU key
BUCKET = SPEC.format_shape(SPEC.bucket(SHAPE))
SHIPPED = dict(space.DEFAULT_LARGE_M, BLOCK_M=64, BLOCK_N=64, num_warps=4)
USERS = dict(space.DEFAULT_LARGE_M, BLOCK_M=32, BLOCK_N=64, num_warps=4)


def _entry(**overrides) -> dict:
    values = dict(gpu_key=CPU.key, family=SPEC.name, bucket=BUCKET, dtype="int32", config=SHIPPED, median_ms=1.0,
                  p20_ms=0.9, p80_ms=1.1, trials=10, kernel_version=SPEC.kernel_version,
                  torch_version=torch.__version__, triton_version=CPU.triton_version,
                  created_at="2026-01-01T00:00:00+00:00")
    return values | overrides


def _ship(tmp_path, *entries, gpu_key=CPU.key, text=None):
    folder = tmp_path / "shipped"
    folder.mkdir(exist_ok=True)
    doc = {"format": "kernelhub-configs", "version": 1, "entries": list(entries)}
    (folder / f"{gpu_key}.json").write_text(text if text is not None else json.dumps(doc))
    configs.clear_cache()


def _store(url, config, bucket=BUCKET):
    with ConfigStore(url) as store:
        store.save_best(BestConfig(**{k: v for k, v in _entry(config=config, bucket=bucket).items()
                                      if k != "created_at"}))
    configs.clear_cache()


def _lookup(shape=SHAPE):
    return configs.best_config(SPEC, shape, "int32", CPU)


def test_a_shipped_config_is_used_when_the_database_has_none(tmp_path):
    _ship(tmp_path, _entry())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _lookup() == SHIPPED
    assert not (tmp_path / "configs.sqlite").exists()  # reading never creates a database


def test_a_users_own_row_wins_over_a_shipped_one(private_config_db, tmp_path):
    _ship(tmp_path, _entry())
    _store(private_config_db, USERS)
    assert _lookup() == USERS


def test_shipped_rows_fill_the_buckets_the_user_did_not_tune(private_config_db, tmp_path):
    small = SPEC.format_shape(SPEC.bucket((1, 4096, 4096)))
    _ship(tmp_path, _entry(), _entry(bucket=small, config=dict(space.DEFAULT_SMALL_M, BLOCK_N=64)))
    _store(private_config_db, USERS)
    assert _lookup() == USERS
    assert _lookup((1, 4096, 4096)) == dict(space.DEFAULT_SMALL_M, BLOCK_N=64)


@pytest.mark.parametrize("overrides", [
    dict(kernel_version="0123456789abcdef"),  # another kernel version: stale
    dict(triton_version="2.0.0"),  # another Triton major version: stale
])
def test_a_stale_shipped_row_is_never_used(tmp_path, overrides):
    _ship(tmp_path, _entry(**overrides))
    assert _lookup() == space.DEFAULT_LARGE_M


@pytest.mark.parametrize("overrides, fragment", [
    (dict(config={"BLOCK_M": 3}), "config"),  # outside the space
    (dict(config=dict(SHIPPED, BLOCK_M=256, BLOCK_N=256, BLOCK_K=256)), "shared memory"),  # infeasible
    (dict(median_ms=-1.0), "median_ms"),  # breaks its column's rule
    (dict(bucket="M=7,N=4096,K=4096"), "bucket"),  # not a bucket
    (dict(gpu_key="h100"), "filed under gpu_key"),  # another GPU's row in this GPU's file
])
def test_an_invalid_shipped_row_is_never_used_and_is_named(tmp_path, overrides, fragment):
    _ship(tmp_path, _entry(**overrides))
    with pytest.warns(configs.ConfigDBWarning, match=fragment):
        assert _lookup() == space.DEFAULT_LARGE_M


def test_one_bad_entry_does_not_hide_the_good_ones(tmp_path):
    small = SPEC.format_shape(SPEC.bucket((1, 4096, 4096)))
    _ship(tmp_path, _entry(config={"BLOCK_M": 3}, bucket=small), _entry())
    with pytest.warns(configs.ConfigDBWarning, match="entry 0 skipped"):
        assert _lookup() == SHIPPED


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": "kernelhub-configs", "version": 1}', "\xff"])
def test_an_unreadable_shipped_file_falls_back_with_one_warning(tmp_path, text):
    _ship(tmp_path, text=text)
    with pytest.warns(configs.ConfigDBWarning) as record:
        assert _lookup() == space.DEFAULT_LARGE_M
        assert _lookup((1001, 4096, 4096)) == space.DEFAULT_LARGE_M
    assert len([w for w in record if issubclass(w.category, configs.ConfigDBWarning)]) == 1


def test_the_layer_can_be_turned_off(tmp_path, monkeypatch):
    _ship(tmp_path, _entry())
    monkeypatch.setenv("KERNELHUB_SHIPPED_DIR", "")
    configs.clear_cache()
    assert _lookup() == space.DEFAULT_LARGE_M


def test_ops_launch_a_shipped_config(tmp_path, monkeypatch):
    import kernelhub.ops as ops

    monkeypatch.setenv("KERNELHUB_BACKEND", "triton")
    bucket = SPEC.format_shape(SPEC.bucket((5, 7, 40)))
    _ship(tmp_path, _entry(bucket=bucket, config=dict(space.DEFAULT_SMALL_M, BLOCK_N=32, BLOCK_K=32)))
    assert _lookup((5, 7, 40)) == dict(space.DEFAULT_SMALL_M, BLOCK_N=32, BLOCK_K=32)
    a = torch.randint(-128, 128, (5, 40), dtype=torch.int8)
    b = torch.randint(-128, 128, (40, 7), dtype=torch.int8)
    assert torch.equal(ops.int8_gemm(a, b), (a.long() @ b.long()).int())


def test_show_says_where_each_row_comes_from(capsys, private_config_db, tmp_path):
    small = SPEC.format_shape(SPEC.bucket((1, 4096, 4096)))
    _ship(tmp_path, _entry(), _entry(bucket=small, config=dict(space.DEFAULT_SMALL_M, BLOCK_N=64)),
          _entry(bucket=small, kernel_version="0123456789abcdef"))
    _store(private_config_db, USERS)
    assert cli.main(["show"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    by_source = {}
    for row in rows:
        source = row[row.index("database") if "database" in row else row.index("shipped")]
        by_source.setdefault(source, []).append(" ".join(row))
    assert len(by_source["database"]) == 1 and by_source["database"][0].endswith("ok")
    shipped = by_source["shipped"]
    assert len(shipped) == 3
    assert sum(line.endswith("ok, the database's row is used") for line in shipped) == 1
    assert sum(line.endswith("stale: kernel changed") for line in shipped) == 1
    assert sum(line.endswith("shipped ok") for line in shipped) == 1


def test_show_lists_shipped_rows_without_a_database(capsys, tmp_path):
    _ship(tmp_path, _entry(), _entry(config={"BLOCK_M": 3}, bucket="M=1,N=4096,K=4096"))
    assert cli.main(["show"]) == 0
    captured = capsys.readouterr()
    assert "no config database yet" in captured.out and "shipped" in captured.out
    assert "entry 1 skipped" in captured.err and "Traceback" not in captured.err


def test_export_ship_writes_the_file_the_runtime_reads(capsys, private_config_db, tmp_path):
    _store(private_config_db, USERS)
    with ConfigStore(private_config_db) as store:  # an older kernel's row is never shipped
        store.save_best(BestConfig(**{k: v for k, v in _entry(kernel_version="0123456789abcdef",
                                                                bucket="M=1,N=4096,K=4096").items()
                                      if k != "created_at"}))
    (tmp_path / "shipped").mkdir()
    assert cli.main(["export", "--ship"]) == 0
    err = capsys.readouterr().err
    assert "exported 1 shipped configs of cpu" in err and "left out 1 rows of older kernel versions" in err
    written = tmp_path / "shipped" / "cpu.json"
    doc = json.loads(written.read_text())
    assert [e["config"] for e in doc["entries"]] == [USERS]
    with ConfigStore(private_config_db) as store:  # only the shipped file answers now
        store.delete_best(store.best_configs())
    configs.clear_cache()
    assert _lookup() == USERS
    before = written.read_text()
    assert cli.main(["export", "--ship", "--gpu", "cpu"]) == 1  # an existing file is refused without --force
    assert "exists; pass --force" in capsys.readouterr().err and written.read_text() == before


def test_export_ship_needs_one_gpu(capsys, private_config_db):
    _store(private_config_db, USERS)
    with ConfigStore(private_config_db) as store:
        store.save_best(BestConfig(**{k: v for k, v in _entry(gpu_key="h100").items() if k != "created_at"}))
    assert cli.main(["export", "--ship"]) == 1
    err = capsys.readouterr().err
    assert "holds cpu, h100: name one with --gpu" in err


def test_prune_never_touches_shipped_files(capsys, tmp_path):
    _ship(tmp_path, _entry(kernel_version="0123456789abcdef"))
    before = (tmp_path / "shipped" / "cpu.json").read_text()
    assert cli.main(["prune", "--yes"]) == 0
    assert (tmp_path / "shipped" / "cpu.json").read_text() == before
