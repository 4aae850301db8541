"""`kernelhub export -o FILE`: never overwrites a file unless told (--force), never one of the
database's own files (not even with --force, not through a link), and writes the file whole or not
at all. A target it cannot write is one clear line."""

from __future__ import annotations

import json
import os

import pytest

from config_rows import best
from filesystem import unwritable_directory
from kernelhub import cli
from kernelhub.db import ConfigStore, exchange
from kernelhub.db.store import study_journal_path


@pytest.fixture
def db(private_config_db, tmp_path):
    """The test's config database (KERNELHUB_DB), holding one row; its path."""
    with ConfigStore(private_config_db) as store:
        store.save_best(best())
    return tmp_path / "configs.sqlite"


def _refused(capsys, *argv) -> str:
    assert cli.main(["export", *argv]) == 1
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert error.startswith("kernelhub export: error: ") and "\n" not in error and "Traceback" not in error
    return error


def _exported(path) -> list:
    return json.loads(path.read_text())["entries"]


def test_an_existing_file_is_kept_unless_forced(db, tmp_path, capsys):
    target = tmp_path / "out.json"
    target.write_text("precious")
    assert "out.json exists; pass --force to replace it" in _refused(capsys, "-o", str(target))
    assert target.read_text() == "precious"
    assert cli.main(["export", "-o", str(target), "--force"]) == 0
    assert len(_exported(target)) == 1


@pytest.mark.parametrize("own", ["", "-wal", "-shm", "-journal", ".optuna-journal"])
@pytest.mark.parametrize("how", ["by name", "through a symlink", "by a relative path"])
def test_the_database_own_files_are_refused_even_with_force(db, tmp_path, capsys, monkeypatch, own, how):
    own_file = db.with_name(db.name + own)
    if not own_file.exists():
        own_file.write_bytes(b"")  # a WAL or journal file SQLite may be keeping at that moment
    target = str(own_file)
    if how == "through a symlink":
        (tmp_path / "innocent.json").symlink_to(own_file)
        target = str(tmp_path / "innocent.json")
    elif how == "by a relative path":
        monkeypatch.chdir(tmp_path)
        target = os.path.join(".", "sub", "..", own_file.name)
        (tmp_path / "sub").mkdir()
    assert "is a file of the config database itself" in _refused(capsys, "-o", target, "--force")
    # Untouched (SQLite itself may have removed an empty -wal or -shm when the export closed the database).
    assert not own_file.exists() or not own_file.read_bytes().startswith(b"{")
    with ConfigStore(db, create=False) as store:
        assert len(store.best_configs()) == 1


def test_a_symlinked_database_is_protected_under_both_names(tmp_path, capsys, monkeypatch):
    real = tmp_path / "real" / "configs.sqlite"
    ConfigStore(real).close()
    (tmp_path / "link.sqlite").symlink_to(real)
    monkeypatch.setenv("KERNELHUB_DB", str(tmp_path / "link.sqlite"))
    assert "config database itself" in _refused(capsys, "-o", str(real), "--force")
    assert "config database itself" in _refused(capsys, "-o", str(study_journal_path(real)), "--force")


def test_a_hard_link_to_the_database_is_refused(db, tmp_path, capsys):
    os.link(db, tmp_path / "copy.json")
    assert "config database itself" in _refused(capsys, "-o", str(tmp_path / "copy.json"), "--force")


def test_a_failed_write_leaves_no_file_and_the_old_one_intact(db, tmp_path, capsys, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exchange.os, "replace", fail)
    assert "No space left on device; nothing was written" in _refused(capsys, "-o", str(target), "--force")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name) == ["out.json"]  # no temporary left


def test_the_new_file_has_the_usual_permissions(db, tmp_path):
    assert cli.main(["export", "-o", str(tmp_path / "out.json")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("target, message", [
    ("missing/out.json", "does not exist"),
    (".", "is a directory"),
])
def test_a_target_that_cannot_be_a_file(db, tmp_path, capsys, target, message):
    assert message in _refused(capsys, "-o", str(tmp_path / target))
    assert not (tmp_path / "missing").exists()


def test_an_unwritable_directory(db, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    with unwritable_directory(locked):
        assert "cannot write" in _refused(capsys, "-o", str(locked / "out.json"))
        assert list(locked.iterdir()) == []
