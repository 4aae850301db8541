"""The `kernelhub` command line, in process (fast) and once as a real subprocess."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from kernelhub import cli
from kernelhub.db import BestConfig, ConfigStore
from kernelhub.device import current_device
from kernelhub.kernels.int8_gemm import space
from kernelhub.kernels.int8_gemm.spec import SPEC

TUNED = dict(space.DEFAULT_LARGE_M, BLOCK_M=64)


def _seed_db(url, *, kernel_version=None, gpu_key="h100", triton_version="3.9.0"):
    with ConfigStore(url) as store:
        store.save_best(BestConfig(
            gpu_key=gpu_key, family=SPEC.name, bucket="M=128,N=4096,K=4096", dtype="bfloat16", config=TUNED,
            median_ms=0.05, p20_ms=0.049, p80_ms=0.052, throughput=85.9, throughput_unit="TFLOP/s",
            default_median_ms=0.08, trials=40, kernel_version=kernel_version or SPEC.kernel_version,
            triton_version=triton_version, torch_version=torch.__version__, cuda_version="12.8",
            device=dataclasses.replace(current_device(), key=gpu_key, name="NVIDIA H100 80GB HBM3",
                                       vendor="nvidia", compute_capability="9.0", sm_count=132).to_dict()))


def test_gpus_prints_identity_and_key(capsys):
    assert cli.main(["gpus"]) == 0
    out = capsys.readouterr().out
    assert "key cpu" in out and "torch_version" in out and torch.__version__ in out


def test_check_passes_in_the_interpreter(capsys):
    assert cli.main(["check", "--kernel", "int8_gemm", "--configs", "1"]) == 0
    out = capsys.readouterr().out
    assert "in the Triton interpreter" in out and "all match" in out


def test_check_fails_on_a_broken_kernel(capsys, monkeypatch):
    from kernelhub import registry

    def off_by_one(inputs, config, out):
        SPEC.launch(inputs, config, out)[-1, -1] += 1
        return out

    monkeypatch.setitem(registry._FAMILIES, "int8_gemm", dataclasses.replace(SPEC, launch=off_by_one))
    assert cli.main(["check", "--kernel", "int8_gemm", "--configs", "0"]) == 1
    out = capsys.readouterr().out
    assert "FAIL int8_gemm" in out and "1 of" in out and "elements differ" in out


def test_tune_refuses_another_gpu_and_writes_nothing(capsys, tmp_path):
    url = f"sqlite:///{tmp_path / 'tune.sqlite'}"
    assert cli.main(["tune", "--gpu", "a100", "--db", url]) == 1
    err = capsys.readouterr().err
    assert "--gpu a100" in err and "cpu (no GPU)" in err and "Traceback" not in err
    assert not (tmp_path / "tune.sqlite").exists()


def test_tune_without_gpu_refuses_interpreted_families(capsys, tmp_path):
    url = f"sqlite:///{tmp_path / 'tune.sqlite'}"
    assert cli.main(["tune", "--db", url, "--kernel", "int8_gemm", "--kernel", "all_gather_gemm"]) == 1
    err = capsys.readouterr().err
    assert "no GPU" in err and "int8_gemm run in the Triton interpreter" in err
    assert "only all_gather_gemm, gemm_reduce_scatter can be tuned" in err
    assert not (tmp_path / "tune.sqlite").exists()


def test_show_on_a_missing_database(capsys, tmp_path):
    assert cli.main(["show", "--db", f"sqlite:///{tmp_path / 'none.sqlite'}"]) == 0
    assert "no config database yet" in capsys.readouterr().out
    assert not (tmp_path / "none.sqlite").exists()


def test_show_marks_stale_rows(capsys, private_config_db):
    _seed_db(private_config_db)
    _seed_db(private_config_db, kernel_version="0123456789abcdef")
    assert cli.main(["show"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "M=128,N=4096,K=4096" in line]
    assert len(lines) == 2
    assert sum("stale: kernel changed" in line for line in lines) == 1
    assert any(line.rstrip().endswith("ok") for line in lines)
    assert "1.60x" in out and "85.9 TFLOP/s" in out and "BLOCK_M=64" in out


def test_show_marks_rows_this_device_would_not_use(capsys, private_config_db):
    _seed_db(private_config_db, gpu_key="cpu", triton_version="2.3.1")
    assert cli.main(["show", "--gpu", "cpu", "--kernel", "int8_gemm"]) == 0
    assert "stale: tuned with triton 2.3.1" in capsys.readouterr().out


def test_export_import_round_trip(capsys, private_config_db, tmp_path):
    _seed_db(private_config_db)
    path = tmp_path / "h100.json"
    assert cli.main(["export", "--gpu", "h100", "-o", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["format"] == "kernelhub-configs" and len(doc["entries"]) == 1
    target = f"sqlite:///{tmp_path / 'other.sqlite'}"
    assert cli.main(["import", str(path), "--db", target]) == 0
    with ConfigStore(target) as store:
        (row,) = store.best_configs()
    assert row.config == TUNED and row.gpu_key == "h100"


def test_import_rejects_bad_file_in_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["import", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kernelhub import: error:") and "\n" not in err


def test_console_entry_point_runs():
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-m", "kernelhub", "tune", "--gpu", "a100"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("kernelhub tune: error: --gpu a100 does not match")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [["tune", "--trials", "many"], ["frobnicate"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def test_tune_rejects_a_dtype_no_selected_family_has(capsys):
    assert cli.main(["tune", "--kernel", "sparse_gather", "--dtype", "int32"]) == 1
    err = capsys.readouterr().err
    assert "--dtype int32: none of sparse_gather has it" in err and "bfloat16" in err


def test_tune_rejects_an_unknown_shape_set(capsys):
    assert cli.main(["tune", "--shapes", "huge"]) == 1
    assert "unknown shape set 'huge'" in capsys.readouterr().err
