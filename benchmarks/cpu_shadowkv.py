"""ShadowKV on the CPU: decode step vs dense SDPA, memory, lowrank_keys vs SVD, and fidelity.

    python benchmarks/cpu_shadowkv.py                                  # S = 32K and 128K
    python benchmarks/cpu_shadowkv.py --seqs 32768 --markdown benchmarks/results/cpu_shadowkv.md
    python benchmarks/cpu_shadowkv.py --quick                          # S = 4096, 3 reps

Shapes: B = 1 (`--batch`), H_q = 32, H_kv = 8, D = 128, float32, ShadowKV's defaults (rank 160, chunks of 8,
budget 2048, 48 outlier chunks, 32 local tokens), caches from `kernelhub.shadowkv.synthetic`.
- decode: median time of one `ShadowKVCache.decode` step against
  `scaled_dot_product_attention` (GQA) over the full exact post-RoPE cache (the baseline does no
  RoPE or cache update work: it is given the ready cache);
- memory: resident bytes of the ShadowKV cache against the full K and V cache;
- lowrank_keys against `torch.linalg.svd` (full_matrices=False) of the same merged key matrix;
- fidelity of the measured decode step (`kernelhub.shadowkv.fidelity`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import kernelhub.ops as ops
from kernelhub.reference.rope import apply_rope, rope_tables
from kernelhub.shadowkv import ShadowKVCache
from kernelhub.shadowkv.fidelity import decode_fidelity
from kernelhub.shadowkv.synthetic import make_synthetic_cache

from harness import BenchmarkParser, markdown_table, publish, ratio, time_cpu

H_Q, H_KV, D = 32, 8, 128


def run(seq: int, reps: int, svd: bool, batch: int = 1) -> dict:
    B = batch
    synth = make_synthetic_cache(B, H_KV, H_Q, seq, D, steps=reps + 2, seed=seq)
    cache = ShadowKVCache()
    start = time.perf_counter()
    cache.prefill(synth.k, synth.v)
    prefill_s = time.perf_counter() - start

    step = iter(range(reps + 2))

    def decode():
        t = next(step)
        cache.decode(synth.queries[t], synth.new_k[t], synth.new_v[t])

    decode_ms = time_cpu(decode, warmup=2, reps=reps).median_ms

    cos, sin = rope_tables(seq + 1, D)
    k_rope = apply_rope(synth.k, torch.arange(seq).expand(B, H_KV, seq), cos, sin)
    q_rope = apply_rope(synth.queries[0], torch.full((B, H_Q), seq), cos, sin)[:, :, None]  # [B, H_q, 1, D]
    dense_ms = time_cpu(lambda: F.scaled_dot_product_attention(q_rope, k_rope, synth.v, enable_gqa=True),
                        warmup=2, reps=reps).median_ms

    merged = synth.k.transpose(1, 2).reshape(B, seq, H_KV * D)
    lowrank_s = time_cpu(lambda: ops.lowrank_keys(synth.k, 160), warmup=0, reps=1).median_ms / 1e3
    svd_s = (time_cpu(lambda: torch.linalg.svd(merged, full_matrices=False), warmup=0, reps=1).median_ms / 1e3
             if svd else None)

    fidelity = decode_fidelity(ShadowKVCache(), synth.k, synth.v, synth.queries[:1], synth.new_k[:1],
                               synth.new_v[:1], needles=synth.needles)
    full_kv = 2 * synth.k.numel() * synth.k.element_size()
    return {"B": batch, "S": seq, "prefill s": prefill_s, "decode ms": decode_ms, "dense SDPA ms": dense_ms,
            "speedup": ratio(dense_ms, decode_ms), "resident MB": cache.resident_bytes() / 2**20,
            "full KV MB": full_kv / 2**20, "memory ratio": ratio(full_kv, cache.resident_bytes()),
            "offloaded MB": cache.offloaded_bytes() / 2**20, "lowrank_keys s": lowrank_s, "svd s": svd_s,
            **fidelity}


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchmarkParser(__file__, __doc__, reps=10, quick={"seqs": [4096], "reps": 3})
    parser.add_argument("--seqs", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--no-svd", action="store_true", help="skip the torch.linalg.svd baseline (slow)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes B (default 1)")
    args = parser.parse_args(argv)
    rows = [run(seq, args.reps, not args.no_svd, batch) for batch in args.batch for seq in args.seqs]
    publish("\n\n".join([
        f"H_q={H_Q}, H_kv={H_KV}, D={D}, float32",
        markdown_table(rows, ["B", "S", "decode ms", "dense SDPA ms", "speedup", "resident MB", "full KV MB", "memory ratio",
                     "offloaded MB", "prefill s"]),
        markdown_table(rows, ["B", "S", "lowrank_keys s", "svd s"]),
        markdown_table(rows, ["B", "S", "key_rel_error", "oracle_recall", "mass_covered", "output_rel_error", "needles_found"]),
    ]), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
