"""The config database: round trips, upserts, opening foreign/broken/newer/older databases,
export/import validation, and concurrent writers. Every database lives under tmp_path."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading

import pytest

from filesystem import unwritable_directory
from kernelhub import registry
from kernelhub.db import (SCHEMA_VERSION, BestConfig, ConfigStore, TrialRecord, default_url, export_configs,
                          import_configs, load_export_file)
from kernelhub.db import store as store_module
from kernelhub.db.store import sqlite_path
from kernelhub.errors import ConfigDBError
from kernelhub.kernels.loader import get_family
from kernelhub.space import SearchSpace

DEVICE = {"key": "h100", "name": "NVIDIA H100 80GB HBM3", "vendor": "nvidia", "compute_capability": "9.0",
          "sm_count": 132, "memory_bytes": 85_045_231_616, "shared_memory_bytes": 232448,
          "cuda_version": "12.8", "torch_version": "2.11.0", "triton_version": "3.6.0"}
CPU_DEVICE = {"key": "cpu", "name": "cpu", "vendor": "cpu", "compute_capability": None, "sm_count": None,
              "memory_bytes": None, "shared_memory_bytes": 101376, "cuda_version": None,
              "torch_version": "2.13.0", "triton_version": None}


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    """No test may reach the real ~/.cache/kernelhub."""
    monkeypatch.delenv("KERNELHUB_DB", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def fake_family(monkeypatch):
    """A tiny family `toy` (shape (M, N), M bucketed to powers of two) as the only registered one."""
    monkeypatch.setattr(registry, "_FAMILIES", {})
    space = SearchSpace(params={"BLOCK": (16, 32, 64), "num_warps": (4, 8)})
    default = {"BLOCK": 32, "num_warps": 4}
    return registry.register(registry.FamilySpec(
        name="toy", summary="test family", shape_names=("M", "N"), dtypes=("float16", "bfloat16"),
        space=space, default_config=lambda shape, dtype: dict(default), defaults=(default,),
        make_inputs=None, reference=None, launch=None, new_output=None, compare=None,
        shape_sets={"smoke": [(1, 8)], "tune": [(1, 8)], "bench": [(1, 8)]},
        bucket=lambda shape: (1 << (shape[0] - 1).bit_length(), shape[1]),
        bucket_distance=lambda a, b: None, flops=lambda shape: 0, bytes_moved=lambda shape, dtype: 0,
        source_files=(),
    ))


def make_best(**overrides) -> BestConfig:
    values = dict(gpu_key="h100", family="toy", bucket="M=128,N=4096", dtype="bfloat16",
                  config={"BLOCK": 64, "num_warps": 8}, median_ms=0.125, p20_ms=0.12, p80_ms=0.13,
                  throughput=550.5, throughput_unit="TFLOP/s", default_median_ms=0.2, trials=40,
                  kernel_version="v1", triton_version="3.6.0", torch_version="2.11.0", cuda_version="12.8",
                  device=DEVICE)
    return BestConfig(**(values | overrides))


def make_trial(**overrides) -> TrialRecord:
    values = dict(gpu_key="h100", family="toy", bucket="M=128,N=4096", dtype="bfloat16", kernel_version="v1",
                  study="s1", number=0, config={"BLOCK": 16, "num_warps": 4}, state="complete",
                  median_ms=0.3, p20_ms=0.29, p80_ms=0.31)
    return TrialRecord(**(values | overrides))


def without_ids(rows):
    return [dataclasses.replace(row, id=None) for row in rows]


def file_state(path):
    """Bytes of a database file and the names beside it, to prove an open attempt changed nothing."""
    return path.read_bytes(), sorted(p.name for p in path.parent.iterdir())


# -- round trips ---------------------------------------------------------------------------------


def test_best_config_round_trip(tmp_path):
    entries = [make_best(), make_best(gpu_key="cpu", device=CPU_DEVICE, cuda_version=None, triton_version=None,
                                      throughput=None, throughput_unit=None, default_median_ms=None),
               make_best(bucket="M=1,N=4096", dtype="float16", device=None)]
    with ConfigStore(tmp_path / "c.sqlite") as store:
        for entry in entries:
            store.save_best(entry)
    with ConfigStore(tmp_path / "c.sqlite", create=False) as store:
        rows = store.best_configs()
        assert without_ids(rows) == [entries[1], entries[0], entries[2]]  # by (gpu, family, dtype, bucket)
        assert all(row.id is not None for row in rows)
        assert without_ids(store.best_configs(gpu_key="h100", dtype="bfloat16")) == [entries[0]]
        assert store.best_configs(family="other") == []


def test_trials_round_trip_and_replace(tmp_path):
    with ConfigStore(tmp_path / "c.sqlite") as store:
        store.add_trial(make_trial(number=1, state="pruned", reason="too much shared memory",
                                   median_ms=None, p20_ms=None, p80_ms=None))
        store.add_trial(make_trial(number=0))
        store.add_trial(make_trial(study="s0", number=5, bucket="M=1,N=4096"))
        replaced = make_trial(number=0, state="failed", reason="wrong result", median_ms=None)
        store.add_trial(replaced)
        rows = without_ids(store.trials())
        assert [(r.study, r.number) for r in rows] == [("s0", 5), ("s1", 0), ("s1", 1)]
        assert rows[1] == replaced
        assert rows[2].reason == "too much shared memory" and rows[2].median_ms is None
        assert [r.number for r in store.trials(study="s1", bucket="M=128,N=4096")] == [0, 1]
        with pytest.raises(ConfigDBError, match="c.sqlite"):  # states outside the three are refused
            store.add_trial(make_trial(number=9, state="running"))


def test_save_again_replaces_and_other_kernel_versions_are_kept(tmp_path):
    with ConfigStore(tmp_path / "c.sqlite") as store:
        store.save_best(make_best())
        store.save_best(make_best(kernel_version="v0", median_ms=0.5))
        faster = make_best(config={"BLOCK": 32, "num_warps": 4}, median_ms=0.1)
        store.save_best(faster)
        assert without_ids(store.best_configs(kernel_version="v1")) == [faster]
        assert [r.median_ms for r in store.best_configs(kernel_version="v0")] == [0.5]
        assert len(store.best_configs()) == 2


def test_record_device_is_get_or_create(tmp_path):
    with ConfigStore(tmp_path / "c.sqlite") as store:
        first = store.record_device(DEVICE)
        assert store.record_device(dict(DEVICE)) == first
        cpu = store.record_device(CPU_DEVICE)  # NULL columns must match too
        assert store.record_device(CPU_DEVICE) == cpu != first
        assert store.record_device(DEVICE | {"triton_version": "3.7.0"}) not in (first, cpu)
        with pytest.raises(ConfigDBError, match="lacks"):
            store.record_device({"key": "h100"})


def test_in_memory_database_is_shared_across_threads():
    with ConfigStore("sqlite://") as store:
        worker = threading.Thread(target=store.save_best, args=(make_best(),))
        worker.start()
        worker.join()
        assert len(store.best_configs()) == 1


# -- location --------------------------------------------------------------------------------------


def test_default_url(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_url() == f"sqlite:///{tmp_path}/xdg/kernelhub/configs.sqlite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_url() == f"sqlite:///{tmp_path}/home/.cache/kernelhub/configs.sqlite"
    monkeypatch.setenv("KERNELHUB_DB", "postgresql://u:secret@db/kh")
    assert default_url() == "postgresql://u:secret@db/kh"
    monkeypatch.setenv("KERNELHUB_DB", str(tmp_path / "plain.sqlite"))  # a bare path means a SQLite file
    assert default_url() == f"sqlite:///{tmp_path}/plain.sqlite"
    with ConfigStore() as store:
        assert store.path == tmp_path / "plain.sqlite" and store.path.exists()


def test_sqlite_path():
    assert str(sqlite_path("sqlite:////abs/c.sqlite")) == "/abs/c.sqlite"
    assert str(sqlite_path("sqlite:///rel/c.sqlite")) == "rel/c.sqlite"
    assert sqlite_path("sqlite://") is None
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("postgresql://u@h/db") is None


def test_wal_mode_and_creates_parent_directory(tmp_path):
    path = tmp_path / "a" / "b" / "c.sqlite"
    ConfigStore(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT value FROM kernelhub_meta WHERE key='schema_version'").fetchone()[0] \
            == str(SCHEMA_VERSION)
    conn.close()


# -- refusing what is not ours, or not readable ----------------------------------------------------


def test_garbage_file_is_refused_and_untouched(tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"these are not the bytes of a database\n" * 100)
    before = file_state(path)
    with pytest.raises(ConfigDBError, match=r"c\.sqlite.*not a (SQLite )?database"):
        ConfigStore(path)
    assert file_state(path) == before


def test_foreign_sqlite_database_is_refused_and_untouched(tmp_path):
    path = tmp_path / "c.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO photos (name) VALUES ('cat.jpg')")
    conn.close()
    before = file_state(path)
    with pytest.raises(ConfigDBError, match=r"not a kernelhub config database.*photos"):
        ConfigStore(path)
    assert file_state(path) == before


def test_database_shared_with_optuna(tmp_path):
    optuna = pytest.importorskip("optuna")
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    optuna.storages.RDBStorage(url).remove_session()
    with ConfigStore(url) as store:
        store.save_best(make_best())
    optuna.create_study(storage=url, study_name="still-works").optimize(lambda t: t.suggest_float("x", 0, 1), 2)
    with ConfigStore(url) as store:
        assert len(store.best_configs()) == 1


def test_directory_and_unwritable_location(tmp_path):
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(ConfigDBError, match="is a directory"):
        ConfigStore(tmp_path / "dir.sqlite")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigDBError, match=r"afile.*KERNELHUB_DB"):
        ConfigStore(tmp_path / "afile" / "sub" / "c.sqlite")  # its "directory" is a file


def test_create_false_on_missing_file_creates_nothing(tmp_path):
    with pytest.raises(ConfigDBError, match=r"no kernelhub database at .*missing\.sqlite"):
        ConfigStore(tmp_path / "new" / "missing.sqlite", create=False)
    assert not (tmp_path / "new").exists()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "c.sqlite"
    ConfigStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE kernelhub_meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.close()
    with pytest.raises(ConfigDBError, match=r"newer kernelhub.*upgrade kernelhub"):
        ConfigStore(path)


def test_older_schema_is_migrated(tmp_path, monkeypatch):
    path = tmp_path / "c.sqlite"
    with ConfigStore(path) as store:
        store.save_best(make_best())

    def add_note_column(conn):
        conn.exec_driver_sql("ALTER TABLE kernelhub_best_configs ADD COLUMN note TEXT DEFAULT 'migrated'")

    def add_extra_table(conn):
        conn.exec_driver_sql("CREATE TABLE kernelhub_extra (id INTEGER PRIMARY KEY)")

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 2)
    monkeypatch.setattr(store_module, "MIGRATIONS", {SCHEMA_VERSION: add_note_column,
                                                     SCHEMA_VERSION + 1: add_extra_table})
    with ConfigStore(path) as store:
        assert len(store.best_configs()) == 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM kernelhub_meta").fetchone()[0] == str(SCHEMA_VERSION + 2)
        assert conn.execute("SELECT note FROM kernelhub_best_configs").fetchone()[0] == "migrated"
        assert conn.execute("SELECT count(*) FROM kernelhub_extra").fetchone()[0] == 0
    conn.close()


def test_failed_migration_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "c.sqlite"
    ConfigStore(path).close()

    def half_done(conn):
        conn.exec_driver_sql("CREATE TABLE kernelhub_extra (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("ALTER TABLE no_such_table ADD COLUMN x TEXT")

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(store_module, "MIGRATIONS", {SCHEMA_VERSION: half_done})
    with pytest.raises(ConfigDBError, match="no_such_table"):
        ConfigStore(path)
    monkeypatch.setattr(store_module, "MIGRATIONS", {})
    with pytest.raises(ConfigDBError, match="no migration from schema version"):
        ConfigStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM kernelhub_meta").fetchone()[0] == str(SCHEMA_VERSION)
        assert not conn.execute("SELECT 1 FROM sqlite_master WHERE name='kernelhub_extra'").fetchall()
    conn.close()


def test_errors_after_open_are_config_db_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "_BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "c.sqlite"
    with ConfigStore(path) as store:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock past our busy timeout
        with pytest.raises(ConfigDBError, match=r"c\.sqlite.*locked"):
            store.save_best(make_best())
        other.execute("DROP TABLE kernelhub_trials")
        other.execute("COMMIT")
        other.close()
        with pytest.raises(ConfigDBError, match=r"c\.sqlite.*kernelhub_trials"):
            store.trials()


# -- export / import -------------------------------------------------------------------------------


def test_export_import_round_trip(tmp_path, fake_family):
    entries = [make_best(), make_best(gpu_key="cpu", bucket="M=1,N=4096", dtype="float16", device=CPU_DEVICE),
               make_best(gpu_key="a100", device=None, kernel_version="v0")]
    with ConfigStore(tmp_path / "a.sqlite") as source:
        source.save_many(entries)
        doc = export_configs(source, get_family=get_family)
        a100 = export_configs(source, get_family=get_family, gpu_key="a100")
        assert [e["gpu_key"] for e in a100["entries"]] == ["a100"]
    assert doc["format"] == "kernelhub-configs" and doc["version"] == 1 and "kernelhub_version" in doc
    # What decides staleness travels with every entry: the kernel version and the device identity.
    assert [(e["gpu_key"], e["kernel_version"], e["device"]) for e in doc["entries"]] == \
        [("a100", "v0", None), ("cpu", "v1", CPU_DEVICE), ("h100", "v1", DEVICE)]
    (tmp_path / "export.json").write_text(json.dumps(doc))
    with ConfigStore(tmp_path / "b.sqlite") as target:
        assert import_configs(target, load_export_file(tmp_path / "export.json"), get_family=get_family) == 3
        assert without_ids(target.best_configs()) == sorted(entries, key=lambda e: (e.gpu_key, e.dtype))
        assert import_configs(target, doc, get_family=get_family) == 3  # importing again replaces, never duplicates
        assert len(target.best_configs()) == 3


def _entry(**overrides) -> dict:
    entry = dataclasses.asdict(make_best())
    for name in ("id", "invalid", "stamp"):  # what a row read back carries, not an export
        del entry[name]
    entry["created_at"] = entry["created_at"].isoformat()
    return entry | overrides


def _doc(*entries, **overrides) -> dict:
    return {"format": "kernelhub-configs", "version": 1, "kernelhub_version": "0.1.0",
            "exported_at": "2025-01-01T00:00:00+00:00", "entries": list(entries)} | overrides


@pytest.mark.parametrize("doc, message", [
    (_doc(_entry(family="nope")), r"entry 0: field 'family': unknown kernel family 'nope'"),
    (_doc(_entry(config={"BLOCK": 48, "num_warps": 4})), r"entry 0: field 'config': BLOCK=48"),
    (_doc(_entry(config={"BLOCK": 32})), r"entry 0: field 'config': missing keys \['num_warps'\]"),
    (_doc(_entry(bucket="M=128")), r"entry 0: field 'bucket'"),
    (_doc(_entry(bucket="M=100,N=4096")), r"entry 0: field 'bucket': .* is not a toy bucket"),
    (_doc(_entry(dtype="int8")), r"entry 0: field 'dtype'"),
    (_doc(_entry(trials=True)), r"entry 0: field 'trials'"),
    (_doc(_entry(median_ms=float("nan"))), r"entry 0: field 'median_ms'"),
    (_doc(_entry(device={"key": "h100"})), r"entry 0: field 'device'"),
    (_doc(_entry(device=CPU_DEVICE)), r"entry 0: field 'device': tuned on a 'cpu' device, but stored under "
                                      r"gpu_key 'h100'"),
    (_doc(_entry(), _entry(median_ms=0.2), _entry(kernel_version="v0"), _entry(median_ms=0.1)),
     r"entries 0 and 1 are both the config of h100, toy, M=128,N=4096, bfloat16 \(kernel version v1\)"),
    (_doc({k: v for k, v in _entry().items() if k != "p80_ms"}), r"entry 0: field 'p80_ms' is missing"),
    (_doc(_entry(colour="red")), r"entry 0: field 'colour' is unknown"),
    (_doc(_entry(bucket="M=1,N=8"), _entry(config={"BLOCK": 1024, "num_warps": 4})), r"entry 1: field 'config'"),
    (_doc(_entry(), format="something-else"), r"not a kernelhub-configs document"),
    (_doc(_entry(), version=2), r"export format version 2.*upgrade kernelhub"),
    (_doc(entries="all of them"), r"'entries'"),
    (["not", "a", "dict"], r"not a kernelhub-configs document"),
], ids=["unknown-family", "config-outside-space", "config-missing-key", "bucket-unparsable",
        "bucket-not-a-bucket", "dtype", "bool-as-int", "nan", "device-fields", "device-of-another-gpu",
        "duplicate-entries", "missing-field",
        "unknown-field", "second-entry-bad", "format", "newer-version", "entries-not-list", "not-a-dict"])
def test_import_rejects_and_writes_nothing(tmp_path, fake_family, doc, message):
    with ConfigStore(tmp_path / "c.sqlite") as store:
        store.save_best(make_best(gpu_key="existing"))
        before = store.best_configs()
        with pytest.raises(ConfigDBError, match=r"c\.sqlite.*nothing written: " + message):
            import_configs(store, doc, get_family=get_family)
        assert store.best_configs() == before


def test_load_export_file_errors(tmp_path):
    (tmp_path / "broken.json").write_text('{"format": "kernelhub-configs", "entries": [')
    with pytest.raises(ConfigDBError, match=r"broken\.json is not valid JSON"):
        load_export_file(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigDBError, match=r"list\.json is not a kernelhub-configs document"):
        load_export_file(tmp_path / "list.json")
    with pytest.raises(ConfigDBError, match=r"cannot read config export .*absent\.json"):
        load_export_file(tmp_path / "absent.json")


def _bulk_doc(count: int, **overrides) -> dict:
    """An export of `count` distinct toy configs (one bucket each)."""
    base = _entry(**overrides)
    return _doc(*(dict(base, bucket=f"M=128,N={n}") for n in range(1, count + 1)))


def test_bulk_import_is_all_or_nothing(tmp_path, fake_family, monkeypatch):
    """20,000 entries in one transaction: all written; then a failure on the last update writes none.
    Measure the write lock's hold with KERNELHUB_MEASURE_IMPORT=60000 and `-s`: 1.1 s for 60,000
    entries on the 2-core CPU VM (as one query per entry it was 42 s, past the 30 s busy timeout)."""
    import os
    import time

    count = int(os.environ.get("KERNELHUB_MEASURE_IMPORT", 20_000))
    held = []
    session = ConfigStore._session

    @contextlib.contextmanager
    def timed(self, action, *, write=False):
        start = time.perf_counter()
        with session(self, action, write=write) as opened:
            yield opened
        if write:
            held.append(time.perf_counter() - start)

    monkeypatch.setattr(ConfigStore, "_session", timed)
    with ConfigStore(tmp_path / "c.sqlite") as store:
        assert import_configs(store, _bulk_doc(count), get_family=get_family) == count
        print(f"\n{count} entries: the write lock was held for {held[-1]:.2f} s")
        rows = store.best_configs()
        assert len(rows) == count and {(r.median_ms, r.device["key"]) for r in rows} == {(0.125, "h100")}
        with sqlite3.connect(tmp_path / "c.sqlite") as raw:
            assert raw.execute("SELECT count(*) FROM kernelhub_devices").fetchone()[0] == 1  # resolved once
            raw.execute(f"CREATE TRIGGER refuse_last BEFORE UPDATE ON kernelhub_best_configs "
                        f"WHEN NEW.bucket = 'M=128,N={count}' BEGIN SELECT RAISE(ABORT, 'refused by a test'); END")
        raw.close()
        with pytest.raises(ConfigDBError, match="refused by a test"):
            # every entry an update; the last fails
            import_configs(store, _bulk_doc(count, median_ms=0.5), get_family=get_family)
        assert {r.median_ms for r in store.best_configs()} == {0.125}


def test_unless_outdated_keeps_a_fuller_result(tmp_path):
    with ConfigStore(tmp_path / "c.sqlite") as store:
        store.save_best(make_best(trials=40, median_ms=0.1))
        store.save_best(make_best(trials=10, median_ms=0.2), unless_outdated=True)  # fewer trials, slower: kept
        assert [(r.trials, r.median_ms) for r in store.best_configs()] == [(40, 0.1)]
        store.save_best(make_best(trials=10, median_ms=0.05), unless_outdated=True)  # faster: replaces
        store.save_best(make_best(trials=50, median_ms=0.3), unless_outdated=True)  # more trials: replaces
        assert [(r.trials, r.median_ms) for r in store.best_configs()] == [(50, 0.3)]
        store.save_many([make_best(bucket="M=1,N=8", trials=1), make_best(trials=1, median_ms=0.4)],
                        unless_outdated=True)
        assert [(r.bucket, r.trials) for r in store.best_configs()] == [("M=1,N=8", 1), ("M=128,N=4096", 50)]


def test_values_outside_their_columns_are_never_written(tmp_path):
    with ConfigStore(tmp_path / "c.sqlite") as store:
        with pytest.raises(ConfigDBError, match=r"best config 1 not saved, nothing written: median_ms is 0, expected"):
            store.save_many([make_best(bucket="M=1,N=8"), make_best(median_ms=0)])
        with pytest.raises(ConfigDBError, match=r"device name is .* expected at most 255 characters"):
            store.save_best(make_best(device=DEVICE | {"name": "x" * 300}))
        with pytest.raises(ConfigDBError, match=r"trial not recorded: number is -1"):
            store.add_trial(make_trial(number=-1))
        assert store.best_configs() == [] and store.trials() == []


def test_a_bad_row_is_read_back_invalid_and_never_breaks_the_others(tmp_path):
    with ConfigStore(tmp_path / "c.sqlite") as store:
        store.save_many([make_best(), make_best(bucket="M=1,N=8")])
        store.add_trial(make_trial())
        store.add_trial(make_trial(number=1))
    with sqlite3.connect(tmp_path / "c.sqlite") as raw:
        raw.execute("UPDATE kernelhub_best_configs SET created_at = 'soon', config = '[' WHERE bucket = 'M=1,N=8'")
        raw.execute("UPDATE kernelhub_trials SET median_ms = 'x' WHERE number = 1")
    raw.close()
    with ConfigStore(tmp_path / "c.sqlite", create=False) as store:
        assert [r.bucket for r in store.best_configs()] == ["M=128,N=4096"]
        bad = next(r for r in store.best_configs(include_invalid=True) if r.invalid)
        assert bad.invalid == ("config is '[', expected JSON text of an object of integers (and 1 more)")
        assert bad.config is None and bad.created_at is None and bad.median_ms == 0.125
        assert store.delete_best([bad]) == 1  # deleted by its stored created_at, whatever that holds
        assert [t.number for t in store.trials()] == [0]
        (trial,) = [t for t in store.trials(include_invalid=True) if t.invalid]
        assert trial.invalid == "median_ms is 'x', expected a finite number > 0"


# -- identity and URLs ------------------------------------------------------------------------------


def _meta(path) -> dict:
    with sqlite3.connect(path) as raw:
        rows = dict(raw.execute("SELECT key, value FROM kernelhub_meta"))
    raw.close()
    return rows


def test_each_database_has_its_own_id_and_a_read_never_writes_one(tmp_path):
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    ConfigStore(a).close()
    ConfigStore(b).close()
    assert re.fullmatch(r"[0-9a-f]{32}", _meta(a)["database_id"]) and _meta(a)["database_id"] != _meta(b)["database_id"]
    with sqlite3.connect(a) as raw:  # as a database made before kernelhub kept an id
        raw.execute("DELETE FROM kernelhub_meta WHERE key = 'database_id'")
    raw.close()
    before = file_state(a)
    with ConfigStore(a, create=False) as store:
        store.best_configs()
    assert file_state(a) == before and "database_id" not in _meta(a)
    with ConfigStore(a) as store:  # the tuner asks for it: made once, then kept
        made = store.database_id()
        assert store.database_id() == made == _meta(a)["database_id"]


@pytest.mark.parametrize("url, message", [
    ("://", r"'://' is not a database URL"),
    ("postgresql://u:secret@h:abc/db", r"'postgresql://u:\*\*\*@h:abc/db' is not a database URL"),
])
def test_a_url_that_is_not_one_is_one_clear_error(url, message):
    for attempt in (lambda: ConfigStore(url), lambda: sqlite_path(url)):
        with pytest.raises(ConfigDBError, match=message + r".*KERNELHUB_DB"):
            attempt()


def test_a_read_only_directory_is_named_as_the_cause(tmp_path):
    """A WAL database needs its -wal and -shm beside it even to be read: the directory is what to fix."""
    locked = tmp_path / "locked"
    path = locked / "c.sqlite"
    with ConfigStore(path) as store:
        store.save_best(make_best())
        # The message logic, with the driver error SQLite gives there (for root, whom modes do not stop).
        for reason in ("unable to open database file", "attempt to write a readonly database"):
            message = store._describe("read its schema", sqlite3.OperationalError(reason))
            if reason.startswith("unable") or os.geteuid() != 0:
                assert f"the directory {locked} is not writable" in message, message
    with unwritable_directory(locked):
        with pytest.raises(ConfigDBError, match=rf"c\.sqlite: cannot .*; the directory {locked} is not writable"):
            ConfigStore(path, create=False).best_configs()


# -- a disk that fills up ---------------------------------------------------------------------------

_WITH_FILE_SIZE_LIMIT = (  # run `kernelhub ARGS...` where no file may grow past LIMIT bytes
    "import resource, runpy, signal, sys; "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "  # a write past the limit then fails as on a full disk
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
    "sys.argv = ['kernelhub', *sys.argv[2:]]; "
    "runpy.run_module('kernelhub', run_name='__main__')"
)


def test_disk_full_during_import_is_one_clear_line_and_loses_nothing(tmp_path):
    from kernelhub.kernels.int8_gemm import space
    from kernelhub.kernels.int8_gemm.spec import SPEC

    config = dict(space.DEFAULT_LARGE_M)
    path = tmp_path / "c.sqlite"
    with ConfigStore(path) as store:
        store.save_best(make_best(family=SPEC.name, bucket="M=128,N=4096,K=4096", config=config))
        store.add_trial(make_trial(family=SPEC.name, bucket="M=128,N=4096,K=4096", config=config))
        before = (store.best_configs(), store.trials())
    limit = path.stat().st_size + 32 * 1024  # the import needs about 150 KB
    big_export = tmp_path / "big.json"
    big_export.write_text(json.dumps(_doc(*(
        _entry(family=SPEC.name, bucket=SPEC.format_shape(SPEC.bucket((128, 64 * n, 4096))), config=config)
        for n in range(1, 501)))))

    result = subprocess.run([sys.executable, "-c", _WITH_FILE_SIZE_LIMIT, str(limit), "import", str(big_export),
                             "--db", f"sqlite:///{path}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    error = result.stderr.strip()
    assert "\n" not in error and "Traceback" not in error
    # SQLite reports a write cut short by the limit as a full disk, one refused outright as an I/O error.
    assert re.match(r"kernelhub import: error: config database .*c\.sqlite: cannot save best configs: "
                    r"(database or disk is full; its disk .* is full|disk I/O error; the disk failed or filled up)",
                    error), error
    with ConfigStore(path) as store:
        assert (store.best_configs(), store.trials()) == before
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


# -- concurrency -----------------------------------------------------------------------------------


def _errors_of_concurrent(writer, workers: int) -> list[Exception]:
    """Run `writer(0)` ... `writer(workers - 1)` in threads at once; what they raised."""
    errors = []

    def run(worker: int) -> None:
        try:
            writer(worker)
        except Exception as exc:  # noqa: BLE001  (returned, and asserted on by the caller)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_two_stores_writing_concurrently_lose_nothing(tmp_path):
    path = tmp_path / "c.sqlite"
    stores = [ConfigStore(path), ConfigStore(path)]

    def writer(worker: int) -> None:
        for i in range(50):
            # Reads between the writes, so a deferred transaction would hit "database is locked".
            stores[worker].best_configs(gpu_key="h100")
            stores[worker].save_best(make_best(bucket=f"M={worker},N={i}", device=DEVICE))
            stores[worker].add_trial(make_trial(study=f"w{worker}", number=i))

    assert _errors_of_concurrent(writer, 2) == []
    assert len(stores[0].best_configs()) == 100 and len(stores[1].trials()) == 100
    with sqlite3.connect(path) as conn:  # concurrent get-or-create made one device row, not two
        assert conn.execute("SELECT count(*) FROM kernelhub_devices").fetchone()[0] == 1
    conn.close()
    for store in stores:
        store.close()


# -- PostgreSQL (a throwaway server: tests/postgres.py) ----------------------------------------------


def test_postgres_round_trip(postgres_url):
    with ConfigStore(postgres_url) as store:
        assert store.where == postgres_url  # no password in the URL to hide
        store.save_many([make_best(), make_best(gpu_key="cpu", device=CPU_DEVICE)])
        store.save_best(make_best(median_ms=0.1))  # replaces, never duplicates
        store.add_trial(make_trial())
        store.add_trial(make_trial(state="failed", reason="wrong result", median_ms=None))
        assert store.record_device(CPU_DEVICE) == store.record_device(dict(CPU_DEVICE))  # NULLs match too
    with ConfigStore(postgres_url, create=False) as store:
        assert [(r.gpu_key, r.median_ms, r.device) for r in store.best_configs()] == \
            [("cpu", 0.125, CPU_DEVICE), ("h100", 0.1, DEVICE)]
        (trial,) = store.trials()
        assert (trial.state, trial.reason) == ("failed", "wrong result")
        cpu, h100 = store.best_configs()
        store.save_best(make_best(median_ms=0.09))  # tuned again since read: the read row is no longer there
        assert store.delete_best([cpu, h100]) == 1  # deleted by its stored created_at, as read
        assert [r.gpu_key for r in store.best_configs()] == ["h100"]


def test_postgres_concurrent_writers_make_no_duplicates(postgres_url):
    stores = [ConfigStore(postgres_url) for _ in range(4)]

    def writer(worker: int) -> None:
        for i in range(25):
            # The same best-config row and the same device (NULL columns) from every writer: a
            # read-then-insert that is not serialised inserts twice, or fails on the unique key.
            stores[worker].save_best(make_best(gpu_key="cpu", device=CPU_DEVICE, median_ms=1.0 + i))
            stores[worker].add_trial(make_trial(study=f"w{worker}", number=i))

    assert _errors_of_concurrent(writer, 4) == []
    assert len(stores[0].best_configs()) == 1 and len(stores[0].trials()) == 100
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM kernelhub_devices")).scalar() == 1
    engine.dispose()
    for store in stores:
        store.close()


def test_postgres_writer_waits_then_fails_clearly(postgres_url, monkeypatch):
    psycopg = pytest.importorskip("psycopg")
    monkeypatch.setattr(store_module, "_BUSY_TIMEOUT_S", 0.2)
    with ConfigStore(postgres_url) as store:
        with psycopg.connect(postgres_url) as other:  # another writer holds the write lock past our timeout
            other.execute(f"SELECT pg_advisory_xact_lock({store_module._POSTGRES_WRITE_LOCK})")
            with pytest.raises(ConfigDBError, match=r"cannot save best configs: .*lock timeout; another process"):
                store.save_best(make_best())
        store.save_best(make_best())  # the lock went with the other transaction
        assert len(store.best_configs()) == 1


def test_postgres_server_not_reachable_is_one_clear_error(postgres_url):
    from sqlalchemy.engine import make_url

    missing = make_url(postgres_url).set(database="kernelhub_no_such_database").render_as_string(False)
    with pytest.raises(ConfigDBError, match=r'database "kernelhub_no_such_database" does not exist; create that '
                                            r"database on the server first"):
        ConfigStore(missing)
