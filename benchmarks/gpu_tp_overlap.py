"""Tensor-parallel overlap on GPUs: the CPU script's table over NCCL, and the Triton chunk GEMM alone.

    python benchmarks/gpu_tp_overlap.py                         # every part this machine can run
    python benchmarks/gpu_tp_overlap.py --markdown benchmarks/results/h100_tp_overlap.md --json benchmarks/results/h100_tp_overlap.json
    python benchmarks/gpu_tp_overlap.py --quick                 # smoke shapes, 5 reps: checks the script works

With W >= 2 GPUs: benchmarks/cpu_tp_overlap.py's table (T_gemm, T_comm, T_p2p, T_sequential,
T_overlapped, E) at the Llama-3-70B TP=W layer shapes, one rank per GPU (nccl), each figure the
slowest rank's median over `--reps` calls. With one GPU, the single-rank parts only: the Triton
chunk GEMM (tp_gemm, stored config or DEFAULT) against bf16 torch.matmul (cuBLAS) at the chunk
shapes (`tp_gemm` bench set), in TFLOP/s from the family's flops (`triton.testing.do_bench`
medians), and the ops at world size 1. This script has not run on a GPU yet (no GPU was available
when it was written); its results go beside this file with the device identity.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from kernelhub import configs
from kernelhub.device import device_for_tensor
from kernelhub.kernels.loader import get_family
from kernelhub.local_world import LocalWorld

from cpu_tp_overlap import measure_shape
from harness import (BenchmarkParser, Timer, cuda_missing, cuda_timer, markdown_table, publish, ratio, throughput, times,
                     write_json)

GEMM_SPEC = get_family("tp_gemm")
COLLECTIVES = ("all_gather_gemm", "gemm_reduce_scatter")


def chunk_gemm_rows(dtype: str, shapes: str, timer: Timer, device="cuda") -> list[dict]:
    rows = []
    identity = device_for_tensor(torch.empty(0, device=device))
    for shape in GEMM_SPEC.shapes(shapes):
        inputs = GEMM_SPEC.make_inputs(shape, dtype, device, seed=0)
        a, b = inputs["a"], inputs["b"]
        out = GEMM_SPEC.new_output(inputs)
        config = configs.best_config(GEMM_SPEC, shape, dtype, identity)
        problem = GEMM_SPEC.compare(GEMM_SPEC.launch(inputs, config, out), GEMM_SPEC.reference(inputs), inputs)
        if problem:
            raise SystemExit(f"tp_gemm {shape} {config}: {problem}")
        triton_ms = timer(lambda: GEMM_SPEC.launch(inputs, config, out))
        torch_ms = timer(lambda: torch.matmul(a, b, out=out))
        rows.append({"M": shape[0], "N": shape[1], "K": shape[2], "dtype": dtype,
                     "config": " ".join(f"{k}={v}" for k, v in config.items()),
                     "triton TFLOP/s": throughput(GEMM_SPEC, shape, dtype, triton_ms).tflops,
                     "torch.matmul TFLOP/s": throughput(GEMM_SPEC, shape, dtype, torch_ms).tflops,
                     "triton / torch": ratio(torch_ms, triton_ms)})
    return rows


def collective_rows(world: int, dtype: str, reps: int, shapes: str) -> list[dict]:
    rows = []
    with LocalWorld(world, backend="nccl", threads=None, job_timeout_s=1800) as ranks:
        for op in COLLECTIVES:
            spec = get_family(op)
            for w, r, n, k in spec.shapes(shapes):
                rows_arg = r * w // world if op == "all_gather_gemm" else r  # same tokens at any W
                rows.append(ranks.run(measure_shape, op, rows_arg, n, k, dtype, reps,
                                      list(spec.space.params["CHUNKS"]), "cuda")[0])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser(__file__, __doc__, reps=50, reps_help="calls per collective figure (default 50; "
                             "the chunk GEMM rows use triton.testing.do_bench)", quick={"shapes": "smoke", "reps": 5})
    parser.add_argument("--dtype", default="bfloat16", choices=GEMM_SPEC.dtypes)
    parser.add_argument("--shapes", default="bench", help="the families' shape set")
    parser.add_argument("--json", help="also write the raw rows and the device identity here")
    args = parser.parse_args(argv)
    if cuda_missing("gpu_tp_overlap.py", "run benchmarks/cpu_tp_overlap.py instead"):
        return 2
    gemm = chunk_gemm_rows(args.dtype, args.shapes, cuda_timer(None))
    sections = [markdown_table(gemm, list(gemm[0]), {"triton / torch": times})]
    world = torch.cuda.device_count()
    overlapped = collective_rows(world, args.dtype, args.reps, args.shapes) if world >= 2 else []
    if overlapped:
        sections.append(markdown_table(overlapped, list(overlapped[0])))
    else:
        sections.append("One GPU: the overlapped collectives need at least two (nccl, one rank per GPU).")
    publish("\n\n".join(sections), args)
    write_json(args.json, args, tp_gemm=gemm, collectives=overlapped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
