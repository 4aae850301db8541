"""ShadowKV kernels on a GPU: each against its PyTorch reference in GB/s and as a share of the
measured memory bandwidth, then one decode step against dense SDPA at several batch sizes.

    python benchmarks/gpu_shadowkv.py                          # check + tune + tables
    python benchmarks/gpu_shadowkv.py --skip-tune --json benchmarks/results/h100_shadowkv.json

Kernel rows use each family's "bench" shapes and its stored best config (run `kernelhub tune`
first, or let this script do it); the baseline is PyTorch on the same inputs (`BASELINES`). GB/s = the family's `bytes_moved` / median time (`triton.testing.do_bench`). The memory
bandwidth is measured here as a device-to-device copy of 2 GiB. Decode rows compare
`ShadowKVCache.decode` with `scaled_dot_product_attention` (GQA) over the full exact cache.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernelhub import cli, configs
from kernelhub.device import current_device
from kernelhub.reference.rope import apply_rope, rope_tables
from kernelhub.registry import get_family
from kernelhub.shadowkv import ShadowKVCache
from kernelhub.shadowkv.synthetic import make_synthetic_cache

from report import markdown_table  # noqa: E402  (benchmarks/report.py)

KERNELS = ("lowrank_gram", "reconstruct_keys", "landmark_topk", "sparse_gather")


def _gram_fp32(inputs: dict) -> torch.Tensor:
    merged = inputs["k"].transpose(1, 2).flatten(2).to(torch.float32)  # [B, S, H_kv*D]
    return merged.transpose(1, 2) @ merged


# The PyTorch baseline of each kernel: its family reference, except where that reference is
# deliberately slow (the Gram reference sums in float64; cuBLAS float32 is the fair contender).
BASELINES = {"lowrank_gram": _gram_fp32}


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def memory_bandwidth_gbs() -> float:
    src = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (median_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def kernel_rows(bandwidth: float, dtype: str) -> list[dict]:
    rows = []
    identity = current_device()
    for name in KERNELS:
        spec = get_family(name)
        for shape in spec.shapes("bench"):
            inputs = spec.make_inputs(shape, dtype, "cuda", seed=0)
            out = spec.new_output(inputs)
            config = configs.best_config(spec, tuple(shape), dtype, identity)
            triton_ms = median_ms(lambda: spec.launch(inputs, config, out))
            baseline = BASELINES.get(name, spec.reference)
            torch_ms = median_ms(lambda: baseline(inputs))
            gbs = spec.bytes_moved(shape, dtype) / (triton_ms * 1e-3) / 1e9
            rows.append({"kernel": name, "shape": spec.format_shape(shape), "dtype": dtype,
                         "triton ms": triton_ms, "torch ms": torch_ms, "speedup": torch_ms / triton_ms,
                         "GB/s": gbs, "of bandwidth": gbs / bandwidth, "config": config})
    return rows


def decode_row(seq: int, batch: int) -> dict:
    """One decode step of ShadowKVCache vs SDPA over the full exact cache, at (S, B)."""
    synth = make_synthetic_cache(batch, 8, 32, seq, 128, steps=64, dtype=torch.bfloat16, device="cuda")
    cache = ShadowKVCache(device="cuda")
    cache.prefill(synth.k, synth.v)
    # do_bench decides how many calls it makes: cycle through the planted queries (the cache
    # keeps growing by one token per call, as in real decoding).
    steps = itertools.cycle(range(synth.queries.shape[0]))

    def decode():
        t = next(steps)
        cache.decode(synth.queries[t], synth.new_k[t], synth.new_v[t])

    shadow_ms = median_ms(decode)
    cos, sin = rope_tables(seq + 1, 128, device="cuda")
    k_rope = apply_rope(synth.k, torch.arange(seq, device="cuda").expand(batch, 8, seq), cos, sin).to(torch.bfloat16)
    q = apply_rope(synth.queries[0], torch.full((batch, 32), seq, device="cuda"), cos, sin)
    q = q.to(torch.bfloat16)[:, :, None]
    dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k_rope, synth.v, enable_gqa=True))
    return {"S": seq, "B": batch, "shadowkv decode ms": shadow_ms, "dense SDPA ms": dense_ms,
            "speedup": dense_ms / shadow_ms, "resident GB": cache.resident_bytes() / 1e9,
            "full KV GB": 2 * synth.k.numel() * synth.k.element_size() / 1e9}


def decode_rows(seq: int, batches: Sequence[int]) -> list[dict]:
    rows = []
    for batch in batches:
        rows.append(decode_row(seq, batch))  # its caches are freed on return
        torch.cuda.empty_cache()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-tune", action="store_true")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seq", type=int, default=32768, help="context length of the decode rows")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", help="write every row and the device identity here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_shadowkv.py needs a CUDA GPU (kernelhub check covers the CPU).", file=sys.stderr)
        return 2
    kernel_args = [arg for name in KERNELS for arg in ("--kernel", name)]
    if not args.skip_check and cli.main(["check", *kernel_args]) != 0:
        return 1
    if not args.skip_tune:
        cli.main(["tune", *kernel_args, "--shapes", "bench", "--dtype", args.dtype, "--trials", str(args.trials)])
    configs.clear_cache()
    bandwidth = memory_bandwidth_gbs()
    kernels = kernel_rows(bandwidth, args.dtype)
    decodes = decode_rows(args.seq, args.batches)
    print(f"device: {current_device().describe()}, measured copy bandwidth {bandwidth:.0f} GB/s")
    print(markdown_table(kernels, ["kernel", "shape", "dtype", "triton ms", "torch ms", "speedup", "GB/s", "of bandwidth"]))
    print(markdown_table(decodes, ["S", "B", "shadowkv decode ms", "dense SDPA ms", "speedup", "resident GB", "full KV GB"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": current_device().to_dict(), "bandwidth_gbs": bandwidth, "kernels": kernels,
                       "decode": decodes, "command": "python benchmarks/gpu_shadowkv.py " + " ".join(argv or sys.argv[1:])},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
