"""`kernelhub report`: PNG plots and a Markdown summary of a config database, through the CLI."""

import dataclasses
import re
import sys

import pytest
import torch
from kernelhub.db import BestConfig, ConfigStore, TrialRecord
from kernelhub.tuning import report

from kernelhub import cli
from kernelhub.device import current_device
from kernelhub.kernels.int8_gemm import space
from kernelhub.kernels.int8_gemm.spec import SPEC

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TUNED = dict(space.DEFAULT_LARGE_M, BLOCK_M=64)
OLD_VERSION = "0123456789abcdef"
NO_PEAKS_KEY = "mystery-gpu"
H100 = dataclasses.replace(current_device(), key="h100", name="NVIDIA H100 80GB HBM3", vendor="nvidia",
                           compute_capability="9.0", sm_count=132).to_dict()

# (gpu, family, bucket, dtype, median ms, DEFAULT ms, kernel version)
ROWS = [
    ("h100", "int8_gemm", "M=16,N=4096,K=4096", "bfloat16", 0.021, 0.034, SPEC.kernel_version),
    ("h100", "int8_gemm", "M=128,N=4096,K=4096", "bfloat16", 0.05, 0.08, SPEC.kernel_version),
    ("h100", "int8_gemm", "M=1024,N=4096,K=4096", "bfloat16", 0.31, 0.3, OLD_VERSION),  # stale
    ("h100", "retired_kernel", "X=7", "float32", 1.0, 2.0, "feedfacefeedface"),  # unknown family
    (NO_PEAKS_KEY, "int8_gemm", "M=128,N=6144,K=4096", "int32", 0.09, None, SPEC.kernel_version),
]
STUDY = f"h100/int8_gemm/M=128,N=4096,K=4096/bfloat16/{SPEC.kernel_version}"
UNKNOWN_STUDY = "h100/retired_kernel/X=7/float32/feedfacefeedface"


def _seed(url):
    with ConfigStore(url) as store:
        store.save_many(BestConfig(
            gpu_key=gpu, family=family, bucket=bucket, dtype=dtype, config=TUNED, median_ms=best,
            p20_ms=best, p80_ms=best, throughput=80.0, throughput_unit="TFLOP/s", default_median_ms=default,
            trials=12, kernel_version=version, triton_version="3.9.0", torch_version=torch.__version__,
            cuda_version="12.8", device=H100 if gpu == "h100" else None,
        ) for gpu, family, bucket, dtype, best, default, version in ROWS)
        # DEFAULT first (as the tuner enqueues it), then sampled configs, one failed, two pruned.
        states = ["complete", "complete", "failed", "complete", "pruned", "complete", "pruned", "complete"]
        for number, state in enumerate(states):
            config = space.default_config((128, 4096, 4096), "bfloat16") if number == 0 else dict(TUNED, GROUP_M=number % 4 + 1)
            timed = state == "complete"
            store.add_trial(TrialRecord(
                gpu_key="h100", family="int8_gemm", bucket="M=128,N=4096,K=4096", dtype="bfloat16",
                kernel_version=SPEC.kernel_version, study=STUDY, number=number, config=config, state=state,
                reason=None if timed else "test", median_ms=0.2 / (number + 1) if timed else None))
        store.add_trial(TrialRecord(
            gpu_key="h100", family="retired_kernel", bucket="X=7", dtype="float32", kernel_version="feedfacefeedface",
            study=UNKNOWN_STUDY, number=0, config={"B": 1}, state="complete", median_ms=1.0))


@pytest.fixture
def written(private_config_db, tmp_path, capsys):
    """The report of the seeded database: (folder, summary text, stdout)."""
    _seed(private_config_db)
    out = tmp_path / "report"
    assert cli.main(["report", "-o", str(out)]) == 0
    return out, (out / "summary.md").read_text(), capsys.readouterr().out


def _section(summary: str, gpu: str) -> str:
    return summary.split(f"## GPU `{gpu}`")[1].split("\n## ")[0]


def test_writes_valid_pngs_and_links_exactly_those(written):
    import matplotlib.image

    out, summary, stdout = written
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert f"wrote {len(pngs)} plots" in stdout and "2 rows or studies skipped" in stdout
    # One history per known study, one speedup per (gpu, family, dtype), one roofline per gpu.
    assert len([n for n in pngs if n.startswith("history_")]) == 1
    assert {n for n in pngs if not n.startswith("history_")} == {
        "speedup_h100_int8_gemm_bfloat16.png", f"speedup_{NO_PEAKS_KEY}_int8_gemm_int32.png",
        "roofline_h100.png", f"roofline_{NO_PEAKS_KEY}.png"}
    for name in pngs:
        assert re.fullmatch(r"[A-Za-z0-9._-]+\.png", name), name  # bucket and study text sanitised
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        height, width, channels = matplotlib.image.imread(out / name).shape
        assert height > 200 and width > 200 and channels in (3, 4)
    linked = re.findall(r"\]\(([^)]+)\)", summary)
    assert sorted(linked) == pngs


def test_table_matches_the_stored_rows(written):
    _, summary, _ = written
    for gpu, family, bucket, dtype, best, default, version in ROWS:
        if family == "retired_kernel":
            continue
        (line,) = [l for l in _section(summary, gpu).splitlines() if f"| {bucket} | {dtype} |" in l]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [family, bucket, dtype]
        assert cells[3] == " ".join(f"{k}={v}" for k, v in TUNED.items())
        assert float(cells[4]) == pytest.approx(best)
        assert cells[8] == "12"
        if default is None:
            assert cells[5] == cells[6] == "-"
        else:
            assert float(cells[5]) == pytest.approx(default)
            assert float(cells[6].rstrip("x")) == pytest.approx(default / best, abs=0.005)
        assert cells[9] == ("stale: kernel changed" if version == OLD_VERSION else "ok")


def test_unknown_family_is_listed_as_skipped(written):
    out, summary, _ = written
    skipped = summary.split("## Skipped")[1]
    assert "config h100 retired_kernel X=7 float32: unknown kernel family 'retired_kernel'" in skipped
    assert f"study {UNKNOWN_STUDY}: unknown kernel family" in skipped
    assert "retired" not in "".join(p.name for p in out.glob("*.png"))
    assert "| retired_kernel |" not in summary


def test_roofline_draws_datasheet_peaks_only_where_known(written):
    _, summary, _ = written
    assert f"No datasheet peaks are known for `{NO_PEAKS_KEY}`" in _section(summary, NO_PEAKS_KEY)
    h100 = _section(summary, "h100")
    assert "No datasheet peaks" not in h100 and "NVIDIA H100 SXM5 80GB (vendor datasheet, dense)" in h100

    spec_row = BestConfig(gpu_key="h100", family="int8_gemm", bucket="M=128,N=4096,K=4096", dtype="int32",
                          config=TUNED, median_ms=0.05, p20_ms=0.05, p80_ms=0.05, trials=1,
                          kernel_version=SPEC.kernel_version, torch_version="", triton_version=None)
    point = report.TunedRow(spec_row, SPEC, (128, 4096, 4096), "ok")
    without = report._roofline_figure(NO_PEAKS_KEY, [point], None).axes[0]
    assert [line.get_label() for line in without.lines] == ["int8_gemm"] and "no roofline" in without.get_title()
    peaks = report.DATASHEET_PEAKS["h100"]
    with_peaks = report._roofline_figure("h100", [point], peaks).axes[0]
    roofs = {line.get_label(): line.get_ydata().max() for line in with_peaks.lines[1:]}
    assert sorted(roofs.values()) == pytest.approx(sorted([peaks.bf16_tflops, peaks.int8_tops]))
    x, y = with_peaks.lines[0].get_data()  # the tuned config: 2MNK FLOP in 0.05 ms
    assert y[0] == pytest.approx(2 * 128 * 4096 * 4096 / 0.05e-3 / 1e12)
    assert x[0] == pytest.approx(SPEC.flops((128, 4096, 4096)) / SPEC.bytes_moved((128, 4096, 4096), "int32"))


def test_history_marks_default_and_untimed_trials(private_config_db):
    _seed(private_config_db)
    with ConfigStore(private_config_db) as store:
        trials = store.trials(study=STUDY)
    strip, ax = report._history_figure(trials, space.default_config((128, 4096, 4096), "bfloat16")).axes
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines["DEFAULT"].get_xdata()) == [0]
    assert list(lines["best so far"].get_ydata()) == sorted(lines["best so far"].get_ydata(), reverse=True)
    assert [t.get_text() for t in strip.get_yticklabels()] == ["failed", "pruned"]
    assert sorted(x for line in strip.lines for x in line.get_xdata()) == [2, 4, 6]


def test_gpu_filter(private_config_db, tmp_path):
    _seed(private_config_db)
    out = tmp_path / "only"
    assert cli.main(["report", "--gpu", NO_PEAKS_KEY, "-o", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"roofline_{NO_PEAKS_KEY}.png",
                                                         f"speedup_{NO_PEAKS_KEY}_int8_gemm_int32.png"]
    assert "h100" not in (out / "summary.md").read_text()


def test_empty_or_missing_database_writes_nothing(private_config_db, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["report", "-o", str(out)]) == 0
    assert "no config database yet" in capsys.readouterr().out
    ConfigStore(private_config_db).close()  # created, empty
    assert cli.main(["report", "--gpu", "h100", "-o", str(out)]) == 0
    assert "nothing to report: no tuned configs or trials for h100 in" in capsys.readouterr().out
    assert not out.exists()


def test_bad_output_folder_and_missing_matplotlib_are_one_line_errors(private_config_db, tmp_path, capsys,
                                                                      monkeypatch):
    _seed(private_config_db)
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("keep me")
    assert cli.main(["report", "-o", str(not_a_folder)]) == 1
    err = capsys.readouterr().err
    assert "cannot create the report folder" in err and len(err.strip().splitlines()) == 1
    assert not_a_folder.read_text() == "keep me"

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert cli.main(["report", "-o", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "pip install 'kernelhub[report]'" in err and len(err.strip().splitlines()) == 1


def test_speedup_plot_shows_current_rows_in_bucket_order(private_config_db, tmp_path, monkeypatch):
    _seed(private_config_db)
    figures, save = {}, report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: (figures.__setitem__(path.name, fig), save(fig, path)))
    assert cli.main(["report", "--gpu", "h100", "-o", str(tmp_path / "r")]) == 0
    ax = figures["speedup_h100_int8_gemm_bfloat16.png"].axes[0]
    current = [r for r in ROWS if r[0] == "h100" and r[1] == "int8_gemm" and r[6] != OLD_VERSION]
    assert [t.get_text() for t in ax.get_xticklabels()] == [r[2] for r in current]  # M=16 before M=128
    assert [bar.get_height() for bar in ax.patches] == pytest.approx([r[5] / r[4] for r in current])
    assert [line.get_ydata()[0] for line in ax.lines] == [1.0]  # the DEFAULT line
