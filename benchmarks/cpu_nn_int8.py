"""W8A8 in a random-weight Llama on the CPU: forward time of kernelhub's Int8Linear model against
float32, bfloat16 and torch.ao's dynamic int8 (`quantize_dynamic`, what a CPU user picks today).

The model has Llama-3-8B's layer shapes (hidden 4096, MLP 14336, 32 query heads over 8 KV heads)
with `--layers` decoder layers and a small vocabulary, random weights (no weights can be
downloaded here: the accuracy column says how close each variant's logits are to float32's on
random weights, not how a trained model fares). Every linear but lm_head is quantised in both
int8 variants. Prefill: one sequence of M tokens; decode: M sequences of one token each (the
linears see M rows either way). Time per forward call, median over `--reps` rounds in which the
variants' calls alternate (`time_cpu_interleaved`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from harness import BenchmarkParser, markdown_table, publish, ratio, time_cpu_interleaved, times, write_json

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:  # the `hf` extra
    raise SystemExit("cpu_nn_int8.py needs transformers: pip install 'kernelhub[hf]'") from None

from kernelhub.nn import quantize_linear_layers


def llama(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def torch_ao(model: nn.Module) -> nn.Module:
    names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.endswith("lm_head")}
    qconfig = torch.ao.quantization.default_dynamic_qconfig
    return torch.ao.quantization.quantize_dynamic(model, {name: qconfig for name in names}, dtype=torch.qint8)


def main(argv=None) -> None:
    parser = BenchmarkParser(__file__, __doc__, reps=5, quick={"prefill": [64], "decode": [1], "layers": 1, "reps": 1})
    parser.add_argument("--prefill", type=int, nargs="+", default=[512, 2048], help="prefill tokens M")
    parser.add_argument("--decode", type=int, nargs="+", default=[1, 8], help="decoding sequences M")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--json", help="also write the raw rows here")
    args = parser.parse_args(argv)
    fp32 = llama(args.layers)
    variants = {"float32": fp32, "bfloat16": copy.deepcopy(fp32).to(torch.bfloat16)}
    with torch.no_grad():
        variants["torch.ao int8"] = torch_ao(copy.deepcopy(fp32))
        variants["kernelhub int8"] = quantize_linear_layers(copy.deepcopy(fp32))
    gen = torch.Generator().manual_seed(1)
    cases = ([("prefill", m, torch.randint(0, 1024, (1, m), generator=gen)) for m in args.prefill]
             + [("decode", m, torch.randint(0, 1024, (m, 1), generator=gen)) for m in args.decode])
    rows = []
    with torch.inference_mode():
        for phase, m, ids in cases:
            row = {"phase": phase, "M": m}
            exact = fp32(ids, use_cache=False).logits.float()
            timed = time_cpu_interleaved({name: (lambda model=model: model(ids, use_cache=False))
                                          for name, model in variants.items()}, reps=args.reps)
            for name, model in variants.items():
                row[f"{name} ms"] = timed[name].median_ms
                logits = model(ids, use_cache=False).logits.float()
                row[f"{name} error"] = float((logits - exact).norm() / exact.norm())
            row["kernelhub vs torch.ao"] = ratio(row["torch.ao int8 ms"], row["kernelhub int8 ms"])
            row["kernelhub vs float32"] = ratio(row["float32 ms"], row["kernelhub int8 ms"])
            rows.append(row)
    columns = ["phase", "M", *[f"{n} ms" for n in variants], "kernelhub vs torch.ao", "kernelhub vs float32",
               "torch.ao int8 error", "kernelhub int8 error", "bfloat16 error"]
    formats = {"kernelhub vs torch.ao": times, "kernelhub vs float32": times}
    formats.update({c: (lambda v: f"{v:.3g}") for c in columns if c.endswith("error")})
    formats.update({c: (lambda v: f"{v:.1f}") for c in columns if c.endswith(" ms")})
    text = (f"Random-weight Llama, {args.layers} layers of Llama-3-8B shapes; time per forward call (ms, median "
            f"of {args.reps}); error: ||logits - float32 logits|| / ||float32 logits||.\n\n"
            + markdown_table(rows, columns, formats))
    publish(text, args)
    write_json(args.json, args, rows=rows)


if __name__ == "__main__":
    main()
