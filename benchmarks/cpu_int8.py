"""The CPU path of int8_scaled_gemm against fp32 torch.matmul and bare torch._int_mm.

    python benchmarks/cpu_int8.py                     # Llama-3-8B layers, M in 1, 16, 128, 512, 2048
    python benchmarks/cpu_int8.py --ms 1 128 --reps 20 --markdown benchmarks/results/cpu_int8.md
    python benchmarks/cpu_int8.py --quick             # M = 16, 3 reps: checks the script works

Each figure is the median over `--reps` rounds after warm-up, all contenders measured in the same
process, one call of each per round in a shuffled order. `epilogue` is what int8_scaled_gemm
adds to bare `_int_mm` (dequantising into bfloat16 with bias; the compiled epilogue where it is
built), as the median over rounds of the difference within a round, over `_int_mm`'s median;
`epilogue, torch passes` the same for the torch form of the epilogue (what runs where the
compiled one cannot be built); `epilogue, product whole`, where int8_scaled_gemm makes an int32
product of 32 MiB or more a block of columns at a time, the same for the product made whole and
then dequantised (what it did before); `one pass` the same for `_int_mm` followed by one in-place
torch op over its product (`add_(1)`), the least that any pass after the GEMM costs. `vs fp32` is fp32 matmul time over
int8_scaled_gemm time. A second table gives the per-call cost of the Python layer and of the
torch.library registration on tiny shapes, where the kernel itself costs almost nothing: each op
over the CPU path it dispatches to (`added us`, `over`), and int8_scaled_gemm's argument checks
alone: interleaved rounds of 1000 calls, each path's 20th percentile, and what it adds as the
median over rounds of the difference within a round. A third table times the compiled library's
calls (the quantiser, the epilogue after its `_int_mm`) on one thread, on threads each call starts,
and on a team of torch's OpenMP workers (what it runs on where torch's runtime gives one).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

import kernelhub.ops as ops
from kernelhub.kernels.int8_gemm import cpu, native
from kernelhub.kernels.int8_gemm import ops as int8_ops
from kernelhub.kernels.int8_gemm.cpu import cpu_int8_scaled_gemm, int_mm_cpu, quantize_int8_cpu, torch_epilogue
from kernelhub.kernels.int8_gemm.space import LLAMA3_8B

from harness import (BenchmarkParser, fixed, markdown_table, paired_difference_ms, percent_change, publish, ratio,
                     summarise_rounds, time_cpu_rounds, times)


def gemm_rows(ms: Sequence[int], reps: int) -> list[dict]:
    """Each shape's contenders in interleaved rounds (`time_cpu_rounds`): medians, and each epilogue's
    cost as the median over rounds of its time minus bare `_int_mm`'s, over `_int_mm`'s median."""
    rows, epilogue = [], cpu.default_epilogue()
    for layer, (n, k) in LLAMA3_8B.items():
        weight = torch.randn(n, k)
        q_weight, w_scale = ops.quantize_int8(weight)
        bias = torch.randn(n, dtype=torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k)
            q_x, x_scale = ops.quantize_int8(x)
            b = q_weight.t()
            w_t = weight.t()
            contenders = {
                "fp32": lambda: torch.matmul(x, w_t),
                "_int_mm": lambda: torch._int_mm(q_x, b),
                "int8_scaled_gemm": lambda: ops.int8_scaled_gemm(q_x, b, x_scale, w_scale, bias),
                "one pass": lambda: torch._int_mm(q_x, b).add_(1),
                "torch passes": lambda: cpu_int8_scaled_gemm(q_x, b, x_scale, w_scale, bias, torch.bfloat16, None,
                                                             torch_epilogue),
            }
            if 4 * m * n >= cpu._BLOCKED_MIN_BYTES:  # int8_scaled_gemm makes this product in blocks
                contenders["product whole"] = lambda: epilogue(int_mm_cpu(q_x, b), x_scale, w_scale, bias,
                                                               torch.bfloat16, None)
            samples = time_cpu_rounds(contenders, reps=reps)
            ms_of = {name: t.median_ms for name, t in summarise_rounds(samples).items()}
            cost = {name: paired_difference_ms(samples, name, "_int_mm") / ms_of["_int_mm"] for name in samples
                    if name not in ("fp32", "_int_mm")}
            rows.append({"layer": layer, "M": m, "N": n, "K": k, "fp32 ms": ms_of["fp32"],
                         "_int_mm ms": ms_of["_int_mm"], "int8_scaled_gemm ms": ms_of["int8_scaled_gemm"],
                         "epilogue": cost["int8_scaled_gemm"], "epilogue, torch passes": cost["torch passes"],
                         "epilogue, product whole": cost.get("product whole"), "one pass": cost["one pass"],
                         "vs fp32": ratio(ms_of["fp32"], ms_of["int8_scaled_gemm"])})
    return rows


def overhead_rows(reps: int) -> list[dict]:
    """Per-call microseconds on tiny operands (an [8, 64] @ [64, 8] GEMM, an [8, 64] quantisation),
    where the kernel itself costs almost nothing: each public op over the CPU path it dispatches
    to, that path over bare `torch._int_mm`, the registered torch.library op (which eager calls
    bypass), int8_scaled_gemm's layers one inside the other (its implementation over its CPU path,
    the compile-aware kernel op over the implementation), and its argument checks alone, the full
    ones and the acceptance of a common call at once (what the op runs:
    kernelhub/kernels/int8_gemm/ops.py)."""
    a = torch.randint(-128, 128, (8, 64), dtype=torch.int8)
    b = torch.randint(-128, 128, (8, 64), dtype=torch.int8).t()
    scale_a, scale_b, x = torch.rand(8), torch.rand(8), torch.randn(8, 64)
    scaled_args = (a, b, scale_a, scale_b, None, torch.float32)
    scaled_impl = int8_ops._int8_scaled_gemm.impl
    calls = 1000
    # (path, what the row's `added us` is over, the call)
    paths = [
        ("torch._int_mm (bare)", None, lambda: torch._int_mm(a, b)),
        ("int_mm_cpu (int8_gemm's CPU path)", "torch._int_mm (bare)", lambda: int_mm_cpu(a, b)),
        ("kernelhub.ops.int8_gemm", "int_mm_cpu (int8_gemm's CPU path)", lambda: ops.int8_gemm(a, b)),
        ("torch.ops.kernelhub.int8_gemm (registered op)", "int_mm_cpu (int8_gemm's CPU path)",
         lambda: torch.ops.kernelhub.int8_gemm(a, b)),
        ("cpu_int8_scaled_gemm (its CPU path)", None, lambda: cpu_int8_scaled_gemm(*scaled_args, None)),
        ("kernelhub.ops.int8_scaled_gemm", "cpu_int8_scaled_gemm (its CPU path)",
         lambda: ops.int8_scaled_gemm(*scaled_args)),
        # where int8_scaled_gemm's part goes: the implementation (backend choice, then the CPU path), the
        # compile-aware kernel op around it, and the public op (acceptance) around that
        ("int8_scaled_gemm's implementation", "cpu_int8_scaled_gemm (its CPU path)",
         lambda: scaled_impl(*scaled_args, None)),
        ("int8_scaled_gemm's kernel op", "int8_scaled_gemm's implementation",
         lambda: int8_ops._int8_scaled_gemm(*scaled_args, None)),
        ("int8_scaled_gemm's full checks alone", None, lambda: int8_ops._check_int8_scaled_gemm(*scaled_args, None)),
        ("int8_scaled_gemm's acceptance alone", None, lambda: int8_ops._accepts_scaled(*scaled_args)),
        ("quantize_int8_cpu (its CPU path)", None, lambda: quantize_int8_cpu(x)),
        ("kernelhub.ops.quantize_int8", "quantize_int8_cpu (its CPU path)", lambda: ops.quantize_int8(x)),
    ]

    def loop(fn):
        def run():
            for _ in range(calls):
                fn()
        return run

    # Microsecond loops on a shared VM move with the neighbours' load (bare `_int_mm` from 2 to 3.5
    # us between two runs): each path's time is its rounds' 20th percentile (the fast rounds move
    # least), and what it adds is the median of its time minus the other's in the same round.
    samples = time_cpu_rounds({name: loop(fn) for name, _, fn in paths}, reps=max(60, reps))
    us = {name: t.p20_ms * 1e3 / calls for name, t in summarise_rounds(samples).items()}
    return [{"path": name, "us per call": us[name], "over": over or "",
             "added us": None if over is None else paired_difference_ms(samples, name, over) * 1e3 / calls}
            for name, over, _ in paths]


def thread_rows(reps: int) -> list[dict]:
    """The compiled library's calls on each source of threads (kernelhub/kernels/int8_gemm/native.py):
    one thread, torch's number of threads started by the call, and a team of torch's own OpenMP
    workers; quantisations of [M, 4096] float32 rows, and epilogues right after the `_int_mm` whose
    product they read (the whole pair timed), in interleaved rounds, medians."""
    quantizer = native.quantizer()
    entries = native.openmp_entries()
    if quantizer is None or entries is None:
        return []
    threads, previous = torch.get_num_threads(), quantizer.team_entries
    sources = {"one thread": (None, 1), "threads started": (None, threads), "team": (entries, threads)}
    cases = []
    for m in (8, 64, 512, 2048):
        x = torch.randn(m, 4096)
        q, scale = torch.empty(m, 4096, dtype=torch.int8), torch.empty(m)
        cases.append((f"quantize_int8 [{m}, 4096]",
                      lambda split, x=x, q=q, scale=scale: quantizer.rows(x, q, scale, split)))
    for m, n, k in ((128, 6144, 4096), (512, 4096, 4096)):
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8).t()
        scale_a, scale_b, bias = torch.rand(m), torch.rand(n), torch.randn(n)

        def epilogue(split, a=a, b=b, scale_a=scale_a, scale_b=scale_b, bias=bias, shape=(m, n)):
            out = torch.empty(shape, dtype=torch.bfloat16)
            quantizer.dequantize_rows(torch._int_mm(a, b), scale_a, scale_b, bias, out, split)
        cases.append((f"_int_mm + epilogue [{m}, {k}] @ [{k}, {n}]", epilogue))
    rows = []
    try:
        for name, call in cases:
            def on(source, call=call):
                given, split = sources[source]
                return lambda: (quantizer.use_team_threads(given), call(split))
            samples = time_cpu_rounds({source: on(source) for source in sources}, reps=max(reps, 40))
            ms_of = {source: t.median_ms for source, t in summarise_rounds(samples).items()}
            rows.append({"call": name, **{f"{source} ms": ms_of[source] for source in sources},
                         "team vs one thread": ratio(ms_of["one thread"], ms_of["team"])})
    finally:
        quantizer.use_team_threads(previous)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser(__file__, __doc__, reps=15, quick={"ms": [16], "reps": 3})
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 128, 512, 2048])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    ms = fixed(3)
    gemm = markdown_table(gemm_rows(args.ms, args.reps),
                          ["layer", "M", "N", "K", "fp32 ms", "_int_mm ms", "int8_scaled_gemm ms", "epilogue",
                           "epilogue, torch passes", "epilogue, product whole", "one pass", "vs fp32"],
                          {"epilogue": percent_change, "epilogue, torch passes": percent_change,
                           "epilogue, product whole": percent_change, "one pass": percent_change, "vs fp32": times,
                           "fp32 ms": ms, "_int_mm ms": ms, "int8_scaled_gemm ms": ms})
    overhead = markdown_table(overhead_rows(args.reps), ["path", "us per call", "added us", "over"],
                              {"us per call": ms, "added us": ms})
    threads = markdown_table(thread_rows(args.reps),
                             ["call", "one thread ms", "threads started ms", "team ms", "team vs one thread"],
                             {"one thread ms": fixed(4), "threads started ms": fixed(4), "team ms": fixed(4),
                              "team vs one thread": times})
    publish(f"{gemm}\n\n{overhead}\n\n{threads}", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
