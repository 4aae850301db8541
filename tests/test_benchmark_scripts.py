"""The benchmark harness, and the benchmark scripts end to end on tiny shapes (on CPU: the numbers mean nothing here)."""

import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # the scripts import their sibling `harness`, as when run directly
    sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402  (benchmarks/harness.py)


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- timing -----------------------------------------------------------------------------------


def test_time_cpu_reports_median_and_percentiles_of_the_timed_calls(monkeypatch):
    clock = [0.0]
    durations_ms = iter([100.0, 100.0, 5.0, 1.0, 4.0, 2.0, 3.0])  # two warm-up calls, then five timed

    def fake_perf_counter():
        return clock[0]

    def fn():
        clock[0] += next(durations_ms) / 1e3

    monkeypatch.setattr(time, "perf_counter", fake_perf_counter)
    t = harness.time_cpu(fn, reps=5, warmup=2)
    monkeypatch.undo()
    assert t.median_ms == pytest.approx(3.0)  # the warm-up calls are not counted
    expected = statistics.quantiles([5.0, 1.0, 4.0, 2.0, 3.0], n=10, method="inclusive")
    assert (t.p20_ms, t.p80_ms) == (pytest.approx(expected[1]), pytest.approx(expected[7]))
    assert t.reps == 5 and t.threads == torch.get_num_threads()


def test_time_cpu_interleaved_alternates_the_contenders_and_times_each(monkeypatch):
    clock, calls = [0.0], []
    durations_ms = {"a": iter([9.0, 1.0, 3.0, 2.0, 4.0, 5.0]), "b": iter([9.0, 10.0, 30.0, 20.0, 40.0, 50.0]),
                    "c": iter([9.0, 7.0, 7.0, 7.0, 7.0, 7.0])}  # one warm-up round, then five

    def contender(name):
        def fn():
            calls.append(name)
            clock[0] += next(durations_ms[name]) / 1e3
        return fn

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    timed = harness.time_cpu_interleaved({name: contender(name) for name in "abc"}, reps=5, warmup=1)
    monkeypatch.undo()
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert rounds[0] == ["a", "b", "c"] and all(sorted(r) == ["a", "b", "c"] for r in rounds)  # each once a round
    followers = {(r[i], r[i + 1]) for r in rounds[1:] for i in range(2)}
    assert len({tuple(r) for r in rounds[1:]}) > 1 and len(followers) > 3  # the order changes from round to round
    assert (timed["a"].median_ms, timed["b"].median_ms) == (pytest.approx(3.0), pytest.approx(30.0))
    assert timed["a"].reps == timed["b"].reps == 5


def test_paired_difference_is_the_median_of_the_differences_within_rounds(monkeypatch):
    """A drift of the machine that slows every contender of a round alike cancels in the paired
    difference, though it moves each one's own median and percentiles."""
    clock = [0.0]
    drift = iter([1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 9.0, 9.0])  # one warm-up round, then three; per round
    base_ms = {"op": 3.0, "kernel": 1.0}

    def contender(name):
        def fn():
            clock[0] += (base_ms[name] + next(drift)) / 1e3
        return fn

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    samples = harness.time_cpu_rounds({name: contender(name) for name in base_ms}, reps=3, warmup=1)
    monkeypatch.undo()
    assert samples["kernel"] == pytest.approx([2.0, 6.0, 10.0]) and samples["op"] == pytest.approx([4.0, 8.0, 12.0])
    assert harness.paired_difference_ms(samples, "op", "kernel") == pytest.approx(2.0)
    assert harness.paired_difference_ms(samples, "kernel", "op") == pytest.approx(-2.0)


def test_time_cpu_interleaved_cold_flushes_the_cache_before_every_timed_call(monkeypatch):
    calls = []
    monkeypatch.setattr(harness, "_cpu_cache_flusher", lambda: lambda: calls.append("flush"))
    harness.time_cpu_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                 reps=2, warmup=1, cold=True)
    assert calls[:2] == ["a", "b"] and calls[2::2] == ["flush"] * 4  # warm-up round unflushed
    assert sorted(calls[3:7:2]) == sorted(calls[7::2]) == ["a", "b"]
    calls.clear()
    harness.time_cpu_interleaved({"a": lambda: calls.append("a")}, reps=2, warmup=0)
    assert calls == ["a", "a"]  # not cold: no flush


def test_the_cache_flusher_reads_more_than_the_last_level_cache():
    assert harness.last_level_cache_bytes() >= 2**20
    elements_read = float(harness._cpu_cache_flusher()())  # the sum of a buffer of float32 ones
    assert elements_read * 4 == pytest.approx(2 * harness.last_level_cache_bytes(), rel=1e-6)


def test_time_cpu_of_a_sleep_is_sane():
    t = harness.time_cpu(lambda: time.sleep(0.002), reps=5, warmup=1)
    assert 2.0 <= t.median_ms < 200.0
    assert t.p20_ms <= t.median_ms <= t.p80_ms
    one = harness.time_cpu(lambda: None, reps=1, warmup=0)
    assert one.median_ms == one.p20_ms == one.p80_ms >= 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("reps", [None, 7])
def test_time_cuda_is_sane(reps):
    a = torch.randn(1024, 1024, device="cuda")
    t = harness.time_cuda(lambda: a @ a, reps=reps)
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms < 1000 and t.reps == reps and t.threads is None


# -- throughput, ratios, tables ---------------------------------------------------------------


def test_throughput_from_the_spec_and_fractions_of_peak():
    spec = SimpleNamespace(flops=lambda shape: 2 * shape[0] * shape[1], bytes_moved=lambda shape, dtype: 3e9)
    rate = harness.throughput(spec, (1000, 500), "float32", 2.0, peak_tflops=1e-3, peak_gbs=3000)
    assert rate.tflops == pytest.approx(1e6 / 2e-3 / 1e12)  # 1e6 operations in 2 ms
    assert rate.gbs == pytest.approx(1500)  # 3 GB in 2 ms
    assert rate.of_peak_tflops == pytest.approx(0.5) and rate.of_peak_gbs == pytest.approx(0.5)
    assert harness.throughput(spec, (1, 1), "float32", 1.0).of_peak_gbs is None


def test_throughput_of_a_registered_family():
    from kernelhub.kernels.loader import get_family

    spec = get_family("int8_gemm")
    shape = (128, 256, 512)
    rate = harness.throughput(spec, shape, "bfloat16", 0.25)
    assert rate.tflops == pytest.approx(2 * 128 * 256 * 512 / 0.25e-3 / 1e12)
    assert rate.gbs == pytest.approx(spec.bytes_moved(shape, "bfloat16") / 0.25e-3 / 1e9)


def test_ratio_against_a_baseline():
    assert harness.ratio(3.0, 2.0) == 1.5  # the contender takes 2 ms where the baseline takes 3
    assert harness.ratio(None, 2.0) is None and harness.ratio(3.0, None) is None


def test_markdown_table_formats_columns_and_missing_values():
    rows = [{"name": "a", "ms": 1.23456, "x": 1.5, "n": 3, "pct": 0.143, "skip": "?"},
            {"name": "b", "ms": None, "x": 2.0, "n": 4, "pct": -0.013, "skip": "?"}]
    table = harness.markdown_table(rows, ["name", "ms", "x", "n", "pct"],
                                   {"ms": harness.fixed(3), "x": harness.times, "pct": harness.percent_change})
    assert table.splitlines() == ["| name | ms | x | n | pct |", "|---|---|---|---|---|",
                                  "| a | 1.235 | 1.50x | 3 | +14.3% |", "| b | n/a | 2.00x | 4 | -1.3% |"]
    assert harness.markdown_table([{"v": 1 / 3}], ["v"]).splitlines()[2] == "| 0.3333 |"  # 4 significant digits


# -- arguments and the results page -----------------------------------------------------------


def _parser(**kwargs):
    parser = harness.BenchmarkParser("/somewhere/benchmarks/cpu_thing.py", "doc", reps=15,
                                     quick={"ms": [16], "reps": 3}, **kwargs)
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 128])
    return parser


def test_parser_defaults_quick_and_the_reproducing_command():
    parser = _parser()
    args = parser.parse_args([])
    assert (args.ms, args.reps, args.quick, args.markdown) == ([1, 16, 128], 15, False, None)
    assert args.command == "python benchmarks/cpu_thing.py"
    args = parser.parse_args(["--quick"])
    assert (args.ms, args.reps) == ([16], 3)
    args = parser.parse_args(["--quick", "--reps", "7", "--markdown", "out.md"])
    assert (args.ms, args.reps, args.markdown) == ([16], 7, "out.md")  # an explicit option wins
    assert args.command == "python benchmarks/cpu_thing.py --quick --reps 7 --markdown out.md"
    assert parser.parse_args([]).ms == [1, 16, 128]  # --quick left the defaults as they were


def test_parser_refuses_a_quick_value_for_an_option_it_lacks():
    parser = harness.BenchmarkParser("x.py", "doc", reps=3, quick={"seqs": [1]})
    with pytest.raises(ValueError, match="seqs"):
        parser.parse_args([])


def test_parser_without_timing_has_no_reps():
    parser = harness.BenchmarkParser("x.py", "doc")
    with pytest.raises(SystemExit):
        parser.parse_args(["--reps", "3"])


def test_publish_writes_the_command_device_versions_and_threads(tmp_path, capsys):
    import triton

    path = tmp_path / "page.md"
    args = _parser().parse_args(["--quick", "--markdown", str(path)])
    page = harness.publish("| a |\n|---|\n| 1 |\n", args)
    lines = path.read_text().splitlines()
    assert lines[0] == f"Command: `python benchmarks/cpu_thing.py --quick --markdown {path}`"
    assert lines[2].startswith("Device: CPU ") and f"torch threads: {torch.get_num_threads()};" in lines[2]
    assert f"torch {torch.__version__}" in lines[2] and f"triton {triton.__version__}" in lines[2]
    assert lines[4:] == ["| a |", "|---|", "| 1 |"]
    assert capsys.readouterr().out == page == path.read_text()
    harness.publish("text", args, threads="1 per rank")
    assert "torch threads: 1 per rank;" in path.read_text()


def test_environment_names_a_gpu_by_its_full_identity(monkeypatch):
    from kernelhub.device import DeviceIdentity

    h100 = DeviceIdentity(key="h100", name="NVIDIA H100 80GB HBM3", vendor="nvidia", compute_capability="9.0",
                          sm_count=132, memory_bytes=80 * 2**30, shared_memory_bytes=232448, cuda_version="12.8",
                          torch_version="2.11.0", triton_version="3.6.0")
    monkeypatch.setattr(harness, "current_device", lambda: h100)
    line = harness.environment()
    assert line.startswith("Device: NVIDIA H100 80GB HBM3 (h100, sm_90, 132 SMs, 80 GiB, CUDA 12.8); ")
    assert "torch 2.11.0; triton 3.6.0" in line


def test_write_json_records_the_command_and_device(tmp_path):
    path = tmp_path / "rows.json"
    args = _parser().parse_args(["--ms", "2"])
    harness.write_json(str(path), args, rows=[{"M": 2, "config": {"BLOCK_M": 16}}])
    record = json.loads(path.read_text())
    assert record["command"] == "python benchmarks/cpu_thing.py --ms 2"
    assert record["device"]["key"] == "cpu" and record["versions"]["torch"] == torch.__version__
    assert record["rows"] == [{"M": 2, "config": {"BLOCK_M": 16}}]
    harness.write_json(None, args, rows=[])  # no path: nothing written, no error


# -- the scripts ------------------------------------------------------------------------------


def test_cpu_shadowkv_end_to_end_writes_its_page(tmp_path, capsys):
    path = tmp_path / "shadowkv.md"
    assert _load("cpu_shadowkv").main(["--quick", "--seqs", "1024", "--reps", "2", "--no-svd",
                                       "--markdown", str(path)]) == 0
    page = path.read_text()
    assert page.startswith(f"Command: `python benchmarks/cpu_shadowkv.py --quick --seqs 1024 --reps 2 --no-svd "
                           f"--markdown {path}`\n\nDevice: CPU ")
    assert "| B | S | decode ms | dense SDPA ms | speedup |" in page and "\n| 1 | 1024 | " in page
    assert "| B | S | key_rel_error | oracle_recall | mass_covered | output_rel_error | needles_found |" in page


def test_cpu_w8a8_end_to_end_writes_its_page(tmp_path):
    path = tmp_path / "w8a8.md"
    _load("cpu_w8a8").main(["--quick", "--ms", "3", "--quantize-ms", "5", "--reps", "1", "--markdown", str(path)])
    page = path.read_text()
    assert "| llama3-8b | o | 3 | 4096 | 4096 |" in page and "| qwen2-7b | o | 3 | 3584 | 3584 |" in page
    assert "| all | " in page and "\n| 5 | 4096 | " in page
    assert "\n| 300 | 1048576 | " in page and "\n| 300 | 131072 | " in page  # the block sweep, shipped size included


def test_cpu_lowrank_keys_end_to_end_writes_its_page(tmp_path):
    path = tmp_path / "lowrank.md"
    _load("cpu_lowrank_keys").main(["--seqs", "2048", "--reps", "1", "--markdown", str(path)])
    lines = path.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| S | lowrank_keys s |"))
    row = next(line for line in lines if line.startswith("| 2048 | "))
    cells = dict(zip((c.strip() for c in header.strip("|").split("|")), (c.strip() for c in row.strip("|").split("|"))))
    ours, int8, optimum, randomized = (float(cells[name]) for name in (
        "lowrank_keys error", "int8 Gram error", "svd error (optimum)", "svd_lowrank error"))
    assert optimum <= ours <= optimum * 1.01 and randomized >= optimum  # errors of each, the SVD's the least
    assert optimum <= int8 <= optimum * 1.05  # measured 1.02 (1.10 at S = 700, fewer tokens than H_kv * D)


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


@pytest.mark.parametrize("script", ["gpu_int8", "gpu_shadowkv", "gpu_tp_overlap"])
def test_gpu_scripts_refuse_without_gpu(script, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _load(script).main(["--quick"]) == 2
    assert f"{script}.py needs a CUDA GPU" in capsys.readouterr().err


def _call_once(fn):
    """A timer for the GPU scripts' row functions on the CPU: runs `fn` once, says it took 2 ms."""
    fn()
    return 2.0


def test_gpu_shadowkv_rows_on_cpu():
    gpu_shadowkv = _load("gpu_shadowkv")
    rows = gpu_shadowkv.kernel_rows(100.0, "bfloat16", "smoke", _call_once, device="cpu")
    assert {row["kernel"] for row in rows} == set(gpu_shadowkv.KERNELS)
    from kernelhub.kernels.loader import get_family

    spec = get_family(rows[0]["kernel"])
    shape = spec.shapes("smoke")[0]
    assert rows[0]["shape"] == spec.format_shape(shape) and rows[0]["speedup"] == 1.0
    assert rows[0]["GB/s"] == pytest.approx(spec.bytes_moved(shape, "bfloat16") / 2e-3 / 1e9)
    assert rows[0]["of bandwidth"] == pytest.approx(rows[0]["GB/s"] / 100.0)
    decode = gpu_shadowkv.decode_row(512, 1, _call_once, device="cpu")
    assert decode["S"] == 512 and decode["speedup"] == 1.0 and 0 < decode["resident GB"] < 2 * decode["full KV GB"]
    assert gpu_shadowkv.memory_bandwidth_gbs(_call_once, "cpu", nbytes=2**20) == pytest.approx(2 * 2**20 / 2e-3 / 1e9)


def test_gpu_tp_overlap_chunk_gemm_rows_on_cpu():
    rows = _load("gpu_tp_overlap").chunk_gemm_rows("bfloat16", "smoke", _call_once, device="cpu")
    m, n, k = rows[0]["M"], rows[0]["N"], rows[0]["K"]
    assert rows[0]["triton TFLOP/s"] == pytest.approx(2 * m * n * k / 2e-3 / 1e12)
    assert rows[0]["triton / torch"] == 1.0 and "BLOCK_M=" in rows[0]["config"]


def test_gpu_shadowkv_gram_baseline_is_right():
    from kernelhub.kernels.loader import get_family

    spec = get_family("lowrank_gram")
    inputs = spec.make_inputs(spec.shapes("smoke")[0], "float32", "cpu", seed=0)
    torch.testing.assert_close(_load("gpu_shadowkv")._gram_fp32(inputs), spec.reference(inputs), rtol=1e-4, atol=1e-3)


def test_cpu_tp_overlap_row_on_two_ranks():
    import cpu_tp_overlap  # benchmarks/ is on sys.path (see the top), which the ranks inherit

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


def test_cpu_cold_calls_end_to_end_writes_its_page(tmp_path):
    path = tmp_path / "cold.md"
    _load("cpu_cold_calls").main(["--quick", "--reps", "3", "--markdown", str(path)])
    page = path.read_text()
    for call in ("kernelhub quantize_int8", "plain torch quantisation", "fbgemm GEMM alone", "kernelhub Int8Linear",
                 "torch.ao dynamic Linear"):
        row = next(line for line in page.splitlines() if line.startswith(f"| {call}"))
        assert all(float(cell) > 0 for cell in row.strip("|").split("|")[1:])  # four timings, each measured
    assert "| M | kernelhub after kernelhub us | kernelhub after plain us | plain after kernelhub us | " in page
    order = next(line for line in page.splitlines() if line.startswith("| 8 | "))
    assert len(order.strip("|").split("|")) == 5 and all(float(c) > 0 for c in order.strip("|").split("|")[1:])
