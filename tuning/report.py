"""`kernelhub report`: PNG plots of the config database and a Markdown summary that links them.

Written into one folder (`kernelhub report -o DIR`):
- `history_<study>.png`, one per tuning study: each completed trial's median time against its
  number, the running best as a step line, the DEFAULT marked; failed and pruned trials have no
  time, so they are marks along the top;
- `speedup_<gpu>_<family>_<dtype>.png`: the tuned config's speedup over the DEFAULT, per bucket;
- `roofline_<gpu>.png`: every tuned config at (arithmetic intensity, achieved FLOP/s) under the
  device's roofline, drawn only where the datasheet peaks of that key are known (`DATASHEET_PEAKS`);
- `summary.md`: a table of the stored configs per GPU, with a link to every plot.

The plots show current rows only; stale rows (`kernelhub.configs.row_status`) are in the table,
marked. Rows and studies of families this install does not know, or whose bucket it cannot parse,
have no FLOP or byte count and no DEFAULT, and rows or trials the store reads back invalid (a value
that breaks its column's rule) have nothing to plot: the summary lists them all as skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kernelhub.db import BestConfig, ConfigStore, TrialRecord

from kernelhub.configs import row_status
from kernelhub.device import DeviceIdentity
from kernelhub.errors import KernelhubError, UnknownFamilyError
from kernelhub.kernels.loader import get_family
from kernelhub.registry import FamilySpec, Shape

SUMMARY_NAME = "summary.md"


@dataclass(frozen=True)
class DatasheetPeaks:
    """Dense (no sparsity) tensor-core peaks and the memory bandwidth of one GPU part."""

    part: str  # the variant the figures are for; a key may also cover slower ones (PCIe, less memory)
    bf16_tflops: float
    int8_tops: float
    bandwidth_gb_s: float


PEAKS_SOURCE = "vendor datasheet"
# The only place peak figures live. NVIDIA's Hopper datasheets list tensor-core rates with 2:4
# sparsity, so their dense rate is half the listed one. A key missing here gets no roofline.
DATASHEET_PEAKS: dict[str, DatasheetPeaks] = {
    "a100": DatasheetPeaks("NVIDIA A100 80GB SXM4", bf16_tflops=312, int8_tops=624, bandwidth_gb_s=2039),
    "h100": DatasheetPeaks("NVIDIA H100 SXM5 80GB", bf16_tflops=1979 / 2, int8_tops=3958 / 2, bandwidth_gb_s=3350),
    "h200": DatasheetPeaks("NVIDIA H200 SXM 141GB", bf16_tflops=1979 / 2, int8_tops=3958 / 2, bandwidth_gb_s=4800),
    "l40s": DatasheetPeaks("NVIDIA L40S", bf16_tflops=362.05, int8_tops=733, bandwidth_gb_s=864),
}

_LOG_SCALE_RATIO = 20  # slowest / fastest trial above which the time axis is logarithmic
_MAX_STEM = 120  # file name length, well under every file system's limit
_DPI = 110
# Marks of trials without a time (a history plot's top strip), by state.
_UNTIMED_STYLES = {"failed": {"marker": "x", "color": "tab:red"},
                   "pruned": {"marker": "|", "color": "tab:gray", "markersize": 9}}
_OTHER_UNTIMED_STYLE = {"marker": ".", "color": "black"}


@dataclass(frozen=True)
class TunedRow:
    """A stored best config with its family spec, parsed bucket and status on this machine."""

    row: BestConfig
    spec: FamilySpec
    bucket: Shape
    status: str  # "ok" or "stale: <why>"

    @property
    def speedup(self) -> float | None:
        if not self.row.default_median_ms or self.row.median_ms <= 0:
            return None
        return self.row.default_median_ms / self.row.median_ms

    @property
    def flops(self) -> int:
        return self.spec.flops(self.bucket)

    @property
    def intensity(self) -> float:
        """FLOP per byte moved."""
        return self.flops / self.spec.bytes_moved(self.bucket, self.row.dtype)

    @property
    def achieved_tflops(self) -> float:
        return self.flops / (self.row.median_ms * 1e-3) / 1e12


@dataclass
class Report:
    """What `write_report` wrote."""

    directory: Path
    summary: Path
    plots: list[Path]
    skipped: list[str]  # one line per row or study left out, with the reason


def write_report(store: ConfigStore, directory: str | Path, *, device: DeviceIdentity,
                 gpu_key: str | None = None, family: str | None = None) -> Report | None:
    """Write the plots and `summary.md` of the configs and trials in `store` into `directory`.

    `device` is the machine staleness is judged on; `gpu_key` and `family` filter. Returns None,
    writing nothing, when the database holds no config and no trial matching the filters.
    """
    _require_matplotlib()
    rows = store.best_configs(gpu_key=gpu_key, family=family, include_invalid=True)
    trials = store.trials(gpu_key=gpu_key, family=family, include_invalid=True)
    if not rows and not trials:
        return None
    directory = _make_directory(Path(directory))
    names = _FileNames(directory)
    report = Report(directory, directory / SUMMARY_NAME, [], [])
    report.skipped += [f"config {r.gpu_key} {r.family} {r.bucket} {r.dtype} (row {r.id}): invalid: {r.invalid}"
                       for r in rows if r.invalid]
    report.skipped += [f"trial {t.study} {t.number} (row {t.id}): invalid: {t.invalid}" for t in trials if t.invalid]
    rows = [r for r in rows if not r.invalid]
    trials = [t for t in trials if not t.invalid]
    lines = ["# kernelhub report", "",
             (f"Config database `{store.where}`: {len(rows)} tuned configs, {len(trials)} trials. "
              f"Status as judged on this machine, {device.describe()}; the plots show current rows only."), ""]

    try:
        for gpu in sorted({r.gpu_key for r in rows} | {t.gpu_key for t in trials}):
            lines += _gpu_section(gpu, rows, trials, device, names, report)
        if report.skipped:
            lines += ["## Skipped", ""] + [f"- {_cell(reason)}" for reason in report.skipped] + [""]
        report.summary.write_text("\n".join(lines))
    except OSError as exc:
        raise KernelhubError(f"cannot write the report into {directory}: {exc}") from None
    return report


# -- sections of the summary, each writing its plots -------------------------------------------

def _gpu_section(gpu: str, rows: Sequence[BestConfig], trials: Sequence[TrialRecord], device: DeviceIdentity,
                 names: _FileNames, report: Report) -> list[str]:
    tuned = []
    for row in (r for r in rows if r.gpu_key == gpu):
        try:
            spec, bucket = _spec_and_bucket(row.family, row.bucket)
        except (UnknownFamilyError, ValueError) as exc:
            report.skipped.append(f"config {gpu} {row.family} {row.bucket} {row.dtype}: {exc}")
            continue
        tuned.append(TunedRow(row, spec, bucket, row_status(row, device, get_family)))
    # The database orders bucket text ("M=128" before "M=16"); parsed buckets order by size.
    tuned.sort(key=lambda t: (t.row.family, t.row.dtype, t.bucket, t.row.kernel_version))
    current = [t for t in tuned if t.status == "ok"]
    return ([f"## GPU `{gpu}`", ""]
            + (_config_table(tuned) if tuned else ["No tuned configs stored.", ""])
            + _roofline_section(gpu, current, names, report)
            + _speedup_section(gpu, current, names, report)
            + _history_section([t for t in trials if t.gpu_key == gpu], names, report))


def _config_table(tuned: Sequence[TunedRow]) -> list[str]:
    header = ("kernel", "bucket", "dtype", "config", "best ms", "default ms", "speedup", "throughput",
              "trials", "status")
    table = [_table_row(header), _table_row(["---"] * len(header))]
    for t in tuned:
        r = t.row
        table.append(_table_row((
            r.family, r.bucket, r.dtype, " ".join(f"{k}={v}" for k, v in r.config.items()),
            f"{r.median_ms:.4g}", f"{r.default_median_ms:.4g}" if r.default_median_ms else "-",
            f"{t.speedup:.2f}x" if t.speedup else "-",
            f"{r.throughput:.3g} {r.throughput_unit}" if r.throughput else "-", r.trials, t.status)))
    return table + [""]


def _roofline_section(gpu: str, current: Sequence[TunedRow], names: _FileNames, report: Report) -> list[str]:
    if not current:
        return []
    lines = ["### Roofline", ""]
    # A kernel that only moves data (0 FLOP) has no place on a FLOP/s axis.
    points = [t for t in current if t.flops > 0 and t.row.median_ms > 0]
    without_flops = sorted({t.spec.name for t in current if t.flops <= 0})
    peaks = DATASHEET_PEAKS.get(gpu)
    if points:
        path = names.new("roofline", gpu)
        _save(_roofline_figure(gpu, points, peaks), path)
        report.plots.append(path)
        lines += [f"![roofline of {gpu}]({path.name})", ""]
    else:
        lines += ["No current tuned config with a FLOP count: no roofline plot.", ""]
    if peaks is None:
        lines += [f"No datasheet peaks are known for `{gpu}`: no roofline is drawn, only the measured points.", ""]
    else:
        lines += [(f"Roofline of the {peaks.part} ({PEAKS_SOURCE}, dense): bf16 tensor cores "
                   f"{peaks.bf16_tflops:g} TFLOP/s, int8 tensor cores {peaks.int8_tops:g} TOPS, memory "
                   f"{peaks.bandwidth_gb_s:g} GB/s. Other parts under this key may be slower."), ""]
    if without_flops:
        lines += [f"Not on the roofline (they move data, 0 FLOP): {', '.join(without_flops)}.", ""]
    return lines


def _speedup_section(gpu: str, current: Sequence[TunedRow], names: _FileNames, report: Report) -> list[str]:
    if not current:
        return []
    lines = ["### Speedup over the DEFAULT", ""]
    groups: dict[tuple[str, str], list[TunedRow]] = {}
    for t in current:
        groups.setdefault((t.row.family, t.row.dtype), []).append(t)
    for (family, dtype), group in groups.items():
        path = names.new("speedup", gpu, family, dtype)
        _save(_speedup_figure(gpu, family, dtype, group), path)
        report.plots.append(path)
        lines += [f"![speedup of {family} {dtype} on {gpu}]({path.name})", ""]
    return lines


def _history_section(trials: Sequence[TrialRecord], names: _FileNames, report: Report) -> list[str]:
    studies: dict[str, list[TrialRecord]] = {}
    for trial in trials:
        studies.setdefault(trial.study, []).append(trial)
    links = []
    for study, study_trials in studies.items():
        first = study_trials[0]
        try:
            spec, bucket = _spec_and_bucket(first.family, first.bucket)
        except (UnknownFamilyError, ValueError) as exc:
            report.skipped.append(f"study {study}: {exc}")
            continue
        path = names.new("history", study)
        _save(_history_figure(study_trials, spec.default_config(bucket, first.dtype)), path)
        report.plots.append(path)
        links.append(f"- [{first.family} {first.bucket} {first.dtype}, kernel {first.kernel_version}]"
                     f"({path.name}): {len(study_trials)} trials")
    return ["### Optimization history", ""] + links + [""] if links else []


# -- plots -------------------------------------------------------------------------------------

def _history_figure(trials: Sequence[TrialRecord], default_config: dict):
    first = trials[0]
    fig = _new_figure()
    # Failed and pruned trials have no time: they go in a strip above the time axis.
    strip, ax = fig.subplots(2, 1, sharex=True, height_ratios=(1, 6))
    timed = [t for t in trials if t.state == "complete" and t.median_ms is not None]
    if timed:
        numbers = [t.number for t in timed]
        times = [t.median_ms for t in timed]
        ax.plot(numbers, times, linestyle="none", marker="o", markersize=4, color="tab:blue",
                label="completed trial")
        ax.step(numbers, np.minimum.accumulate(times), where="post", color="tab:green", label="best so far")
        defaults = [t for t in timed if t.config == default_config]
        if defaults:
            ax.plot([t.number for t in defaults], [t.median_ms for t in defaults], linestyle="none",
                    marker="*", markersize=14, color="tab:orange", label="DEFAULT")
        if max(times) / min(times) > _LOG_SCALE_RATIO:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no completed trial", transform=ax.transAxes, ha="center", va="center")
    untimed = sorted({t.state for t in trials} - {"complete"})
    for row, state in enumerate(untimed):
        numbers = [t.number for t in trials if t.state == state]
        strip.plot(numbers, [row] * len(numbers), linestyle="none", **_UNTIMED_STYLES.get(state, _OTHER_UNTIMED_STYLE))
    strip.set_yticks(range(len(untimed)), untimed, fontsize=8)
    strip.set_ylim(-0.7, max(len(untimed), 1) - 0.3)
    strip.tick_params(axis="x", labelbottom=False)
    ax.set_xlabel("trial number")
    ax.set_ylabel("median time (ms)")
    strip.set_title(f"{first.gpu_key} {first.family} {first.bucket} {first.dtype}\n"
                    f"kernel {first.kernel_version}", fontsize=10)
    return fig


def _speedup_figure(gpu: str, family: str, dtype: str, group: Sequence[TunedRow]):
    fig = _new_figure(width=max(6.0, 3.0 + 0.7 * len(group)))
    ax = fig.add_subplot()
    positions = range(len(group))
    bars = ax.bar(positions, [t.speedup or 0.0 for t in group], color="tab:blue")
    ax.bar_label(bars, labels=[f"{t.speedup:.2f}x" if t.speedup else "no DEFAULT time" for t in group],
                 fontsize=8)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="DEFAULT (1.0x)")
    ax.set_xticks(list(positions), [t.row.bucket for t in group], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup (DEFAULT ms / tuned ms)")
    ax.set_title(f"{gpu} {family} {dtype}: tuned vs DEFAULT per shape bucket", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def _roofline_figure(gpu: str, points: Sequence[TunedRow], peaks: DatasheetPeaks | None):
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    by_family: dict[str, list[TunedRow]] = {}
    for t in points:
        by_family.setdefault(t.spec.name, []).append(t)
    for family, group in by_family.items():
        ax.plot([t.intensity for t in group], [t.achieved_tflops for t in group], linestyle="none",
                marker="o", label=family)
    if peaks is None:
        ax.set_title(f"{gpu}: no datasheet peaks known, measured points only (no roofline)", fontsize=10)
    else:
        ridges = [peak * 1e3 / peaks.bandwidth_gb_s for peak in (peaks.bf16_tflops, peaks.int8_tops)]
        intensities = [t.intensity for t in points] + ridges
        x = np.geomspace(min(intensities) / 4, max(intensities) * 4, 256)
        memory_roof = peaks.bandwidth_gb_s * x / 1e3  # GB/s * FLOP/byte -> TFLOP/s
        for label, peak, style in ((f"bf16 roofline ({peaks.bf16_tflops:g} TFLOP/s)", peaks.bf16_tflops, "-"),
                                   (f"int8 roofline ({peaks.int8_tops:g} TOPS)", peaks.int8_tops, "--")):
            ax.plot(x, np.minimum(memory_roof, peak), linestyle=style, color="black", linewidth=1, label=label)
        ax.set_title(f"{gpu}: {peaks.part}, {peaks.bandwidth_gb_s:g} GB/s ({PEAKS_SOURCE}, dense peaks)",
                     fontsize=10)
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax.set_ylabel("achieved TFLOP/s (int8: TOPS)")
    ax.legend(fontsize=8)
    return fig


# -- helpers -----------------------------------------------------------------------------------

def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise KernelhubError("the report needs matplotlib: pip install 'kernelhub[report]'") from None


def _new_figure(width: float = 7.0, height: float = 4.5):
    """A figure drawn by the Agg canvas: no display needed, and no pyplot state shared with the caller."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=_DPI)


def _spec_and_bucket(family: str, bucket: str) -> tuple[FamilySpec, Shape]:
    """Raises UnknownFamilyError for an unknown family, ValueError for a bucket it cannot parse."""
    spec = get_family(family)
    return spec, spec.parse_shape(bucket)


def _make_directory(directory: Path) -> Path:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelhubError(f"cannot create the report folder {directory}: {exc.strerror or exc}") from None
    return directory


class _FileNames:
    """Portable, distinct PNG paths in the report folder, from any text (buckets, study names)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.used: set[str] = set()

    def new(self, kind: str, *parts: str) -> Path:
        stem = _safe_stem(kind, *parts)
        name, n = stem, 1
        while name in self.used:
            n += 1
            name = f"{stem}-{n}"
        self.used.add(name)
        return self.directory / f"{name}.png"


def _safe_stem(*parts: str) -> str:
    """`("speedup", "h100", "M=1,N=64")` -> `"speedup_h100_M1-N64"`: letters, digits, `.`, `_`, `-` only."""
    cleaned = (re.sub(r"[^A-Za-z0-9._]+", "-", part.replace("=", "")).strip("-.") for part in parts)
    return "_".join(c for c in cleaned if c)[:_MAX_STEM]


def _cell(value: object) -> str:
    """Text that cannot break a Markdown table row or list item."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table_row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"
