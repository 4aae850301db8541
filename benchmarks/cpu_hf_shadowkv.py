"""ShadowKV in a random-weight Llama on the CPU: decode time per token and cache memory, against
transformers' DynamicCache, with the same model and prompt.

The model has Llama-3-8B's attention shape (32 query heads over 8 KV heads, head_dim 128, hidden
4096) in `--dtype` (float32 by default: the CPU's fastest here), with `--layers` decoder layers and a small MLP and vocabulary: random weights
(no weights can be downloaded here), which run every code path but say nothing about accuracy. At
each prompt length the prompt is prefilled once per cache (dense attention both times), then
`--steps` tokens are decoded greedily one forward call at a time; the time per decode step is the
median over the steps (the MLP and projections cost the same in both; what differs is attention
over the cache). Memory: DynamicCache's keys and values; ShadowKV's resident bytes (on the
compute device) and offloaded bytes (the candidate chunks' values, in host memory).
"""

from __future__ import annotations

import time
import warnings

import torch

from harness import BenchmarkParser, markdown_table, publish, ratio, times, write_json

try:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
except ImportError:  # the `hf` extra
    raise SystemExit("cpu_hf_shadowkv.py needs transformers: pip install 'kernelhub[hf]'") from None

from kernelhub.hf import shadowkv_cache


def llama(layers: int, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=1024, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rope_theta=500000.0, attn_implementation="sdpa",
                         eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(config).to(dtype).eval()


def decode(model, cache, prompt: torch.Tensor, steps: int) -> tuple[float, list[float]]:
    """Prefill `prompt` into `cache`, then decode `steps` tokens greedily: (prefill s, step times in ms)."""
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        started = time.perf_counter()
        logits = model(prompt, cache=cache, use_cache=True).logits[:, -1]
        prefill_s = time.perf_counter() - started
        step_ms = []
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            started = time.perf_counter()
            logits = model(token, cache=cache, use_cache=True).logits[:, -1]
            step_ms.append((time.perf_counter() - started) * 1e3)
    return prefill_s, step_ms


def dynamic_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def main(argv=None) -> None:
    parser = BenchmarkParser(__file__, __doc__, quick={"prompts": [4096], "steps": 3, "layers": 1})
    parser.add_argument("--prompts", type=int, nargs="+", default=[16384, 32768], help="prompt lengths")
    parser.add_argument("--steps", type=int, default=16, help="decoded tokens per prompt")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", help="also write the raw rows here")
    args = parser.parse_args(argv)
    model = llama(args.layers, getattr(torch, args.dtype))
    rows = []
    for length in args.prompts:
        prompt = torch.randint(0, 1024, (1, length), generator=torch.Generator().manual_seed(length))
        dense_cache = DynamicCache(config=model.config)
        dense_prefill, dense_steps = decode(model, dense_cache, prompt, args.steps)
        dense_mem = dynamic_bytes(dense_cache)
        del dense_cache
        cache = shadowkv_cache(model)
        shadow_prefill, shadow_steps = decode(model, cache, prompt, args.steps)
        dense_ms, shadow_ms = sorted(dense_steps)[len(dense_steps) // 2], sorted(shadow_steps)[len(shadow_steps) // 2]
        rows.append({"prompt": length, "DynamicCache ms/token": dense_ms, "ShadowKV ms/token": shadow_ms,
                     "decode speedup": ratio(dense_ms, shadow_ms),
                     "DynamicCache tokens/s": 1e3 / dense_ms, "ShadowKV tokens/s": 1e3 / shadow_ms,
                     "DynamicCache MiB": dense_mem / 2**20, "ShadowKV resident MiB": cache.resident_bytes() / 2**20,
                     "ShadowKV offloaded MiB": cache.offloaded_bytes() / 2**20,
                     "resident vs dense": ratio(cache.resident_bytes(), dense_mem),
                     "prefill s (dense / ShadowKV)": f"{dense_prefill:.1f} / {shadow_prefill:.1f}"})
        del cache
    columns = list(rows[0])
    formats = {c: times for c in ("decode speedup", "resident vs dense")}
    formats.update({c: (lambda v: f"{v:.1f}") for c in columns if c.endswith(("MiB", "ms/token", "tokens/s"))})
    text = (f"Random-weight Llama, {args.layers} layers of Llama-3-8B attention (H_q 32, H_kv 8, D 128), "
            f"{args.dtype}, batch 1, {args.steps} decode steps per prompt; ShadowKV's defaults (rank 160, budget "
            "2048, chunk 8, 48 outliers, local 32).\n\n" + markdown_table(rows, columns, formats))
    publish(text, args)
    write_json(args.json, args, rows=rows)


if __name__ == "__main__":
    main()
