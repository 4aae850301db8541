"""Tensor-parallel overlap on GPUs: the CPU script's table over NCCL, and the Triton chunk GEMM alone.

    python benchmarks/gpu_tp_overlap.py                         # every part this machine can run
    python benchmarks/gpu_tp_overlap.py --json benchmarks/results/h100_tp_overlap.json

With W >= 2 GPUs: benchmarks/cpu_tp_overlap.py's table (T_gemm, T_comm, T_p2p, T_sequential,
T_overlapped, E) at the Llama-3-70B TP=W layer shapes, one rank per GPU (nccl). With one GPU, the
single-rank parts only: the Triton chunk GEMM (tp_gemm, stored config or DEFAULT) against bf16
torch.matmul (cuBLAS) at the chunk shapes (`tp_gemm` bench set), in TFLOP/s (do_bench medians),
and the ops at world size 1. This script has not run on a GPU yet (no GPU was available when it
was written); its results go beside this file with the device identity.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from kernelhub import configs
from kernelhub.device import current_device, device_for_tensor
from kernelhub.kernels.tp_overlap import GEMM_SPEC, space
from kernelhub.kernels.tp_overlap.kernel import gemm_triton
from kernelhub.local_world import LocalWorld

from cpu_tp_overlap import measure_shape  # noqa: E402  (benchmarks/cpu_tp_overlap.py)
from report import markdown_table  # noqa: E402  (benchmarks/report.py)


def chunk_gemm_rows(dtype: str) -> list[dict]:
    import triton.testing

    rows = []
    identity = device_for_tensor(torch.empty(0, device="cuda"))
    for shape in GEMM_SPEC.shapes("bench"):
        inputs = GEMM_SPEC.make_inputs(shape, dtype, "cuda", seed=0)
        a, b = inputs["a"], inputs["b"]
        out = GEMM_SPEC.new_output(inputs)
        config = configs.best_config(GEMM_SPEC, shape, dtype, identity)
        problem = GEMM_SPEC.compare(gemm_triton(a, b, config=config, out=out), GEMM_SPEC.reference(inputs), inputs)
        if problem:
            raise SystemExit(f"tp_gemm {shape} {config}: {problem}")
        bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
        triton_ms = bench(lambda: gemm_triton(a, b, config=config, out=out))
        torch_ms = bench(lambda: torch.matmul(a, b, out=out))
        tflops = lambda ms: GEMM_SPEC.flops(shape) / ms / 1e9  # noqa: E731
        rows.append({"M": shape[0], "N": shape[1], "K": shape[2], "dtype": dtype,
                     "config": " ".join(f"{k}={v}" for k, v in config.items()),
                     "triton TFLOP/s": tflops(triton_ms), "torch.matmul TFLOP/s": tflops(torch_ms),
                     "triton / torch": torch_ms / triton_ms})
    return rows


def collective_rows(world: int, dtype: str, reps: int) -> list[dict]:
    rows = []
    with LocalWorld(world, backend="nccl", threads=None, job_timeout_s=1800) as ranks:
        for spec_shapes in (space.AG_SHAPE_SETS["bench"], space.RS_SHAPE_SETS["bench"]):
            for _, r, n, k in spec_shapes:
                op = "all_gather_gemm" if spec_shapes is space.AG_SHAPE_SETS["bench"] else "gemm_reduce_scatter"
                rows_arg = r * 8 // world if op == "all_gather_gemm" else r  # same tokens at any W
                rows.append(ranks.run(measure_shape, op, rows_arg, n, k, dtype, reps,
                                      list(space.CHUNK_CHOICES), "cuda")[0])
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=space.DTYPES)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--json", help="also write the raw rows and the device identity here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no GPU: run benchmarks/cpu_tp_overlap.py instead")
    identity = current_device()
    gemm = chunk_gemm_rows(args.dtype)
    print(f"Device: {identity.describe()}\n")
    print(markdown_table(gemm, list(gemm[0]), {"triton / torch": lambda v: f"{v:.2f}x"}))
    world = torch.cuda.device_count()
    overlapped = collective_rows(world, args.dtype, args.reps) if world >= 2 else []
    if overlapped:
        print("\n" + markdown_table(overlapped, list(overlapped[0])))
    else:
        print("\none GPU: the overlapped collectives need at least two (nccl, one rank per GPU)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": identity.to_dict(), "tp_gemm": gemm, "collectives": overlapped}, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
