"""kernelhub.hf: ShadowKV inside transformers' generate(), on tiny random-weight Llamas (and a few
other architectures whose layers slide or cap their logits).

No weights can be downloaded here: every model is built from a config with random weights, which
runs every code path (RoPE, GQA, the cache protocol) but says nothing about a trained model's
accuracy under ShadowKV's approximations.
"""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the `hf` extra, part of the test extra
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from kernelhub.hf import ShadowKVCacheLayer, ShadowKVError, shadowkv_cache  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


def tiny_llama(attn="sdpa", rope=None, seed=0) -> LlamaForCausalLM:
    """2 layers, 4 query heads over 2 KV heads (GQA), head_dim 64; random weights."""
    torch.manual_seed(seed)
    extra = {"rope_parameters": rope} if rope else {}
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                         attn_implementation=attn, eos_token_id=None, pad_token_id=0, **extra)
    return LlamaForCausalLM(config).eval()


def generate(model, ids, cache, **kwargs):
    """Greedy generation (no EOS: every step runs) with its logits."""
    kwargs.setdefault("attention_mask", torch.ones_like(ids))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values= is being renamed cache= in 5.x
        return model.generate(ids, max_new_tokens=kwargs.pop("max_new_tokens", 6), do_sample=False, cache=cache,
                              output_logits=True, return_dict_in_generate=True, **kwargs)


def exact_settings(**overrides):
    """Full rank (H_kv * D = 128) and a budget over every chunk: ShadowKV then attends to every token."""
    return dict(dict(rank=128, budget=4096, outliers=2, local=16, dense_below=0), **overrides)


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE, LINEAR_ROPE], ids=["default-rope", "llama3-rope", "linear-rope"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_rank_full_budget_generates_what_dynamic_cache_does(attn, rope):
    model = tiny_llama(attn, rope)
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(1))
    dense = generate(model, ids, DynamicCache(config=model.config))
    cache = shadowkv_cache(model, **exact_settings())
    shadow = generate(model, ids, cache)
    assert torch.equal(shadow.sequences, dense.sequences)
    assert all(layer.shadow is not None for layer in cache.layers)  # ShadowKV served every step after the prompt
    # The model's own (rescaled) frequencies: at full rank a wrong RoPE would cancel out, keys being
    # rotated back and forth by the same angles, so the results alone cannot show it.
    assert all(torch.equal(layer.shadow.inv_freq, model.model.rotary_emb.inv_freq) for layer in cache.layers)
    for step, (a, b) in enumerate(zip(shadow.logits, dense.logits)):
        assert float((a - b).norm() / b.norm()) < 1e-4, step
    assert cache.get_seq_length() == 300 + 6 - 1  # the last token is generated, not yet cached
    assert model.config._attn_implementation == f"kernelhub_shadowkv_{attn}"


def test_default_settings_on_a_long_prompt_at_batch_two_run_and_report_their_memory():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 3000), generator=torch.Generator().manual_seed(2))
    cache = shadowkv_cache(model)
    out = generate(model, ids, cache, max_new_tokens=4)
    assert all(bool(torch.isfinite(logits).all()) for logits in out.logits)
    assert all(layer.shadow is not None for layer in cache.layers)  # 3000 tokens >= dense_below (2464)
    # The values of the candidate chunks live in host memory; the rest is resident. (At this tiny
    # H_kv * D = 128 the default rank 160 is full rank: the memory saving shows at real shapes,
    # benchmarks/cpu_hf_shadowkv.py.)
    shadow = cache.layers[0].shadow
    candidate_values = 2 * 2 * shadow.n_chunks * shadow.chunk_size * 64 * 4  # [B, H_kv, C, chunk, D] float32
    assert cache.offloaded_bytes() == 2 * candidate_values
    assert cache.resident_bytes() == sum(layer.shadow.resident_bytes() for layer in cache.layers) > 0
    assert shadow.n_select == 2048 // 8 and shadow.effective_rank == 128


def test_a_prompt_below_dense_below_stays_dense_and_exact():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    dense = generate(model, ids, DynamicCache(config=model.config))
    cache = shadowkv_cache(model, dense_below=41)
    out = generate(model, ids, cache)
    assert all(layer.shadow is None for layer in cache.layers)
    assert torch.equal(out.sequences, dense.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, dense.logits))


def test_beam_search_reorders_the_cache():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(4))
    dense = generate(model, ids, DynamicCache(config=model.config), num_beams=3)
    shadow = generate(model, ids, shadowkv_cache(model, **exact_settings()), num_beams=3)
    assert torch.equal(shadow.sequences, dense.sequences)


def test_a_left_padded_batch_is_refused_with_a_clear_message():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, :7] = 0
    with pytest.raises(ShadowKVError, match="pads some sequences of the batch.*one length"):
        generate(model, ids, shadowkv_cache(model, **exact_settings()), attention_mask=mask)
    # A short padded batch stays dense, where padding is fine.
    short = generate(model, ids[:, :40], shadowkv_cache(model), attention_mask=mask[:, :40])
    assert short.sequences.shape == (2, 46)


def test_crop_removes_decoded_tokens_only():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(6))
    cache = shadowkv_cache(model, **exact_settings())
    generate(model, ids, cache)
    assert cache.get_seq_length() == 105
    cache.crop(-3)
    assert cache.get_seq_length() == 102
    with pytest.raises(ShadowKVError, match="prefill of a ShadowKV cache cannot be cropped"):
        cache.crop(-10)
    assert cache.get_seq_length() == 102  # a refused crop changes nothing


def test_the_model_still_runs_without_a_shadowkv_cache():
    """After the switch, a call without a ShadowKV cache runs the model's own attention: same tokens."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(7))
    before = generate(model, ids, DynamicCache(config=model.config))
    shadowkv_cache(model)
    after = generate(model, ids, DynamicCache(config=model.config))
    assert torch.equal(before.sequences, after.sequences)
    assert all(torch.equal(a, b) for a, b in zip(before.logits, after.logits))


def tiny_model(kind: str, seed=0):
    """3 layers (2 KV heads, head_dim 64) of other architectures, some of whose layers slide over a
    64-token window: Gemma 3 (its sliding and full layers rotate with different thetas), Qwen2 with
    `use_sliding_window`, Gemma 2 (logit softcapping by default), Mistral (a window on every layer)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=8192, attn_implementation="sdpa",
                  eos_token_id=None, pad_token_id=0)
    if kind == "gemma3":
        config = transformers.Gemma3TextConfig(**common, sliding_window=64,
                                               layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        return transformers.Gemma3ForCausalLM(config).eval()
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=64, max_window_layers=1)
        return transformers.Qwen2ForCausalLM(config).eval()
    if kind == "gemma2":
        common["attn_implementation"] = "eager"  # Gemma 2 has no sdpa attention in transformers
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common, sliding_window=64)).eval()
    if kind == "granite":  # its softmax scale is attention_multiplier, not 1 / sqrt(D)
        config = transformers.GraniteConfig(**common, attention_multiplier=0.02, embedding_multiplier=2.0,
                                            residual_multiplier=0.5, logits_scaling=2.0)
        return transformers.GraniteForCausalLM(config).eval()
    if kind == "cohere":  # RoPE on interleaved channel pairs
        return transformers.CohereForCausalLM(transformers.CohereConfig(**common)).eval()
    return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=64)).eval()


@pytest.mark.parametrize("kind, shadowkv_layers", [("gemma3", [1]), ("qwen2", [0])])
def test_sliding_window_layers_keep_transformers_own_cache_and_the_rest_is_exact(kind, shadowkv_layers):
    model = tiny_model(kind)
    ids = torch.randint(0, 128, (2, 200), generator=torch.Generator().manual_seed(8))  # longer than the window
    dense = generate(model, ids, DynamicCache(config=model.config))
    cache = shadowkv_cache(model, **exact_settings())
    shadow = generate(model, ids, cache)
    served = [i for i, layer in enumerate(cache.layers) if isinstance(layer, ShadowKVCacheLayer)]
    assert served == shadowkv_layers and all(cache.layers[i].shadow is not None for i in served)
    # The full layers' RoPE (at full rank a wrong one would cancel out: keys are rotated back and
    # forth by the same angles, so the exact results alone cannot show it).
    rotary = model.model.rotary_emb
    full = getattr(rotary, "full_attention_inv_freq", getattr(rotary, "inv_freq", None))
    assert all(torch.equal(cache.layers[i].shadow.inv_freq, full) for i in served)
    assert all(type(layer).__name__ == "DynamicSlidingWindowLayer"
               for i, layer in enumerate(cache.layers) if i not in served)
    assert torch.equal(shadow.sequences, dense.sequences)
    for step, (a, b) in enumerate(zip(shadow.logits, dense.logits)):
        assert float((a - b).norm() / b.norm()) < 1e-4, step
    window_bytes = sum(2 * layer.keys.numel() * 4 for i, layer in enumerate(cache.layers) if i not in served)
    assert cache.resident_bytes() == window_bytes + sum(cache.layers[i].shadow.resident_bytes() for i in served)


def test_what_shadowkv_attention_cannot_do_is_refused_before_anything_changes():
    for kind, message in [("gemma2", r"caps its attention logits \(attn_logit_softcapping=50.0\)"),
                          ("mistral", "has no full-attention layer .*sliding_attention.*use DynamicCache")]:
        model = tiny_model(kind)
        attention = model.config._attn_implementation
        with pytest.raises(ShadowKVError, match=message):
            shadowkv_cache(model)
        assert model.config._attn_implementation == attention


def test_an_attention_argument_shadowkv_does_not_serve_is_refused_at_the_prompt():
    """The check at the attention call itself, whatever the config says: Gemma 2's layers pass their
    softcap to the attention function."""
    model = tiny_model("gemma2")
    model.config.attn_logit_softcapping = None  # hide it from shadowkv_cache; the layers keep 50.0
    cache = shadowkv_cache(model, **exact_settings())
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(9))
    with pytest.raises(ShadowKVError, match=r"caps its attention logits \(softcap=50.0\)"):
        generate(model, ids, cache)


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, "rope_scaling type 'dynamic' is not supported"),
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 256},
     "rope_scaling type 'yarn' is not supported"),
], ids=["dynamic", "yarn"])
def test_unsupported_rope_scaling_is_refused(rope, message):
    model = tiny_llama(rope=rope)
    with pytest.raises(ShadowKVError, match=message):
        shadowkv_cache(model)
    assert model.config._attn_implementation == "sdpa"  # a refused call changes nothing


def test_a_model_with_its_own_softmax_scale_is_served_with_it():
    """Granite scales attention by attention_multiplier (0.02 here, not 1 / sqrt(64)): each ShadowKV
    layer takes its attention module's scaling, and generation is exact at full rank."""
    model = tiny_model("granite")
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(9))
    dense = generate(model, ids, DynamicCache(config=model.config))
    cache = shadowkv_cache(model, **exact_settings())
    shadow = generate(model, ids, cache)
    assert torch.equal(shadow.sequences, dense.sequences)
    assert [layer.shadow.scale for layer in cache.layers] == [0.02] * 3
    for step, (a, b) in enumerate(zip(shadow.logits, dense.logits)):
        assert float((a - b).norm() / b.norm()) < 1e-4, step


def test_a_model_whose_rope_is_not_rotate_half_is_refused():
    """Cohere rotates interleaved channel pairs. At full rank ShadowKV's rotate-half form would cancel
    out (the generation would look exact), so the form is checked on the model's own function."""
    model = tiny_model("cohere")
    with pytest.raises(ShadowKVError, match="CohereAttention applies RoPE in another form than Llama's rotate-half"):
        shadowkv_cache(model)
    assert model.config._attn_implementation == "sdpa"


def test_bad_settings_are_refused_before_anything_changes():
    model = tiny_llama()
    with pytest.raises(ValueError, match="rank"):
        shadowkv_cache(model, rank=0)
    with pytest.raises(ValueError, match="dense_below"):
        shadowkv_cache(model, dense_below=-1)
    with pytest.raises(ValueError, match="gram"):
        shadowkv_cache(model, gram="float16")
    assert model.config._attn_implementation == "sdpa"


def test_int8_gram_at_full_rank_generates_what_dynamic_cache_does():
    """The int8 Gram matrix only chooses the basis; at full rank any orthonormal basis keeps every key."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(4))
    dense = generate(model, ids, DynamicCache(config=model.config))
    cache = shadowkv_cache(model, **exact_settings(gram="int8"))
    shadow = generate(model, ids, cache)
    assert torch.equal(shadow.sequences, dense.sequences)
    assert all(layer.shadow is not None and layer.shadow.gram == "int8" for layer in cache.layers)
    for step, (a, b) in enumerate(zip(shadow.logits, dense.logits)):
        assert float((a - b).norm() / b.norm()) < 1e-4, step
