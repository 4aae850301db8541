"""int8 GEMM on a GPU: check, tune, then tuned vs DEFAULT vs torch._int_mm + dequant vs bf16 matmul.

    python benchmarks/gpu_int8.py                      # check + tune (bench shapes) + table
    python benchmarks/gpu_int8.py --skip-tune          # table with whatever is stored
    python benchmarks/gpu_int8.py --trials 60 --json benchmarks/results/h100_int8.json

Every column is the median of `triton.testing.do_bench` (warm-up, L2 flushed between runs), in
TOPS = 2*M*N*K / time. The int8 columns include the dequantising epilogue into bfloat16; the
`_int_mm + dequant` baseline is cuBLASLt's int8 GEMM followed by the same epilogue in PyTorch
(n/a where `torch._int_mm` refuses the shape: it needs M > 16 and K, N multiples of 8).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable, Sequence

import torch

from kernelhub import cli, configs
from kernelhub.device import current_device, device_for_tensor
from kernelhub.kernels.int8_gemm import SPEC
from kernelhub.kernels.int8_gemm.kernel import int8_gemm_triton

from report import markdown_table  # noqa: E402  (benchmarks/report.py)

Shape = tuple[int, int, int]
Timer = Callable[[Callable[[], object]], float]  # returns median milliseconds


def do_bench_median(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _int_mm_dequant(a, b, scale_a, scale_b) -> Callable[[], torch.Tensor] | None:
    m, k = a.shape
    n = b.shape[1]
    if a.is_cuda and (m <= 16 or k % 8 or n % 8):
        return None
    return lambda: (torch._int_mm(a, b).to(torch.float32) * scale_a[:, None] * scale_b[None, :]).to(torch.bfloat16)


def measure_row(shape: Shape, device, timer: Timer) -> dict:
    """TOPS of each contender at one shape (inputs from the family's own factory)."""
    m, n, k = shape
    inputs = SPEC.make_inputs(shape, "bfloat16", device, seed=0)
    a, b, scale_a, scale_b = inputs["a"], inputs["b"], inputs["scale_a"], inputs["scale_b"]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    tuned = configs.best_config(SPEC, shape, "bfloat16", device_for_tensor(a))
    default = SPEC.default_config(shape, "bfloat16")

    def run(config):
        return lambda: int8_gemm_triton(a, b, config=config, out=out, scale_a=scale_a, scale_b=scale_b)

    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    contenders = {
        "tuned": run(tuned),
        "default": run(default),
        "int_mm+dequant": _int_mm_dequant(a, b, scale_a, scale_b),
        "bf16 matmul": lambda: x @ w.t(),
    }
    ops = 2 * m * n * k
    row = {"M": m, "N": n, "K": k, "tuned_config": tuned, "tuned_is_default": tuned == default}
    for name, fn in contenders.items():
        ms = timer(fn) if fn is not None else None
        row[f"{name} ms"] = ms
        row[f"{name} TOPS"] = ops / (ms * 1e-3) / 1e12 if ms else None
    return row


CONTENDERS = ("tuned", "default", "int_mm+dequant", "bf16 matmul")


def format_table(rows: Sequence[dict]) -> str:
    """TOPS of every contender and the tuned config's speedup over the DEFAULT and over _int_mm."""
    for r in rows:
        r["tuned/default"] = r["default ms"] / r["tuned ms"]
        r["tuned/int_mm"] = r["int_mm+dequant ms"] / r["tuned ms"] if r["int_mm+dequant ms"] else None
    tops = {f"{name} TOPS": "{:.1f}".format for name in CONTENDERS}
    ratios = {name: "{:.2f}x".format for name in ("tuned/default", "tuned/int_mm")}
    return markdown_table(rows, ["M", "N", "K", *tops, *ratios], {**tops, **ratios})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-tune", action="store_true")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--shapes", default="bench")
    parser.add_argument("--json", help="write the rows and the device identity here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_int8.py needs a CUDA GPU (kernelhub check covers the CPU).", file=sys.stderr)
        return 2
    identity = current_device()
    print(f"device: {identity.to_dict()}")
    if not args.skip_check and cli.main(["check", "--kernel", SPEC.name]) != 0:
        return 1
    if not args.skip_tune:
        cli.main(["tune", "--kernel", SPEC.name, "--shapes", args.shapes, "--dtype", "bfloat16",
                  "--trials", str(args.trials)])
    configs.clear_cache()
    rows = [measure_row(shape, "cuda", do_bench_median) for shape in SPEC.shapes(args.shapes)]
    table = format_table(rows)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": identity.to_dict(), "python": platform.python_version(),
                       "command": "python benchmarks/gpu_int8.py " + " ".join(argv or sys.argv[1:]),
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
