"""What every benchmark script shares: timing, throughput, ratios, tables, the results page, arguments.

A script builds its parser with `BenchmarkParser` (`--reps`, `--quick`, `--markdown PATH`), times
with `time_cpu` / `time_cuda` / `time_ranks`, turns a family kernel's time into TFLOP/s and GB/s
with `throughput` (from the registered spec's `flops` and `bytes_moved`), adds `ratio` columns
against a named baseline, formats rows with `markdown_table`, and ends with `publish`, which prints
the page and writes it with the command that reproduces it, the device and the versions:

    parser = BenchmarkParser(__file__, __doc__, reps=15, quick={"ms": [16], "reps": 3})
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 128, 512])
    args = parser.parse_args(argv)
    rows = [{"M": m, "fp32 ms": time_cpu(lambda: x @ w, reps=args.reps).median_ms, ...} for m in args.ms]
    publish(markdown_table(rows, ["M", "fp32 ms", ...], {"fp32 ms": fixed(3)}), args)

The scripts import it as a sibling module (`from harness import ...`): they run as
`python benchmarks/<script>.py`, which puts this folder on `sys.path`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kernelhub import cli, configs
from kernelhub.device import current_device
from kernelhub.tuning.timing import time_collective, time_gpu, time_wall_clock

# -- timing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the 20th/80th percentiles over `reps` timed calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int | None  # None: triton.testing.do_bench chose the count from its time budget
    threads: int | None  # torch's CPU threads during the run; None for GPU timings


def time_cpu(fn: Callable[[], object], *, reps: int, warmup: int = 3) -> Timing:
    """`fn` on the CPU: `warmup` untimed calls, then `reps` calls each timed with time.perf_counter."""
    t = time_wall_clock(fn, warmup=warmup, reps=reps)
    return Timing(t.median_ms, t.p20_ms, t.p80_ms, reps, torch.get_num_threads())


def time_cpu_interleaved(fns: Mapping[str, Callable[[], object]], *, reps: int, warmup: int = 2,
                         cold: bool = False) -> dict[str, Timing]:
    """Each of `fns` on the CPU, one call of each in turn, `reps` rounds after `warmup` untimed
    rounds (`time_cpu_rounds`): the median and percentiles of each one's calls."""
    return summarise_rounds(time_cpu_rounds(fns, reps=reps, warmup=warmup, cold=cold))


def summarise_rounds(samples: Mapping[str, Sequence[float]]) -> dict[str, Timing]:
    """`time_cpu_rounds`' milliseconds as each contender's Timing (median, 20th/80th percentiles)."""
    return {name: Timing(statistics.median(ms), *_percentiles(ms), len(ms), torch.get_num_threads())
            for name, ms in samples.items()}


def time_cpu_rounds(fns: Mapping[str, Callable[[], object]], *, reps: int, warmup: int = 2,
                    cold: bool = False) -> dict[str, list[float]]:
    """Milliseconds of each of `fns` on the CPU, round by round (entry i of every list is round i):
    one call of each in turn, `reps` rounds after `warmup` untimed rounds, so that a drift of the
    machine (a noisy 2-core VM, a frequency change) hits every contender alike, and the difference
    of two contenders within a round cancels most of it (`paired_difference_ms`). Each round calls
    them in another order (a seeded shuffle), so that each follows every other about equally often:
    a call pays for what the call before it left behind (on the 2-core VM, kernelhub's quantiser
    ran 2.6x to 5.5x slower right after the plain torch quantisation, which allocates and frees
    tens of MB, than after itself: cpu_cold_calls.py's second table).
    `cold`: before every timed call, read a buffer twice the last-level cache (untimed), so
    that no call finds data in the cache that an earlier call left there, its own or another
    contender's sharing it: as in a model, where the other layers' weights pass through the cache
    between two calls of one layer."""
    flush = _cpu_cache_flusher() if cold else None
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names, orders = list(fns), random.Random(0)
    for _ in range(reps):
        orders.shuffle(names)
        for name in names:
            fn = fns[name]
            if flush is not None:
                flush()
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def paired_difference_ms(samples: Mapping[str, Sequence[float]], name: str, baseline: str) -> float:
    """The median over rounds of `name`'s time minus `baseline`'s in the same round (`time_cpu_rounds`):
    what `name` adds, with the machine's drift between rounds cancelled."""
    return statistics.median(x - y for x, y in zip(samples[name], samples[baseline], strict=True))


def last_level_cache_bytes() -> int:
    """The largest CPU cache of cpu0 from sysfs (Linux), else 32 MiB."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 * 2**20)


def _cpu_cache_flusher() -> Callable[[], None]:
    """A call that reads twice the last-level cache's bytes: what was cached before is gone after.
    It only reads, as a model's other layers read their weights (no dirty lines to write back)."""
    buffer = torch.ones(2 * last_level_cache_bytes() // 4, dtype=torch.float32)
    return lambda: buffer.sum()


# Larger than any GPU's L2 cache (H100: 50 MB, H200: 60 MB, B200: 126 MB).
_L2_FLUSH_BYTES = 256 * 2**20


def time_cuda(fn: Callable[[], object], *, reps: int | None = None, warmup: int = 10) -> Timing:
    """`fn` on the current GPU, with the L2 cache flushed before every timed call.

    reps None: `triton.testing.do_bench` (25 ms of warm-up, then as many calls as fit in 100 ms).
    reps N: `warmup` untimed calls, then N calls, each between two CUDA events.
    """
    if reps is None:
        t = time_gpu(fn)
        return Timing(t.median_ms, t.p20_ms, t.p80_ms, None, None)
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    samples = [start.elapsed_time(end) for start, end in events]
    p20, p80 = _percentiles(samples)
    return Timing(statistics.median(samples), p20, p80, reps, None)


Timer = Callable[[Callable[[], object]], float]  # a function's median milliseconds


def cuda_timer(reps: int | None) -> Timer:
    """`time_cuda`'s median, for code that takes a timer (so that tests can run it on the CPU)."""
    return lambda fn: time_cuda(fn, reps=reps).median_ms


def _percentiles(samples: Sequence[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return samples[0], samples[0]
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return deciles[1], deciles[7]


def time_ranks(fn: Callable[[], object], device: torch.device | str, *, reps: int, warmup: int = 2) -> Timing:
    """A collective on every rank of the default process group: each of `reps` calls starts after a
    barrier, and each statistic is the slowest rank's (`kernelhub.tuning.timing.time_collective`);
    every rank gets the same figures."""
    device = torch.device(device)
    t = time_collective(fn, device, warmup=warmup, reps=reps)
    return Timing(t.median_ms, t.p20_ms, t.p80_ms, reps, torch.get_num_threads() if device.type == "cpu" else None)


# -- throughput and ratios --------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    tflops: float  # 1e12 operations per second: TFLOP/s, or TOPS for an integer kernel
    gbs: float  # 1e9 bytes per second
    of_peak_tflops: float | None  # fractions of the stated peaks, when given
    of_peak_gbs: float | None


def tflops(operations: float, ms: float) -> float:
    """1e12 operations per second: `operations` done in `ms` milliseconds."""
    return operations / ms / 1e9


def gbs(nbytes: float, ms: float) -> float:
    """1e9 bytes per second: `nbytes` moved in `ms` milliseconds."""
    return nbytes / ms / 1e6


def throughput(spec, shape: Sequence[int], dtype: str, ms: float, *, peak_tflops: float | None = None,
               peak_gbs: float | None = None) -> Throughput:
    """A family kernel's rate at `shape` from its median time: the registered spec's `flops(shape)`
    and `bytes_moved(shape, dtype)` over `ms`, and their fractions of `peak_tflops` / `peak_gbs`."""
    rate, bandwidth = tflops(spec.flops(tuple(shape)), ms), gbs(spec.bytes_moved(tuple(shape), dtype), ms)
    return Throughput(rate, bandwidth, rate / peak_tflops if peak_tflops else None,
                      bandwidth / peak_gbs if peak_gbs else None)


def ratio(baseline: float | None, contender: float | None) -> float | None:
    """A column against a named baseline: baseline / contender, so with times (or any cost, such
    as bytes) how many times cheaper the contender is; None when either is missing."""
    if baseline is None or contender is None:
        return None
    return baseline / contender


# -- tables -----------------------------------------------------------------------------------


def _default(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fixed(digits: int) -> Callable[[float], str]:
    """A column format with `digits` decimals: fixed(3)(1.5) == "1.500"."""
    return f"{{:.{digits}f}}".format


def times(value: float) -> str:
    """A ratio column: 1.5 -> "1.50x"."""
    return f"{value:.2f}x"


def percent_change(value: float) -> str:
    """A relative-cost column: 0.143 -> "+14.3%"."""
    return f"{value * 100:+.1f}%"


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str],
                   formats: Mapping[str, Callable[[object], str]] | None = None) -> str:
    """`rows` (dicts) as a Markdown table of `columns`; `formats` overrides a column's formatting
    (floats default to 4 significant digits; None is always "n/a")."""
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row[column]
            cells.append(_default(value) if value is None else formats.get(column, _default)(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- arguments --------------------------------------------------------------------------------


class BenchmarkParser(argparse.ArgumentParser):
    """The scripts' common options, `--reps N`, `--quick` and `--markdown PATH`, plus their own.

    `--reps` defaults to `reps`; a script that times nothing passes neither `reps` nor `reps_help`
    and gets no `--reps`. `quick` maps option destinations to the values `--quick` uses instead
    of their defaults (the smallest run that shows the script works); an option given explicitly
    still wins. After parsing, `args.command` is the command line that reproduces the run.
    """

    def __init__(self, script: str, doc: str, *, reps: int | None = None, reps_help: str | None = None,
                 quick: Mapping[str, object] | None = None):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.script = Path(script).name
        self.quick = dict(quick or {})
        if reps is not None or reps_help:
            self.add_argument("--reps", type=int, default=reps,
                              help=reps_help or f"timed calls per figure (default {reps})")
        self.add_argument("--quick", action="store_true",
                          help="the smallest run, to check the script works: "
                               + (", ".join(f"{k}={v}" for k, v in self.quick.items()) or "as by default"))
        self.add_argument("--markdown", metavar="PATH", help="also write the results page to this file")

    def add_tuning_options(self, *, trials: int) -> None:
        """The GPU scripts' first steps (`check_and_tune`): --skip-check, --skip-tune, --trials."""
        self.add_argument("--skip-check", action="store_true", help="do not run `kernelhub check` first")
        self.add_argument("--skip-tune", action="store_true", help="measure whatever configs are stored")
        self.add_argument("--trials", type=int, default=trials, help=f"tuner budget per study (default {trials})")

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        unknown = set(self.quick) - {action.dest for action in self._actions}
        if unknown:
            raise ValueError(f"{self.script}: --quick sets options it does not have: {sorted(unknown)}")
        parsed = super().parse_args(argv, namespace)
        if parsed.quick and self.quick:
            defaults = {key: self.get_default(key) for key in self.quick}
            self.set_defaults(**self.quick)
            try:
                parsed = super().parse_args(argv, namespace)
            finally:
                self.set_defaults(**defaults)
        parsed.command = " ".join(["python", f"benchmarks/{self.script}", *argv])
        return parsed


CUDA_REPS_HELP = ("timed calls per figure, each between CUDA events "
                  "(default: as many as fit triton.testing.do_bench's 100 ms)")


# -- the GPU scripts' first steps ---------------------------------------------------------------


def cuda_missing(script: str, instead: str) -> bool:
    """True, after saying so on stderr, when there is no CUDA GPU (the GPU scripts then exit with 2)."""
    if torch.cuda.is_available():
        return False
    print(f"{script} needs a CUDA GPU ({instead}).", file=sys.stderr)
    return True


def check_and_tune(kernels: Sequence[str], args: argparse.Namespace, *, shapes: str, dtype: str) -> int:
    """`kernelhub check` of `kernels` (unless --skip-check), then `kernelhub tune` at `shapes` and
    `dtype` (unless --skip-tune): 1 when the check fails, else 0 (tuning failures are only reported:
    untuned shapes run their DEFAULT)."""
    kernel_args = [arg for name in kernels for arg in ("--kernel", name)]
    if not args.skip_check and cli.main(["check", *kernel_args]) != 0:
        return 1
    if not args.skip_tune:
        cli.main(["tune", *kernel_args, "--shapes", shapes, "--dtype", dtype, "--trials", str(args.trials)])
    configs.clear_cache()
    return 0


# -- the results page -------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    identity = current_device()
    return {"torch": identity.torch_version, "triton": identity.triton_version, "python": platform.python_version()}


def environment(threads: int | str | None = None) -> str:
    """One line: the device (a GPU's full identity, or the CPU's model and cores), torch's CPU
    thread count (`threads` overrides it, e.g. "1 per rank") and the torch/triton/python versions."""
    identity = current_device()
    if identity.is_gpu:
        memory = f"{identity.memory_bytes / 2**30:.0f} GiB" if identity.memory_bytes else "memory unknown"
        device = (f"{identity.name} ({identity.key}, sm_{(identity.compute_capability or '').replace('.', '')}, "
                  f"{identity.sm_count} SMs, {memory}, CUDA {identity.cuda_version})")
    else:
        device = f"CPU {_cpu_name()} ({platform.machine()}, {os.cpu_count()} cores)"
    threads = torch.get_num_threads() if threads is None else threads
    return f"Device: {device}; torch threads: {threads}; " + "; ".join(f"{k} {v}" for k, v in versions().items())


def publish(text: str, args: argparse.Namespace, *, threads: int | str | None = None) -> str:
    """The results page: the command that reproduces it, `environment(threads)`, then `text`.
    Printed, and written to `args.markdown` when given; returned."""
    page = f"Command: `{args.command}`\n\n{environment(threads)}\n\n{text.rstrip()}\n"
    print(page, end="")
    if args.markdown:
        Path(args.markdown).write_text(page)
    return page


def write_json(path: str | None, args: argparse.Namespace, **payload) -> None:
    """The raw rows beside the page: `payload` with the command, the device identity and the versions."""
    if path:
        record = {"command": args.command, "device": current_device().to_dict(), "versions": versions(),
                  "threads": torch.get_num_threads(), **payload}
        Path(path).write_text(json.dumps(record, indent=2, default=str) + "\n")
