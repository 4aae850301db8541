"""`kernelhub import` of hostile files: each is refused with one line on stderr (naming what is wrong),
no traceback, exit 1, and the database is as it was, or, when it did not exist, still does not exist.
"""

from __future__ import annotations

import json
import os

import pytest

from config_rows import DEVICE, best
from config_rows import document as _doc
from config_rows import entry as _entry
from kernelhub import cli
from kernelhub.db import ConfigStore, exchange
from kernelhub.kernels.int8_gemm import space


def _json(doc) -> str:
    return json.dumps(doc)


def _with_raw(field: str, raw: str) -> str:
    """A one-entry document whose `field` holds `raw` JSON text verbatim (numbers json.dumps cannot write)."""
    return _json(_doc(_entry(**{field: "@RAW@"}))).replace('"@RAW@"', raw)


# (id, file text, what the one-line error must say)
HOSTILE = [
    ("deep-nesting", "[" * 200_000 + "]" * 200_000, "nests JSON too deeply"),
    ("int-of-5000-digits", _with_raw("median_ms", "9" * 5000), "integer of thousands of digits"),
    ("int-of-400-digits-as-time", _with_raw("median_ms", "1" + "0" * 400), "field 'median_ms'"),
    ("float-of-400-digits", _with_raw("p20_ms", "1" * 400 + ".5"), "field 'p20_ms'"),
    ("nan-literal", _with_raw("p80_ms", "NaN"), "field 'p80_ms' is nan, expected a finite number > 0"),
    ("infinity-literal", _with_raw("throughput", "Infinity"), "field 'throughput'"),
    ("time-zero", _json(_doc(_entry(median_ms=0))), "field 'median_ms' is 0, expected a finite number > 0"),
    ("time-negative", _json(_doc(_entry(default_median_ms=-1.0))), "field 'default_median_ms'"),
    ("trials-2**63", _json(_doc(_entry(trials=2**63))), "field 'trials'"),
    ("trials-2**31", _json(_doc(_entry(trials=2**31))), "expected an integer from 0 to 2147483647"),
    ("trials-negative", _json(_doc(_entry(trials=-1))), "field 'trials'"),
    ("memory-2**63", _json(_doc(_entry(device=DEVICE | {"memory_bytes": 2**63}))), "field 'device': 'memory_bytes'"),
    ("sm-count-text", _json(_doc(_entry(device=DEVICE | {"sm_count": "132"}))), "field 'device': 'sm_count'"),
    ("device-name-control", _json(_doc(_entry(device=DEVICE | {"name": "H100\x1b[2J"}))), "printable text"),
    ("gpu-key-nul", _json(_doc(_entry(gpu_key="h1\x0000", device=None))), "field 'gpu_key'"),
    ("gpu-key-100k", _json(_doc(_entry(gpu_key="h" * 100_000, device=None))), "at most 64 characters"),
    ("kernel-version-1mb", _json(_doc(_entry(kernel_version="v" * 2**20))), "field 'kernel_version'"),
    ("lone-surrogate", _json(_doc(_entry(dtype="\ud800"))), "field 'dtype'"),
    ("version-true", _json(_doc(version=True)), "export format version True"),
    ("version-text", _json(_doc(version="1")), "export format version '1'"),
    ("version-float", _json(_doc(version=1.0)), "export format version 1.0"),
    ("bucket-zero", _json(_doc(_entry(bucket="M=0,N=4096,K=4096"))), "field 'bucket'"),
    ("bucket-huge", _json(_doc(_entry(bucket="M=128,N=4096,K=" + "9" * 30))), "field 'bucket'"),
    ("created-at-text", _json(_doc(_entry(created_at="yesterday"))), "field 'created_at'"),
    ("created-at-overflow", _json(_doc(_entry(created_at="0001-01-01T00:00:00+05:00"))), "field 'created_at'"),
    ("config-huge-int", _json(_doc(_entry(config=dict(space.DEFAULT_LARGE_M, BLOCK_M=2**70)))), "field 'config'"),
    ("config-bool", _json(_doc(_entry(config=dict(space.DEFAULT_LARGE_M, BLOCK_M=True)))), "field 'config'"),
    ("config-not-object", _json(_doc(_entry(config=[1, 2]))), "field 'config'"),
    ("entry-not-object", _json(_doc("entry")), "entry 0: expected an object"),
    ("second-entry-bad", _json(_doc(_entry(), _entry(bucket="M=1,N=4096,K=4096", median_ms=0))), "entry 1"),
    ("not-utf8", "\udcff", "not UTF-8"),
    ("empty", "", "is not valid JSON"),
    ("top-level-list", "[]", "not a kernelhub-configs document"),
]


@pytest.fixture(params=["existing", "missing"])
def target(request, tmp_path):
    """A database with one row (its rows must stay as they are), or a path where none exists (must stay so)."""
    path = tmp_path / "db" / "configs.sqlite"
    if request.param == "missing":
        yield path
        assert not path.parent.exists(), "a refused import created the database"
        return
    with ConfigStore(path) as store:
        store.save_best(best(bucket="M=1,N=4096,K=4096", config=dict(space.DEFAULT_SMALL_M)))
        before = store.best_configs()
    names = sorted(os.listdir(path.parent))
    yield path
    with ConfigStore(path, create=False) as store:
        assert store.best_configs() == before
    assert sorted(os.listdir(path.parent)) == names


def _import_refused(capsys, path, db) -> str:
    assert cli.main(["import", str(path), "--db", str(db)]) == 1
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert error.startswith("kernelhub import: error: ") and "\n" not in error, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return error


@pytest.mark.parametrize("text, message", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_document_is_refused_in_one_line(capsys, tmp_path, target, text, message):
    path = tmp_path / "hostile.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    error = _import_refused(capsys, path, target)
    assert message in error
    assert len(error) < 600  # a huge value is quoted briefly, never whole


def test_an_endless_file_is_read_only_up_to_the_limit(capsys, target, monkeypatch):
    monkeypatch.setattr(exchange, "MAX_EXPORT_BYTES", 2**20)  # the real limit works the same, only slower
    assert "larger than 1 MiB" in _import_refused(capsys, "/dev/zero", target)


def test_a_file_over_the_limit_is_refused_unread(capsys, tmp_path, target, monkeypatch):
    monkeypatch.setattr(exchange, "MAX_EXPORT_BYTES", 2**20)
    path = tmp_path / "huge.json"
    with open(path, "wb") as file:
        file.truncate(2**40)  # sparse: a terabyte that takes no disk, and would take hours to read
    assert "larger than 1 MiB" in _import_refused(capsys, path, target)


@pytest.mark.parametrize("name, message", [("absent.json", "No such file"), (".", "Is a directory")])
def test_a_file_that_cannot_be_read(capsys, tmp_path, target, name, message):
    assert message in _import_refused(capsys, tmp_path / name, target)


def test_the_limit_holds_a_100k_entry_export():
    one_entry = len(exchange.format_export(_doc(_entry()))) - len(exchange.format_export(_doc(entries=[])))
    assert 100_000 * one_entry * 1.2 < exchange.MAX_EXPORT_BYTES
