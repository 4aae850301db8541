"""`lowrank_keys` on the CPU against what a user picks instead: `torch.linalg.svd` (what ShadowKV
itself runs) and `torch.svd_lowrank`, on the same merged keys, with the error of each; both of its
methods, `gram="float32"` (the default) and `gram="int8"` (the Gram matrix of the int8 keys).

    python benchmarks/cpu_lowrank_keys.py --markdown benchmarks/results/cpu_lowrank_keys.md
    python benchmarks/cpu_lowrank_keys.py --quick          # S = 4096: checks the script works

Keys: B = 1, H_kv = 8, D = 128, float32 `[B, H_kv, S, D]` with a decaying spectrum
(`kernelhub.shadowkv.synthetic`'s keys: ShadowKV's observation that pre-RoPE keys are low rank), rank
160. `error`: ||K - A B|| / ||K|| of each factorisation over the merged `[S, H_kv * D]` keys; the
truncated SVD's is the optimum (Eckart-Young). `svd_lowrank` runs with q = rank and niter = 2
(torch's default), the setting whose cost is comparable. Medians of `--reps` calls, the SVD's too
(with no warm-up call): a single call of it varied by 1.3x between runs on the Xeon VM, enough to
move a ratio across 10x.

A second table says where lowrank_keys' time goes and what bounds it: its three steps alone (the
float32 Gram matrix's lower block triangle, `eigh` of it and `eigvalsh` alone (its tridiagonal
reduction: what a solver for the top eigenvectors only would still pay), the projection
`a = K V_r`), the int8 method's own steps (the per-channel quantisation: the scales, then each
chunk of tokens into one buffer; the int32 Gram of the chunks, and the full int32 `Q^T Q` in one
product for its rate; the projection from the unmerged keys), the full
`K^T K` product with float32 and with bfloat16 inputs (torch's CPU GEMM; bfloat16 pays only where the
CPU has AMX or AVX512-BF16 kernels that are faster than its float32 ones), and the error of the
factorisation from bfloat16 keys two ways: the Gram matrix accumulated and kept in float32 (what a
bfloat16 x bfloat16 -> float32 GEMM would give; torch's CPU matmul has none), and torch's bfloat16
matmul, which rounds the Gram matrix itself to bfloat16.
"""

from __future__ import annotations

import torch

import kernelhub.ops as ops
from kernelhub.kernels.int8_gemm.cpu import int_mm_cpu
from kernelhub.kernels.lowrank_keys import cpu as lowrank_cpu
from kernelhub.kernels.lowrank_keys.ops import _basis_from_gram, _merged_gram
from kernelhub.reference.lowrank_keys import merge_heads
from kernelhub.shadowkv.synthetic import make_synthetic_cache

from harness import BenchmarkParser, markdown_table, publish, ratio, time_cpu, times

H_KV, D, RANK = 8, 128, 160


def relative_error(merged: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    return float((merged - a @ b).norm() / merged.norm())


def run(seq: int, reps: int) -> dict:
    keys = make_synthetic_cache(1, H_KV, 32, seq, D, seed=0).k  # [1, H_kv, S, D] pre-RoPE
    merged = merge_heads(keys)[0].float()  # [S, H_kv * D]
    with torch.inference_mode():
        ours_s = time_cpu(lambda: ops.lowrank_keys(keys, RANK), reps=reps, warmup=1).median_ms / 1e3
        a, basis = ops.lowrank_keys(keys, RANK)
        int8_s = time_cpu(lambda: ops.lowrank_keys(keys, RANK, gram="int8"), reps=reps, warmup=1).median_ms / 1e3
        a_int8, basis_int8 = ops.lowrank_keys(keys, RANK, gram="int8")
        svd_s = time_cpu(lambda: torch.linalg.svd(merged, full_matrices=False), reps=reps, warmup=0).median_ms / 1e3
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
        randomized_s = time_cpu(lambda: torch.svd_lowrank(merged, q=RANK, niter=2), reps=reps, warmup=1).median_ms / 1e3
        u_r, s_r, v_r = torch.svd_lowrank(merged, q=RANK, niter=2)
    return {
        "S": seq, "lowrank_keys s": ours_s, "int8 Gram s": int8_s, "svd s": svd_s, "svd_lowrank s": randomized_s,
        "vs svd": ratio(svd_s, ours_s), "vs svd_lowrank": ratio(randomized_s, ours_s),
        "int8 vs svd": ratio(svd_s, int8_s), "int8 vs svd_lowrank": ratio(randomized_s, int8_s),
        "lowrank_keys error": relative_error(merged, a[0].float(), basis[0].float()),
        "int8 Gram error": relative_error(merged, a_int8[0].float(), basis_int8[0].float()),
        "svd error (optimum)": relative_error(merged, u[:, :RANK] * s[:RANK], vh[:RANK]),
        "svd_lowrank error": relative_error(merged, u_r * s_r, v_r.t()),
    }


def breakdown(seq: int, reps: int) -> dict:
    keys = make_synthetic_cache(1, H_KV, 32, seq, D, seed=0).k
    merged = merge_heads(keys).float()  # [1, S, H_kv * D]
    rounded = merged.to(torch.bfloat16)
    seconds = lambda fn: time_cpu(fn, reps=reps, warmup=1).median_ms / 1e3  # noqa: E731
    with torch.inference_mode():
        gram = _merged_gram(merged)
        basis = _basis_from_gram(gram, RANK, torch.float32)
        chunk = lowrank_cpu._TOKENS_PER_CHUNK
        buffer = torch.empty(chunk, H_KV * D, dtype=torch.int8)

        def quantise(into=None):  # the int8 method's quantisation: the scales, then every chunk
            scale = lowrank_cpu.channel_scales(keys)[0]
            for start in range(0, seq, chunk):
                out = buffer if into is None else into[start:start + chunk]
                lowrank_cpu.quantize_channels(keys[0, :, start:start + chunk], scale, out[:min(chunk, seq - start)])

        quantized = torch.empty(seq, H_KV * D, dtype=torch.int8)
        quantise(quantized)
        row = {"S": seq, "Gram (lower triangle) s": seconds(lambda: _merged_gram(merged)),
               "eigh s": seconds(lambda: torch.linalg.eigh(gram)),
               "eigvalsh s": seconds(lambda: torch.linalg.eigvalsh(gram)),
               "projection s": seconds(lambda: merged @ basis.transpose(1, 2)),
               "int8: quantisation s": seconds(quantise),
               "int8: Gram s": seconds(lambda: [lowrank_cpu._integer_gram(quantized[start:start + chunk])
                                                for start in range(0, seq, chunk)]),
               "int8: full Q^T Q s": seconds(lambda: int_mm_cpu(quantized.t(), quantized)),
               "int8: projection s": seconds(lambda: lowrank_cpu.project_heads(keys, basis)),
               "full K^T K float32 s": seconds(lambda: merged.transpose(1, 2) @ merged),
               "full K^T K bfloat16 s": seconds(lambda: rounded.transpose(1, 2) @ rounded)}
        for name, gram_of_keys in (("error, bfloat16 keys, float32 Gram", _merged_gram(rounded.float())),
                                   ("error, bfloat16 Gram (torch matmul)", _merged_gram(rounded).float())):
            top = _basis_from_gram(gram_of_keys, RANK, torch.float32)[0]
            row[name] = relative_error(merged[0], merged[0] @ top.t(), top)
    return row


def main(argv=None) -> None:
    parser = BenchmarkParser(__file__, __doc__, reps=3, quick={"seqs": [4096], "reps": 1})
    parser.add_argument("--seqs", type=int, nargs="+", default=[32768, 65536, 131072], help="tokens S")
    args = parser.parse_args(argv)
    rows = [run(seq, args.reps) for seq in args.seqs]
    steps = [breakdown(seq, args.reps) for seq in args.seqs]
    error = lambda v: f"{v:.4g}"  # noqa: E731
    text = "\n\n".join([
        f"lowrank_keys vs torch.linalg.svd and torch.svd_lowrank: B=1, H_kv={H_KV}, D={D}, rank {RANK}, float32",
        markdown_table(rows, ["S", "lowrank_keys s", "int8 Gram s", "svd s", "svd_lowrank s", "vs svd",
                              "vs svd_lowrank", "int8 vs svd", "int8 vs svd_lowrank", "lowrank_keys error",
                              "int8 Gram error", "svd error (optimum)", "svd_lowrank error"],
                       {"vs svd": times, "vs svd_lowrank": times, "int8 vs svd": times,
                        "int8 vs svd_lowrank": times, "lowrank_keys error": error, "int8 Gram error": error,
                        "svd error (optimum)": error, "svd_lowrank error": error}),
        "Where lowrank_keys' time goes, and the Gram product with bfloat16 inputs (the same keys)",
        markdown_table(steps, list(steps[0]), {name: error for name in steps[0] if name.startswith("error")}),
    ])
    publish(text, args)


if __name__ == "__main__":
    main()
