"""The benchmark scripts run end to end on a tiny shape (on CPU: the numbers mean nothing here)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    if str(BENCHMARKS) not in sys.path:  # the scripts import their sibling `report`, as when run directly
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_int8_rows_and_table_on_cpu():
    gpu_int8 = _load("gpu_int8")
    calls = []

    def fake_timer(fn):
        fn()
        calls.append(fn)
        return 1.0 + len(calls)

    row = gpu_int8.measure_row((33, 24, 40), "cpu", fake_timer)
    assert len(calls) == 4 and row["tuned_is_default"]
    assert row["tuned TOPS"] == pytest.approx(2 * 33 * 24 * 40 / 2e-3 / 1e12)
    table = gpu_int8.format_table([row])
    assert table.splitlines()[2].startswith("| 33 | 24 | 40 |") and "| 1.50x | 2.00x |" in table


def test_gpu_int8_refuses_without_gpu(capsys):
    assert _load("gpu_int8").main(["--skip-tune"]) == 2


def test_gpu_shadowkv_refuses_without_gpu_and_its_gram_baseline_is_right():
    import torch

    gpu_shadowkv = _load("gpu_shadowkv")
    assert gpu_shadowkv.main(["--skip-tune"]) == 2
    from kernelhub.registry import get_family

    spec = get_family("lowrank_gram")
    inputs = spec.make_inputs(spec.shapes("smoke")[0], "float32", "cpu", seed=0)
    torch.testing.assert_close(gpu_shadowkv._gram_fp32(inputs), spec.reference(inputs), rtol=1e-4, atol=1e-3)


def test_cpu_tp_overlap_row_on_two_ranks():
    _load("report")  # puts benchmarks/ on sys.path, which the ranks inherit
    import cpu_tp_overlap

    from kernelhub.local_world import LocalWorld

    with LocalWorld(2) as world:
        rows = world.run(cpu_tp_overlap.measure_shape, "gemm_reduce_scatter", 8, 5, 4, "float32", 3, [1, 2, 8])
    assert rows[0] == rows[1]  # every figure is the slowest rank's, so the ranks agree
    row = rows[0]
    assert row["CHUNKS"] in (1, 2)  # CHUNKS=8 exceeds the 4 rows per rank: never run
    assert all(row[t] > 0 for t in ("T_gemm", "T_comm", "T_p2p", "T_sequential", "T_default", "T_overlapped"))
    assert row["speedup"] == pytest.approx(row["T_sequential"] / row["T_overlapped"])
    expected_e = (row["T_gemm"] + row["T_p2p"] - row["T_overlapped"]) / min(row["T_gemm"], row["T_p2p"])
    assert row["E"] == pytest.approx(expected_e)


def test_gpu_tp_overlap_refuses_without_gpu():
    _load("report")
    gpu_tp_overlap = _load("gpu_tp_overlap")
    with pytest.raises(SystemExit, match="no GPU"):
        gpu_tp_overlap.main([])
