"""Bad arguments and environments for every command: argparse's one-line usage error (exit 2) naming
the argument, or kernelhub's one-line error (exit 1); never a traceback. A closed stdout pipe ends a
command quietly. Run in process (fast), and as real processes where stdout and stderr are the point."""

from __future__ import annotations

import subprocess
import sys

import pytest

from config_rows import best
from kernelhub import cli
from kernelhub.db import ConfigStore

# (command line, the argument its usage error names)
BAD_ARGUMENTS = [
    *[(["tune", "--trials", value], "--trials") for value in ("0", "-1", "many", "1.5")],
    *[(["tune", option, value], option) for option in ("--timeout", "--trial-timeout")
      for value in ("0", "-1", "nan", "inf", "soon")],
    (["tune", "--seed", "-1"], "--seed"),
    (["tune", "--seed", str(2**32)], "--seed"),
    (["tune", "--world-size", "0"], "--world-size"),
    *[(["tune", option, ""], option) for option in ("--gpu", "--kernel", "--shapes", "--dtype")],
    (["check", "--configs", "-1"], "--configs"),
    (["check", "--seed", "-1"], "--seed"),
    (["check", "--kernel", " "], "--kernel"),
    *[([command, option, ""], option) for command in ("show", "prune", "export", "report")
      for option in ("--gpu", "--kernel") if (command, option) != ("export", "--kernel")],
    (["sweep", "--gpu", "", "--kernel", "int8_gemm", "--shapes", "smoke"], "--gpu"),
    (["sweep", "--gpu", "cpu", "--kernel", "int8_gemm", "--shapes", "smoke", "--trial-timeout", "0"],
     "--trial-timeout"),
    (["sweep", "--gpu", "cpu", "--kernel", "int8_gemm", "--shapes", "smoke", "--seed", "-1"], "--seed"),
    (["replay", "sweep.json", "--seeds", "0"], "--seeds"),
    (["replay", "sweep.json", "--budget", "0"], "--budget"),
    (["replay", "sweep.json", "--budget", "9" * 5000], "--budget"),
]


@pytest.mark.parametrize("argv, option", BAD_ARGUMENTS, ids=[" ".join(a)[:60] for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_a_usage_error_naming_it(capsys, argv, option):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # argparse prints the usage, then its one-line error
    assert last.startswith(f"kernelhub {argv[0]}: error: argument {option}") and "Traceback" not in err
    assert len(last) < 300


DB_COMMANDS = [["show"], ["prune", "--yes"], ["export"], ["report"], ["import", "in.json"],
               ["tune", "--kernel", "all_gather_gemm", "--shapes", "smoke"]]
BAD_URLS = {"no scheme": "://", "port not a number": "postgresql://u:secret@h:abc/db"}


@pytest.mark.parametrize("url", BAD_URLS.values(), ids=BAD_URLS.keys())
@pytest.mark.parametrize("argv", DB_COMMANDS, ids=[a[0] for a in DB_COMMANDS])
def test_a_bad_database_url_is_one_line(capsys, monkeypatch, tmp_path, argv, url):
    (tmp_path / "in.json").write_text('{"format": "kernelhub-configs", "version": 1, "entries": []}')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERNELHUB_DB", url)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kernelhub {argv[0]}: error: ") and "\n" not in err
    assert "is not a database URL" in err and "KERNELHUB_DB" in err and "secret" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json"]  # nothing created


def test_a_typo_in_kernelhub_families_is_one_error_not_every_row_stale(capsys, monkeypatch, private_config_db):
    with ConfigStore(private_config_db) as store:
        store.save_best(best())
    monkeypatch.setenv("KERNELHUB_FAMILIES", "fault_familes")  # sic
    for argv in (["show"], ["prune", "--yes"], ["export"], ["report"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err == (f"kernelhub {argv[0]}: error: KERNELHUB_FAMILIES: cannot import 'fault_familes': "
                       "ModuleNotFoundError: No module named 'fault_familes'; fix or remove it from KERNELHUB_FAMILIES")
    with ConfigStore(private_config_db) as store:
        assert len(store.best_configs()) == 1  # prune deleted nothing


def test_an_unexpected_exception_is_one_line_asking_for_a_report(capsys, monkeypatch):
    def broken(args):
        raise ValueError("something inside\nbroke")

    monkeypatch.setattr(cli, "cmd_show", broken)
    assert cli.main(["show"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kernelhub show: error: ValueError: something inside broke (unexpected: this is a "
                          "kernelhub bug, please report it")
    assert err.count("\n") == 1


def test_a_broken_pipe_that_is_not_stdout_is_not_silenced(capsys, monkeypatch):
    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")  # e.g. a worker process gone: a real error

    monkeypatch.setattr(cli, "cmd_show", broken)
    assert cli.main(["show"]) == 1
    assert "error: BrokenPipeError" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["show"], ["export"], ["gpus"]])
def test_output_into_a_closed_pipe_ends_quietly(private_config_db, argv):
    with ConfigStore(private_config_db) as store:
        store.save_many([best(bucket=f"M=128,N={16 * n},K=4096") for n in range(1, 400)])
    process = subprocess.Popen([sys.executable, "-m", "kernelhub", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader is gone before the command writes (as `| head -1` is, soon)
    _, stderr = process.communicate(timeout=120)
    assert stderr == "" and process.returncode == 1  # no traceback, no "Exception ignored ... BrokenPipeError"


def test_show_piped_into_head(private_config_db):
    with ConfigStore(private_config_db) as store:
        store.save_many([best(bucket=f"M=128,N={16 * n},K=4096") for n in range(1, 1000)])  # > a pipe's 64 KiB
    result = subprocess.run(f"{sys.executable} -m kernelhub show | head -1", shell=True, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.split() == ["gpu", "kernel", "shape", "bucket", "dtype", "config", "ms", "throughput",
                                     "vs", "default", "trials", "source", "status"]
    assert result.stderr == ""


def test_db_takes_a_plain_path_in_every_command(capsys, tmp_path):
    path = tmp_path / "plain.sqlite"
    for argv in (["show"], ["prune", "--yes"], ["export"]):  # a missing database: told so, nothing created
        assert cli.main([*argv, "--db", str(path)]) in (0, 1)
        assert "Traceback" not in capsys.readouterr().err and not path.exists()
    with ConfigStore(path) as store:
        store.save_best(best())
    assert cli.main(["show", "--db", str(path)]) == 0
    assert "M=128,N=4096,K=4096" in capsys.readouterr().out
