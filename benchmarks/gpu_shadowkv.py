"""ShadowKV kernels on a GPU: each against its PyTorch reference in GB/s and as a share of the
measured memory bandwidth, then one decode step against dense SDPA at several batch sizes.

    python benchmarks/gpu_shadowkv.py                          # check + tune + tables
    python benchmarks/gpu_shadowkv.py --skip-tune --markdown benchmarks/results/h100_shadowkv.md
    python benchmarks/gpu_shadowkv.py --quick                  # smoke shapes, 4 trials, S = 4096, B = 1

Kernel rows use each family's `--shapes` set ("bench" by default) and its stored best config (run
`kernelhub tune` first, or let this script do it); the baseline is PyTorch on the same inputs
(`BASELINES`). GB/s = the family's `bytes_moved` / median time (`harness.time_cuda`:
`triton.testing.do_bench`, or `--reps` calls between CUDA events). The memory bandwidth is
measured here as a device-to-device copy of 2 GiB. Decode rows compare `ShadowKVCache.decode`
with `scaled_dot_product_attention` (GQA) over the full exact cache.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernelhub import configs
from kernelhub.device import device_for_tensor
from kernelhub.reference.rope import apply_rope, rope_tables
from kernelhub.kernels.loader import get_family
from kernelhub.shadowkv import ShadowKVCache
from kernelhub.shadowkv.synthetic import make_synthetic_cache

from harness import (CUDA_REPS_HELP, BenchmarkParser, Timer, check_and_tune, cuda_missing, cuda_timer, gbs,
                     markdown_table, publish, ratio, throughput, write_json)

KERNELS = ("lowrank_gram", "reconstruct_keys", "landmark_topk", "sparse_gather")


def _gram_fp32(inputs: dict) -> torch.Tensor:
    merged = inputs["k"].transpose(1, 2).flatten(2).to(torch.float32)  # [B, S, H_kv*D]
    return merged.transpose(1, 2) @ merged


# The PyTorch baseline of each kernel: its family reference, except where that reference is
# deliberately slow (the Gram reference sums in float64; cuBLAS float32 is the fair contender).
BASELINES = {"lowrank_gram": _gram_fp32}


def memory_bandwidth_gbs(timer: Timer, device="cuda", nbytes: int = 2**31) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return gbs(2 * src.numel(), timer(lambda: dst.copy_(src)))


def kernel_rows(bandwidth: float, dtype: str, shapes: str, timer: Timer, device="cuda") -> list[dict]:
    rows = []
    identity = device_for_tensor(torch.empty(0, device=device))
    for name in KERNELS:
        spec = get_family(name)
        for shape in spec.shapes(shapes):
            inputs = spec.make_inputs(shape, dtype, device, seed=0)
            out = spec.new_output(inputs)
            config = configs.best_config(spec, tuple(shape), dtype, identity)
            triton_ms = timer(lambda: spec.launch(inputs, config, out))
            baseline = BASELINES.get(name, spec.reference)
            torch_ms = timer(lambda: baseline(inputs))
            rate = throughput(spec, shape, dtype, triton_ms, peak_gbs=bandwidth)
            rows.append({"kernel": name, "shape": spec.format_shape(shape), "dtype": dtype,
                         "triton ms": triton_ms, "torch ms": torch_ms, "speedup": ratio(torch_ms, triton_ms),
                         "GB/s": rate.gbs, "of bandwidth": rate.of_peak_gbs, "config": config})
    return rows


def decode_row(seq: int, batch: int, timer: Timer, device="cuda") -> dict:
    """One decode step of ShadowKVCache vs SDPA over the full exact cache, at (S, B)."""
    synth = make_synthetic_cache(batch, 8, 32, seq, 128, steps=64, dtype=torch.bfloat16, device=device)
    cache = ShadowKVCache(device=device)
    cache.prefill(synth.k, synth.v)
    # The timer decides how many calls it makes: cycle through the planted queries (the cache
    # keeps growing by one token per call, as in real decoding).
    steps = itertools.cycle(range(synth.queries.shape[0]))

    def decode():
        t = next(steps)
        cache.decode(synth.queries[t], synth.new_k[t], synth.new_v[t])

    shadow_ms = timer(decode)
    cos, sin = rope_tables(seq + 1, 128, device=device)
    k_rope = apply_rope(synth.k, torch.arange(seq, device=device).expand(batch, 8, seq), cos, sin).to(torch.bfloat16)
    q = apply_rope(synth.queries[0], torch.full((batch, 32), seq, device=device), cos, sin)
    q = q.to(torch.bfloat16)[:, :, None]
    dense_ms = timer(lambda: F.scaled_dot_product_attention(q, k_rope, synth.v, enable_gqa=True))
    return {"S": seq, "B": batch, "shadowkv decode ms": shadow_ms, "dense SDPA ms": dense_ms,
            "speedup": ratio(dense_ms, shadow_ms), "resident GB": cache.resident_bytes() / 1e9,
            "full KV GB": 2 * synth.k.numel() * synth.k.element_size() / 1e9}


def decode_rows(seq: int, batches: Sequence[int], timer: Timer) -> list[dict]:
    rows = []
    for batch in batches:
        rows.append(decode_row(seq, batch, timer))  # its caches are freed on return
        torch.cuda.empty_cache()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser(__file__, __doc__, reps_help=CUDA_REPS_HELP,
                             quick={"shapes": "smoke", "trials": 4, "seq": 4096, "batches": [1]})
    parser.add_tuning_options(trials=30)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shapes", default="bench", help="the families' shape set to tune and measure")
    parser.add_argument("--seq", type=int, default=32768, help="context length of the decode rows")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", help="also write every row and the device identity here")
    args = parser.parse_args(argv)
    if cuda_missing("gpu_shadowkv.py", "kernelhub check covers the CPU"):
        return 2
    if check_and_tune(KERNELS, args, shapes=args.shapes, dtype=args.dtype) != 0:
        return 1
    timer = cuda_timer(args.reps)
    bandwidth = memory_bandwidth_gbs(timer)
    kernels = kernel_rows(bandwidth, args.dtype, args.shapes, timer)
    decodes = decode_rows(args.seq, args.batches, timer)
    publish("\n\n".join([
        f"Measured copy bandwidth {bandwidth:.0f} GB/s.",
        markdown_table(kernels, ["kernel", "shape", "dtype", "triton ms", "torch ms", "speedup", "GB/s", "of bandwidth"]),
        markdown_table(decodes, ["S", "B", "shadowkv decode ms", "dense SDPA ms", "speedup", "resident GB", "full KV GB"]),
    ]), args)
    write_json(args.json, args, bandwidth_gbs=bandwidth, kernels=kernels, decode=decodes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
