"""Timing one launch: median and 20th/80th percentiles, after warm-up.

On a GPU, `triton.testing.do_bench` (it flushes the L2 cache between runs and synchronises).
Without one, a plain wall-clock loop: those numbers describe the Triton interpreter, not a
kernel, and are only good for testing the tuner's mechanics; they are never recorded under a
GPU key (see `Tuner`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def time_gpu(fn: Callable[[], object], *, warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(median, p20, p80)


def time_wall_clock(fn: Callable[[], object], *, warmup: int = 1, reps: int = 3) -> Timing:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    if len(samples) < 2:
        return Timing(samples[0], samples[0], samples[0])
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(statistics.median(samples), deciles[1], deciles[7])


def time_launch(fn: Callable[[], object], device: torch.device) -> Timing:
    return time_gpu(fn) if device.type == "cuda" else time_wall_clock(fn)


def time_collective(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 10) -> Timing:
    """Time a collective op on every rank of the default process group; every rank gets the same result.

    Every rank makes the same number of calls (an adaptive count such as `do_bench`'s could
    differ between ranks and leave one waiting for a peer that stopped), each call starts after a
    barrier, and each statistic is the slowest rank's: the op is as slow as its slowest rank.
    """
    import torch.distributed as dist

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    local = torch.tensor([statistics.median(samples), deciles[1], deciles[7]], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        local = local.to(device)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    median, p20, p80 = local.tolist()
    return Timing(median, p20, p80)
