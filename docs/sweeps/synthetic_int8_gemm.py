"""Write docs/sweeps/synthetic-int8_gemm.json: an int8 GEMM sweep whose times come from a model, not a GPU.

No GPU has been available to this project, so the replay table in docs/tuning.md is computed on
this synthetic sweep. It uses the real int8_gemm search space, constraints, DEFAULTs and sweep
code (`run_sweep`); only the runner is replaced by `ModelRunner`, which returns a modelled time
instead of launching a kernel. Re-run the replay on a real sweep (`kernelhub sweep` on a GPU)
before trusting its conclusions.

The model is a rough roofline of an H100 SXM (132 SMs, 1979 int8 TOP/s dense, 3.35 TB/s, 50 MB
L2, 228 KB shared memory and 64 warps per SM), chosen to have the structure a real landscape has:

- work is split into tiles_m * tiles_n * SPLIT_K programs, run in waves over the SMs: a last,
  partly empty wave wastes time, and too few programs leave SMs idle;
- blocks per SM are limited by shared memory (num_stages * tile bytes), warps and registers (the
  int32 accumulator is BLOCK_M * BLOCK_N / (32 * num_warps) registers per thread);
- tensor-core efficiency falls for warp tiles far from 64 x 64, for BLOCK_M below 64 (Hopper's
  MMA is 64 rows tall) and for small BLOCK_K (loop overhead per K step);
- latency hiding grows with num_stages times resident blocks;
- DRAM traffic: A and B once while they fit in L2, else B is re-read for every GROUP_M row
  group of tiles; SPLIT_K > 1 writes and re-reads int32 partial sums and adds a reduction;
- bandwidth needs bytes in flight (Little's law): a memory-bound shape wants many programs and
  deep pipelines, which is where SPLIT_K helps a decode GEMM;
- time = max(compute, memory) + 15% of the smaller + launch overhead, times 1.5% log-normal
  noise fixed per (config, shape);
- a config is "failed" (out of shared memory at compile time) when its pipeline buffers plus an
  int32 epilogue tile (BLOCK_M * BLOCK_N * 4 bytes) exceed the 227 KB a block may use, a
  plausible way for the space's own shared-memory estimate to be too low.

Run from the repository root: `python docs/sweeps/synthetic_int8_gemm.py`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import zlib
from pathlib import Path

from kernelhub.device import DeviceIdentity
from kernelhub.kernels.int8_gemm.space import shared_memory
from kernelhub.kernels.int8_gemm.spec import SPEC
from kernelhub.tuning.sweep import run_sweep
from kernelhub.tuning.timing import Timing
from kernelhub.tuning.trial import TrialOutcome

OUTPUT = Path(__file__).with_name("synthetic-int8_gemm.json")
SHAPES = [(16, 4096, 4096), (32, 28672, 4096)]  # Llama-3-8B decode: attention output at 16 tokens, gate+up at 32
DTYPE = "bfloat16"

SMS = 132
PEAK_OPS = 1979e12  # int8 dense tensor-core ops per second
DRAM_BYTES_PER_S = 3.35e12
DRAM_LATENCY_S = 700e-9
L2_BYTES = 50 * 2**20
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 232448
REGS_PER_SM = 65536
WARPS_PER_SM = 64
LAUNCH_S = 3e-6
NOISE = 0.015

DEVICE = DeviceIdentity(
    key="synthetic-h100", name="synthetic model of an NVIDIA H100 SXM (no kernel ran)", vendor="nvidia",
    compute_capability="9.0", sm_count=SMS, memory_bytes=80 * 2**30, shared_memory_bytes=SMEM_PER_BLOCK,
    cuda_version=None, torch_version="n/a", triton_version=None,
)


def modelled_seconds(config: dict, shape: tuple[int, int, int], out_bytes: int) -> float:
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    group_m, split_k = config["GROUP_M"], config["SPLIT_K"]
    warps, stages = config["num_warps"], config["num_stages"]
    m, n, k = shape

    tiles_m, tiles_n = math.ceil(m / bm), math.ceil(n / bn)
    programs = tiles_m * tiles_n * split_k
    k_per_program = math.ceil(k / split_k)

    regs_per_thread = 32 + bm * bn / (32 * warps) + (bm * bk + bk * bn) / (4 * 32 * warps)
    blocks_per_sm = max(1, min(SMEM_PER_SM // shared_memory(config).bytes, WARPS_PER_SM // warps,
                               int(REGS_PER_SM // (regs_per_thread * 32 * warps))))
    resident = min(blocks_per_sm, math.ceil(programs / SMS))  # blocks sharing one SM at a time

    warp_tile = bm * bn / warps
    mma = (1 / (1 + 0.25 * abs(math.log2(warp_tile / 4096)))) * min(1.0, bm / 64) ** 0.5 * bk / (bk + 48)
    hidden = 1 - math.exp(-(stages - 1) * resident / 2)
    efficiency = mma * (0.55 + 0.45 * hidden)
    blocks_on_busiest_sm = math.ceil(programs / SMS)
    compute_s = blocks_on_busiest_sm * 2 * bm * bn * k_per_program / (PEAK_OPS / SMS * efficiency)

    a_bytes, b_bytes = m * k, k * n
    b_rereads = 1.0 if a_bytes + b_bytes <= L2_BYTES else max(1.0, tiles_m / group_m) ** 0.5
    partials = 0 if split_k == 1 else 2 * 4 * m * n * split_k  # int32 partial sums written, then read
    moved = a_bytes + b_bytes * b_rereads + out_bytes * m * n + partials
    in_flight = min(programs, SMS * blocks_per_sm) * (stages - 1) * (bm * bk + bk * bn)
    bandwidth = 0.9 * DRAM_BYTES_PER_S * min(1.0, in_flight / (DRAM_BYTES_PER_S * DRAM_LATENCY_S)) ** 0.7
    memory_s = moved / bandwidth

    reduction_s = 0 if split_k == 1 else 2e-6
    return max(compute_s, memory_s) + 0.15 * min(compute_s, memory_s) + LAUNCH_S + reduction_s


class ModelRunner:
    """A trial runner (tuning/trial.py) that returns the model's time; nothing is launched."""

    def run(self, spec, shape, dtype, config, seed) -> TrialOutcome:
        smem = shared_memory(config).bytes  # pipeline buffers or the epilogue's layout change, the larger
        if smem > SMEM_PER_BLOCK:
            return TrialOutcome("error", f"OutOfResources: shared memory, required: {smem}, hardware limit: "
                                          f"{SMEM_PER_BLOCK} (synthetic)")
        seconds = modelled_seconds(config, shape, out_bytes={"int32": 4, "float32": 4}.get(dtype, 2))
        # Noise fixed per (config, shape), so the file is the same on every run.
        rng = random.Random(zlib.crc32(repr((sorted(config.items()), shape)).encode()))
        median = seconds * 1e3 * math.exp(rng.gauss(0, NOISE))
        spread = median * abs(rng.gauss(0, NOISE))
        return TrialOutcome("complete", timing=Timing(*(float(f"{t:.5g}") for t in
                                                        (median, median - spread, median + spread))))

    def close(self) -> None:
        pass


def main() -> int:
    OUTPUT.unlink(missing_ok=True)  # a generated file: always rebuilt from scratch
    spec = dataclasses.replace(SPEC, shape_sets={**SPEC.shape_sets, "synthetic": SHAPES})
    run_sweep(spec, "synthetic", DTYPE, DEVICE, OUTPUT, runner=ModelRunner(), progress=lambda line: None,
              note="SYNTHETIC: times from the roofline model in docs/sweeps/synthetic_int8_gemm.py, "
                   "not from a GPU; re-run on a real `kernelhub sweep`")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
