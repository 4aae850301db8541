"""The CPU path of int8_scaled_gemm against fp32 torch.matmul and bare torch._int_mm.

    python benchmarks/cpu_int8.py                     # Llama-3-8B layers, M in 1, 16, 128, 512
    python benchmarks/cpu_int8.py --ms 1 128 --reps 20 --markdown benchmarks/results/cpu_int8.md
    python benchmarks/cpu_int8.py --quick             # M = 16, 3 reps: checks the script works

Each figure is the median over `--reps` runs after warm-up, all contenders measured in the same
process, interleaved per shape. `epilogue` is int8_scaled_gemm's time over bare `_int_mm` (the
cost of dequantising into bfloat16 with bias); `vs fp32` is fp32 matmul time over
int8_scaled_gemm time. A second table gives the per-call cost of the Python layer and of the
torch.library registration on a tiny shape, where the GEMM itself costs almost nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

import kernelhub.ops as ops
from kernelhub.kernels.int8_gemm.space import LLAMA3_8B

from harness import BenchmarkParser, fixed, markdown_table, percent_change, publish, ratio, time_cpu, times


def median_ms(fn: Callable[[], object], reps: int) -> float:
    return time_cpu(fn, reps=reps).median_ms


def gemm_rows(ms: Sequence[int], reps: int) -> list[dict]:
    rows = []
    for layer, (n, k) in LLAMA3_8B.items():
        weight = torch.randn(n, k)
        q_weight, w_scale = ops.quantize_int8(weight)
        bias = torch.randn(n, dtype=torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k)
            q_x, x_scale = ops.quantize_int8(x)
            b = q_weight.t()
            w_t = weight.t()
            fp32 = median_ms(lambda: torch.matmul(x, w_t), reps)
            int_mm = median_ms(lambda: torch._int_mm(q_x, b), reps)
            scaled = median_ms(lambda: ops.int8_scaled_gemm(q_x, b, x_scale, w_scale, bias), reps)
            rows.append({"layer": layer, "M": m, "N": n, "K": k, "fp32 ms": fp32, "_int_mm ms": int_mm,
                         "int8_scaled_gemm ms": scaled, "epilogue": scaled / int_mm - 1, "vs fp32": ratio(fp32, scaled)})
    return rows


def overhead_rows(reps: int) -> list[dict]:
    """Per-call microseconds on [8, 64] @ [64, 8]: what the Python layer and the registration add."""
    a = torch.randint(-128, 128, (8, 64), dtype=torch.int8)
    b = torch.randint(-128, 128, (8, 64), dtype=torch.int8).t()
    calls = 2000

    def per_call_us(fn):
        def loop():
            for _ in range(calls):
                fn()
        return median_ms(loop, max(3, reps // 4)) * 1e3 / calls

    bare = per_call_us(lambda: torch._int_mm(a, b))
    eager = per_call_us(lambda: ops.int8_gemm(a, b))
    dispatcher = per_call_us(lambda: torch.ops.kernelhub.int8_gemm(a, b))
    return [
        {"path": "torch._int_mm (bare)", "us per call": bare, "added us": 0.0},
        {"path": "kernelhub.ops.int8_gemm (eager: validate + dispatch)", "us per call": eager, "added us": eager - bare},
        {"path": "torch.ops.kernelhub.int8_gemm (registered op)", "us per call": dispatcher,
         "added us": dispatcher - bare},
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser(__file__, __doc__, reps=15, quick={"ms": [16], "reps": 3})
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 128, 512])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    ms = fixed(3)
    gemm = markdown_table(gemm_rows(args.ms, args.reps),
                          ["layer", "M", "N", "K", "fp32 ms", "_int_mm ms", "int8_scaled_gemm ms", "epilogue", "vs fp32"],
                          {"epilogue": percent_change, "vs fp32": times, "fp32 ms": ms, "_int_mm ms": ms,
                           "int8_scaled_gemm ms": ms})
    overhead = markdown_table(overhead_rows(args.reps), ["path", "us per call", "added us"],
                              {"us per call": ms, "added us": ms})
    publish(f"{gemm}\n\n{overhead}", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
