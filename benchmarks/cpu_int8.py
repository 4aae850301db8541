"""The CPU path of int8_scaled_gemm against fp32 torch.matmul and bare torch._int_mm.

    python benchmarks/cpu_int8.py                     # Llama-3-8B layers, M in 1, 16, 128, 512
    python benchmarks/cpu_int8.py --ms 1 128 --reps 20 --markdown benchmarks/results/cpu_int8.md

Each figure is the median over `--reps` runs after warm-up, all contenders measured in the same
process, interleaved per shape. `epilogue` is int8_scaled_gemm's time over bare `_int_mm` (the
cost of dequantising into bfloat16 with bias); `vs fp32` is fp32 matmul time over
int8_scaled_gemm time. A second table gives the per-call cost of the Python layer and of the
torch.library registration on a tiny shape, where the GEMM itself costs almost nothing.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence

import torch

import kernelhub.ops as ops
from kernelhub.kernels.int8_gemm.space import LLAMA3_8B
from kernelhub.tuning.timing import time_wall_clock

from report import markdown_table, publish  # noqa: E402  (benchmarks/report.py)


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    return time_wall_clock(fn, warmup=warmup, reps=reps).median_ms


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
                         "int8_scaled_gemm ms": scaled, "epilogue": scaled / int_mm - 1, "vs fp32": fp32 / scaled})
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    header = (f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
              f"torch {torch.__version__}; python {platform.python_version()}")
    gemm = markdown_table(gemm_rows(args.ms, args.reps),
                          ["layer", "M", "N", "K", "fp32 ms", "_int_mm ms", "int8_scaled_gemm ms", "epilogue", "vs fp32"],
                          {"epilogue": lambda v: f"{v * 100:+.1f}%", "vs fp32": lambda v: f"{v:.2f}x",
                           **{c: "{:.3f}".format for c in ("fp32 ms", "_int_mm ms", "int8_scaled_gemm ms")}})
    overhead = markdown_table(overhead_rows(args.reps), ["path", "us per call", "added us"],
                              {"us per call": "{:.3f}".format, "added us": "{:.3f}".format})
    text = f"{header}\n\n{gemm}\n\n{overhead}\n"
    publish(text, "cpu_int8.py", argv if argv is not None else sys.argv[1:], args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
