"""What a short call costs when it runs cold: the per-call work of a W8A8 layer at decode size,
back to back and right after what a model does between two calls of one layer.

    python benchmarks/cpu_cold_calls.py --markdown benchmarks/results/cpu_cold_calls.md
    python benchmarks/cpu_cold_calls.py --quick      # a small weight, 5 reps: checks the script works

Each contender runs after a preparation that is not timed: nothing (back to back, warm), a copy of
`--stream-mb` MB (what the other layers' weights do to the caches between two calls of one layer),
one call of the Llama-3-8B `down` projection's prepacked int8 GEMM (its 58 MB weight streams
through the caches), or a 5 ms sleep (the core idles). Contenders, all on one token `[1, 14336]`:
kernelhub's CPU quantiser (compiled, and its numpy fallback), the one-token quantiser the layer
calls (`quantize_token_scaled`, both ways), the plain torch expression, the fbgemm GEMM alone on q
made once, kernelhub's whole layer and torch.ao's whole dynamic int8 Linear (one C++ op). Medians
of `--reps` calls, microseconds.

A second table is why `time_cpu_interleaved` shuffles its contenders' order: kernelhub's quantiser
and the plain expression on `[M, 4096]`, each right after a call of the other and of itself (the
plain expression allocates and frees tens of MB; what the next call pays for it depends on how the
allocator is left).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from kernelhub.kernels.int8_gemm.cpu import quantize_int8_cpu, quantize_token_scaled
from kernelhub.nn import Int8Linear

from cpu_w8a8 import activations, plain_quantize, torch_ao, without_compiled_quantizer
from harness import BenchmarkParser, fixed, markdown_table, publish


def cold_us(prepare, fn, reps: int) -> float:
    """Median microseconds of `fn()` timed right after an untimed `prepare()`."""
    samples = []
    for _ in range(reps + 2):
        prepare()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    samples = sorted(samples[2:])
    return samples[len(samples) // 2]


def rows(n: int, k: int, stream_mb: int, reps: int) -> list[dict]:
    linear = nn.Linear(k, n)
    layer, ao = Int8Linear.from_float(linear), torch_ao(linear)
    x = activations(1, k, torch.Generator().manual_seed(0))
    q, _ = quantize_int8_cpu(x, torch.float32)
    source = torch.empty(stream_mb << 20, dtype=torch.uint8)
    target = torch.empty_like(source)
    preparations = {"back to back": lambda: None,
                    f"after a {stream_mb} MB copy": lambda: target.copy_(source),
                    "after the GEMM": lambda: layer._prepacked_product(q),
                    "after a 5 ms sleep": lambda: time.sleep(0.005)}
    contenders = {"kernelhub quantize_int8 (CPU path)": lambda: quantize_int8_cpu(x, torch.float32),
                  "quantize_int8, numpy fallback": without_compiled_quantizer(lambda: quantize_int8_cpu(x, torch.float32)),
                  "kernelhub one-token quantiser": lambda: quantize_token_scaled(x),
                  "one-token, numpy fallback": without_compiled_quantizer(lambda: quantize_token_scaled(x)),
                  "plain torch quantisation": lambda: plain_quantize(x),
                  "fbgemm GEMM alone": lambda: layer._prepacked_product(q),
                  "kernelhub Int8Linear": lambda: layer(x), "torch.ao dynamic Linear": lambda: ao(x)}
    with torch.inference_mode():
        return [{"call": name, **{when: cold_us(prepare, fn, reps) for when, prepare in preparations.items()}}
                for name, fn in contenders.items()]


def order_rows(ms: list[int], reps: int) -> list[dict]:
    """Each of the two quantisers on `[M, 4096]` timed right after one call of each (`cold_us`)."""
    gen = torch.Generator().manual_seed(1)
    table = []
    for m in ms:
        x = activations(m, 4096, gen)
        calls = {"kernelhub": lambda: quantize_int8_cpu(x), "plain": lambda: plain_quantize(x)}
        table.append({"M": m, **{f"{name} after {before} us": cold_us(calls[before], fn, reps)
                                 for name, fn in calls.items() for before in calls}})
    return table


def main(argv=None) -> None:
    parser = BenchmarkParser(__file__, __doc__, reps=60,
                             quick={"n": 256, "k": 512, "stream_mb": 4, "reps": 5, "order_ms": [8]})
    parser.add_argument("--n", type=int, default=4096, help="output features (default: Llama-3-8B down)")
    parser.add_argument("--k", type=int, default=14336, help="input features")
    parser.add_argument("--stream-mb", type=int, default=64, help="MB copied by the cache-clearing preparation")
    parser.add_argument("--order-ms", type=int, nargs="+", default=[128, 512], help="tokens M of the order table")
    args = parser.parse_args(argv)
    table = rows(args.n, args.k, args.stream_mb, args.reps)
    order = order_rows(args.order_ms, args.reps)
    text = "\n\n".join([f"One token [1, {args.k}] through a [{args.n}, {args.k}] W8A8 layer's pieces, us (median)",
                        markdown_table(table, list(table[0]), {c: fixed(1) for c in table[0] if c != "call"}),
                        "Each quantiser on [M, 4096] right after one call of the other, or of itself, us (median)",
                        markdown_table(order, list(order[0]), {c: fixed(1) for c in order[0] if c != "M"})])
    publish(text, args)


if __name__ == "__main__":
    main()
