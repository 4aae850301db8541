"""int8 GEMM on a GPU: check, tune, then tuned vs DEFAULT vs torch._int_mm + dequant vs bf16 matmul.

    python benchmarks/gpu_int8.py                      # check + tune (bench shapes) + table
    python benchmarks/gpu_int8.py --skip-tune          # table with whatever is stored
    python benchmarks/gpu_int8.py --trials 60 --markdown benchmarks/results/h100_int8.md --json benchmarks/results/h100_int8.json
    python benchmarks/gpu_int8.py --quick              # smoke shapes, 4 trials: checks the script works

Every column is a median of `harness.time_cuda` (`triton.testing.do_bench`, or `--reps` calls
between CUDA events; L2 flushed before every call), in TOPS = the family's flops (2*M*N*K) / time.
The int8 columns include the dequantising epilogue into bfloat16 (no bias); the
`_int_mm + dequant` baseline is cuBLASLt's int8 GEMM followed by the same epilogue in PyTorch
(n/a where `torch._int_mm` refuses the shape: it needs M > 16 and K, N multiples of 8).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

from kernelhub import configs
from kernelhub.device import current_device, device_for_tensor
from kernelhub.kernels.loader import get_family

from harness import (CUDA_REPS_HELP, BenchmarkParser, Timer, check_and_tune, cuda_missing, cuda_timer, fixed,
                     markdown_table, publish, ratio, throughput, times, write_json)

SPEC = get_family("int8_gemm")
DTYPE = "bfloat16"
Shape = tuple[int, int, int]


def _int_mm_dequant(a, b, scale_a, scale_b) -> Callable[[], torch.Tensor] | None:
    m, k = a.shape
    n = b.shape[1]
    if a.is_cuda and (m <= 16 or k % 8 or n % 8):
        return None
    return lambda: (torch._int_mm(a, b).to(torch.float32) * scale_a[:, None] * scale_b[None, :]).to(torch.bfloat16)


def measure_row(shape: Shape, device, timer: Timer) -> dict:
    """TOPS of each contender at one shape (inputs from the family's own factory)."""
    m, n, k = shape
    inputs = dict(SPEC.make_inputs(shape, DTYPE, device, seed=0), bias=None)  # the baseline has no bias either
    a, b, scale_a, scale_b = inputs["a"], inputs["b"], inputs["scale_a"], inputs["scale_b"]
    out = SPEC.new_output(inputs)
    tuned = configs.best_config(SPEC, shape, DTYPE, device_for_tensor(a))
    default = SPEC.default_config(shape, DTYPE)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    contenders = {
        "tuned": lambda: SPEC.launch(inputs, tuned, out),
        "default": lambda: SPEC.launch(inputs, default, out),
        "int_mm+dequant": _int_mm_dequant(a, b, scale_a, scale_b),
        "bf16 matmul": lambda: x @ w.t(),  # the same 2*M*N*K operations
    }
    row = {"M": m, "N": n, "K": k, "tuned_config": tuned, "tuned_is_default": tuned == default}
    for name, fn in contenders.items():
        ms = timer(fn) if fn is not None else None
        row[f"{name} ms"] = ms
        row[f"{name} TOPS"] = throughput(SPEC, shape, DTYPE, ms).tflops if ms else None
    return row


CONTENDERS = ("tuned", "default", "int_mm+dequant", "bf16 matmul")


def format_table(rows: Sequence[dict]) -> str:
    """TOPS of every contender and the tuned config's speedup over the DEFAULT and over _int_mm."""
    for r in rows:
        r["tuned/default"] = ratio(r["default ms"], r["tuned ms"])
        r["tuned/int_mm"] = ratio(r["int_mm+dequant ms"], r["tuned ms"])
    tops = {f"{name} TOPS": fixed(1) for name in CONTENDERS}
    ratios = {name: times for name in ("tuned/default", "tuned/int_mm")}
    return markdown_table(rows, ["M", "N", "K", *tops, *ratios], {**tops, **ratios})


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser(__file__, __doc__, reps_help=CUDA_REPS_HELP, quick={"shapes": "smoke", "trials": 4})
    parser.add_tuning_options(trials=40)
    parser.add_argument("--shapes", default="bench", help="the family's shape set to tune and measure")
    parser.add_argument("--json", help="also write the rows and the device identity here")
    args = parser.parse_args(argv)
    if cuda_missing("gpu_int8.py", "kernelhub check covers the CPU"):
        return 2
    print(f"device: {current_device().to_dict()}")
    if check_and_tune([SPEC.name], args, shapes=args.shapes, dtype=DTYPE) != 0:
        return 1
    rows = [measure_row(shape, "cuda", cuda_timer(args.reps)) for shape in SPEC.shapes(args.shapes)]
    publish(format_table(rows), args)
    write_json(args.json, args, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
