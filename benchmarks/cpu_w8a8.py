"""W8A8 on the CPU against what a CPU user picks instead: a kernelhub `Int8Linear` against torch.ao's
dynamic int8 Linear (`quantize_dynamic`), and `quantize_int8` against the plain torch expression.

    python benchmarks/cpu_w8a8.py --markdown benchmarks/results/cpu_w8a8.md --json benchmarks/results/cpu_w8a8.json
    python benchmarks/cpu_w8a8.py --quick             # one layer, M = 1 and 96: checks the script works

Linear: every linear shape of Llama-3-8B and Qwen2-7B (qkv and gate_up fused), random weights, at M
tokens; the layer's whole call (quantise the activations, int8 GEMM, scales and bias) against
torch.ao's (which quantises per tensor; kernelhub per token); `GEMM alone`: the prepacked GEMM the
layer calls (fbgemm's up to FBGEMM_MAX_ROWS tokens, for one token with the scales and bias fused;
oneDNN's above) on its input made once, what the layer's own per-call work comes on top of.
`error`: ||y - y_fp32|| / ||y_fp32|| of each on the same input, activations with rows of
different ranges as LLM activations have.
Quantise: float32 `[M, 4096]`; the plain expression is `round(x / (absmax / 127)).clamp(-127, 127)`
with absmax per row, to int8 (what one writes without kernelhub; it is not bit-exact with the
reference on non-finite rows, kernelhub's is); `fallback`: kernelhub's numpy and torch path, which
runs where the compiled quantiser (kernelhub/kernels/int8_gemm/native.py) cannot be built, as the
block sweep does; `1 thread`: kernelhub's with torch on one thread (the compiled quantiser splits
rows over torch's threads from the size `native_threads` says: 32K elements on a team of torch's
OpenMP workers, 8M on threads it starts). Medians of `--reps` rounds after warm-up (five times
as many below 100 tokens, where a call is short), the contenders' calls alternating within a round
(`time_cpu_interleaved`). The linear calls run cold (`cold=True`: twice the last-level cache is read
before each): as in a model, where the other layers' weights pass through the cache between two
calls of one layer, no call finds its weight in the cache, left there by its own last call or by
the `GEMM alone` call on the same packed weight.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

import kernelhub.ops as ops
from kernelhub.kernels.int8_gemm import cpu as int8_cpu
from kernelhub.kernels.int8_gemm import native
from kernelhub.nn import Int8Linear
from kernelhub.nn.int8 import FBGEMM_MAX_ROWS

from harness import BenchmarkParser, gbs, markdown_table, publish, ratio, time_cpu_interleaved, times, write_json

# (N, K) of each linear; qkv and gate_up are the fused projections.
MODELS = {
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "qwen2-7b": {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)},
}


def torch_ao(linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated, and still what CPU users run
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)


def activations(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of different ranges (a few large tokens, as LLM activations have)."""
    return torch.randn(m, k, generator=gen) * torch.exp(2 * torch.rand(m, 1, generator=gen))


def linear_rows(ms: list[int], models: dict, reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for model, layers in models.items():
        for layer, (n, k) in layers.items():
            linear = nn.Linear(k, n)
            ours, theirs = Int8Linear.from_float(linear), torch_ao(linear)
            for m in ms:
                x = activations(m, k, gen)
                with torch.inference_mode():
                    exact = linear(x)
                    errors = [float((f(x) - exact).norm() / exact.norm()) for f in (ours, theirs)]
                    contenders = {"ours": lambda: ours(x), "torch.ao": lambda: theirs(x)}
                    if ours._prepacked_path(x):
                        contenders["gemm"] = prepacked_gemm_alone(ours, x)
                    timed = time_cpu_interleaved(contenders, reps=reps * 5 if m < 100 else reps, cold=True)
                    ours_ms, ao_ms = timed["ours"].median_ms, timed["torch.ao"].median_ms
                    gemm_ms = timed["gemm"].median_ms if "gemm" in timed else None
                rows.append({"model": model, "layer": layer, "M": m, "N": n, "K": k, "kernelhub ms": ours_ms,
                             "torch.ao ms": ao_ms, "speedup": ratio(ao_ms, ours_ms), "GEMM alone ms": gemm_ms,
                             "kernelhub error": errors[0],
                             "torch.ao error": errors[1]})
    return rows


def prepacked_gemm_alone(layer: Int8Linear, x: torch.Tensor):
    """The prepacked GEMM `layer` calls for `x` (fbgemm's or oneDNN's; for one token fbgemm's with
    the scales and bias fused), on its input made once: what the layer's own per-call work
    (quantising, scaling, Python) comes on top of."""
    token = int8_cpu.quantize_token_scaled(x) if x.shape[0] == 1 else None
    if token is not None:
        scaled, scale = token[0].clone(), token[1]  # the layer's calls overwrite the scratch buffer
        packed = layer._packed("fbgemm" if layer.bias is None else "fbgemm_bias")
        fused = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
        return lambda: fused(scaled, scale, 128, packed)
    q, _ = int8_cpu.quantize_int8_cpu(x, torch.float32 if x.shape[0] <= FBGEMM_MAX_ROWS else torch.uint8)
    return lambda: layer._prepacked_product(q)


def plain_quantize(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8)


def without_compiled_quantizer(fn):
    """`fn` run as where the compiled quantiser cannot be built: on the numpy and torch path."""
    def run():
        compiled = native.quantizer
        native.quantizer = lambda: None
        try:
            return fn()
        finally:
            native.quantizer = compiled
    return run


def on_one_thread(fn):
    """`fn` run with torch (and so the compiled quantiser) on one thread."""
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)
    return run


def quantize_rows(ms: list[int], reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    rows = []
    for m in ms:
        x = activations(m, 4096, gen)
        timed = time_cpu_interleaved({"ours": lambda: ops.quantize_int8(x), "plain": lambda: plain_quantize(x),
                                      "fallback": without_compiled_quantizer(lambda: ops.quantize_int8(x)),
                                      "one thread": on_one_thread(lambda: ops.quantize_int8(x))},
                                     reps=reps * 5 if m < 100 else reps)
        ours, plain, fallback = (timed[name].median_ms for name in ("ours", "plain", "fallback"))
        nbytes = x.numel() * (4 + 1) + m * 4  # read x, write q and the scales
        rows.append({"M": m, "K": 4096, "kernelhub ms": ours, "plain torch ms": plain, "speedup": ratio(plain, ours),
                     "kernelhub GB/s": gbs(nbytes, ours), "1 thread ms": timed["one thread"].median_ms,
                     "fallback ms": fallback,
                     "fallback speedup": ratio(plain, fallback)})
    return rows


def block_rows(ms: list[int], blocks: list[int], reps: int) -> list[dict]:
    """The blocked quantiser (K = 4096) with each number of elements per block of rows, against the
    shipped `_BLOCK_ELEMENTS`: what bounds it (more ops per byte below, the cache above)."""
    gen = torch.Generator().manual_seed(2)
    shipped = int8_cpu._BLOCK_ELEMENTS
    rows = []
    for m in ms:
        x = activations(m, 4096, gen)

        def with_block(elements):
            def run():
                int8_cpu._BLOCK_ELEMENTS = elements
                try:
                    return int8_cpu.quantize_int8_cpu(x)
                finally:
                    int8_cpu._BLOCK_ELEMENTS = shipped
            return run

        timed = time_cpu_interleaved({e: without_compiled_quantizer(with_block(e)) for e in blocks}, reps=reps)
        for elements in blocks:
            rows.append({"M": m, "elements per block": elements, "ms": timed[elements].median_ms,
                         "vs shipped": ratio(timed[elements].median_ms, timed[shipped].median_ms)
                         if shipped in timed else None})
    return rows


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def main(argv=None) -> None:
    parser = BenchmarkParser(__file__, __doc__, reps=5,
                             quick={"ms": [1, 96], "quantize_ms": [1, 640], "block_ms": [300], "layers": ["o"],
                                    "reps": 2})
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 8, 16, 96, 384, 1536, 2048], help="tokens M")
    parser.add_argument("--quantize-ms", type=int, nargs="+", default=[1, 16, 128, 512, 640, 1536, 2048, 3000])
    parser.add_argument("--block-ms", type=int, nargs="+", default=[512, 2048], help="tokens M of the block sweep")
    parser.add_argument("--layers", nargs="+", default=None, help="only these layers (qkv, o, gate_up, down)")
    parser.add_argument("--json", help="also write the raw rows here")
    args = parser.parse_args(argv)
    models = {name: {l: s for l, s in layers.items() if args.layers is None or l in args.layers}
              for name, layers in MODELS.items()}
    linear = linear_rows(args.ms, models, args.reps)
    quantize = quantize_rows(args.quantize_ms, args.reps)
    blocks = block_rows(args.block_ms, [1 << e for e in range(17, 23)], args.reps * 4)
    compiled = "built" if native.quantizer() is not None else f"unavailable ({native.unavailable_reason()})"
    per_m = {m: geomean([r["speedup"] for r in linear if r["M"] == m]) for m in args.ms}
    summary = [{"M": m, "speedup (geomean over layers)": s} for m, s in per_m.items()]
    summary.append({"M": "all", "speedup (geomean over layers)": geomean([r["speedup"] for r in linear])})
    text = "\n\n".join([
        "W8A8 linear: kernelhub Int8Linear vs torch.ao dynamic int8 Linear (speedup = torch.ao ms / kernelhub ms)",
        markdown_table(linear, ["model", "layer", "M", "N", "K", "kernelhub ms", "torch.ao ms", "speedup",
                                "GEMM alone ms", "kernelhub error", "torch.ao error"],
                       {"speedup": times, "kernelhub error": lambda v: f"{v:.3g}", "torch.ao error": lambda v: f"{v:.3g}"}),
        markdown_table(summary, ["M", "speedup (geomean over layers)"], {"speedup (geomean over layers)": times}),
        "quantize_int8 (bit-exact with the reference) vs the plain torch expression, float32 [M, 4096]; "
        f"compiled quantiser: {compiled}; fallback: the numpy and torch path",
        markdown_table(quantize, ["M", "K", "kernelhub ms", "plain torch ms", "speedup", "kernelhub GB/s",
                                  "1 thread ms", "fallback ms", "fallback speedup"],
                       {"speedup": times, "fallback speedup": times}),
        "The fallback's blocked quantiser by elements per block of rows, K = 4096 (shipped: "
        f"{int8_cpu._BLOCK_ELEMENTS}; vs shipped = its time / the shipped block's)",
        markdown_table(blocks, ["M", "elements per block", "ms", "vs shipped"], {"vs shipped": times}),
    ])
    publish(text, args)
    write_json(args.json, args, linear=linear, quantize=quantize, blocks=blocks)


if __name__ == "__main__":
    main()
