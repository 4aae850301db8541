"""`kill -9` of `kernelhub tune` in the middle of a study, then a rerun: the study goes on where it
stopped. Finished trials are kept, not measured again and counted against --trials; the stored
best is the best of both runs. The study is enumerated (test_naps has 5 configs, fewer than
--trials), so the rerun also shows that a config whose trial the kill cut off is queued again. And a database from before trial states said how a trial failed
(schema version 1) is migrated on open with its rows kept.
"""

import dataclasses
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from kernelhub.db import SCHEMA_VERSION, ConfigStore
from kernelhub.errors import ConfigDBError
from kernelhub.tuning.tuner import study_storage

N_TRIALS = 8
CONFIGS = 5  # test_naps's space: the study tries each once and ends there
KILL_AFTER = 3  # finished trials when the first run is killed


def _tune_command(url: str) -> list[str]:
    return [sys.executable, "-m", "kernelhub", "tune", "--kernel", "test_naps", "--gpu", "cpu",
            "--trials", str(N_TRIALS), "--trial-timeout", "60", "--db", url]


def _env() -> dict[str, str]:
    """The test families (tests/fault_families.py) registered in the subprocess; its lines unbuffered."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, KERNELHUB_FAMILIES="fault_families", PYTHONPATH=path, PYTHONUNBUFFERED="1")


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first, then the parent pid); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and (_proc_stat(int(p)) or [None, None])[1] == str(pid)]


def _running(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has exited, it only waits to be reaped


def _run_until_trials_then_kill(url: str) -> list[int]:
    """Start `kernelhub tune`, SIGKILL it once it reports KILL_AFTER finished trials; returns its children then."""
    first = subprocess.Popen(_tune_command(url), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    watchdog = threading.Timer(120, first.kill)  # a stuck run must not hang the suite
    watchdog.start()
    output = []
    try:
        for line in first.stdout:
            output.append(line)
            if f"trial {KILL_AFTER}/{CONFIGS}" in line:
                break
        children = _children(first.pid)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        watchdog.cancel()
        first.stdout.close()
    assert f"trial {KILL_AFTER}/{CONFIGS}" in output[-1], "".join(output)
    return children


def test_kill_9_mid_study_loses_only_the_trial_in_flight(tmp_path):
    url = f"sqlite:///{tmp_path / 'configs.sqlite'}"
    workers = _run_until_trials_then_kill(url)

    # The trial worker died with the tuner: nothing is left running a trial for nobody.
    assert workers
    deadline = time.monotonic() + 30
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_running, workers))

    with ConfigStore(url, create=False) as store:
        before = {t.number: t for t in store.trials()}
    assert len(before) >= KILL_AFTER

    rerun = subprocess.run(_tune_command(url), env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert re.search(rf"test_naps\s+N=7\s+int32\s+{CONFIGS}\s", rerun.stdout), rerun.stdout

    storage = study_storage(url)
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    finished = {t.number for t in trials if t.state.is_finished()}
    assert len(finished) == CONFIGS  # the budget counts the first run's trials
    assert len(trials) - len(finished) <= 1  # the one in flight at the kill, left unfinished
    for cut_off in (t for t in trials if not t.state.is_finished()):  # its config was queued again, and measured
        config = cut_off.system_attrs.get("fixed_params", cut_off.params)
        assert any(t.params == config for t in trials if t.state.is_finished())

    with ConfigStore(url, create=False) as store:
        after = {t.number: t for t in store.trials()}
        (best,) = store.best_configs(family="test_naps")
    assert set(after) == finished
    for number, trial in before.items():  # kept as measured: same row, same time, same created_at
        assert after[number] == trial
    assert set(after) - set(before)  # the rerun measured the rest
    assert sorted(t.config["NAP_MS"] for t in after.values()) == [0, 2, 5, 10, 20]  # each config once
    timed = [t for t in after.values() if t.state == "complete"]
    fastest = min(timed, key=lambda t: t.median_ms)
    assert (best.config, best.median_ms, best.trials) == (fastest.config, fastest.median_ms, CONFIGS)


def test_a_schema_1_database_is_migrated_and_keeps_its_trials(tmp_path):
    path = tmp_path / "old.sqlite"
    ConfigStore(path).close()
    insert = ("INSERT INTO kernelhub_trials (gpu_key, family, bucket, dtype, kernel_version, study, number, config, "
              "state, reason, median_ms, created_at) VALUES ('h100', 'int8_gemm', 'M=1,N=64,K=64', 'int32', 'v1', "
              "'s', ?, '{\"BLOCK_M\": 16}', ?, ?, ?, '2025-01-02 03:04:05')")
    old_rows = [(0, "complete", None, 0.5), (1, "failed", "3 of 9 elements differ", None),
                (2, "pruned", "too much shared memory", None)]
    db = sqlite3.connect(path)
    with db:  # back to schema 1: the trials table's constraint as version 1 wrote it, and its rows
        (table_sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'kernelhub_trials'").fetchone()
        db.execute("DROP TABLE kernelhub_trials")
        db.execute(re.sub(r"state IN \([^)]*\)", "state IN ('complete', 'failed', 'pruned')", table_sql))
        db.execute("UPDATE kernelhub_meta SET value = '1' WHERE key = 'schema_version'")
        db.executemany(insert, old_rows)
        with pytest.raises(sqlite3.IntegrityError, match="trial_state"):
            db.execute(insert, (3, "crash", "killed by SIGSEGV", None))
    db.close()

    with ConfigStore(path) as store:
        rows = store.trials()
        assert [(t.number, t.state, t.reason, t.median_ms) for t in rows] == old_rows
        assert all(t.config == {"BLOCK_M": 16} and t.created_at.year == 2025 for t in rows)
        store.add_trial(dataclasses.replace(rows[1], number=3, state="crash", reason="killed by SIGSEGV"))
        assert store.trials()[-1].state == "crash"
        with pytest.raises(ConfigDBError, match="trial_state"):
            store.add_trial(dataclasses.replace(rows[1], number=4, state="running"))
    db = sqlite3.connect(path)
    (version,) = db.execute("SELECT value FROM kernelhub_meta WHERE key = 'schema_version'").fetchone()
    db.close()
    assert version == str(SCHEMA_VERSION)
