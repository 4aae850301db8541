"""ShadowKV inside transformers' `generate()`: `shadowkv_cache(model)`.

    from kernelhub.hf import shadowkv_cache
    cache = shadowkv_cache(model)                       # one ShadowKVCache per decoder layer
    out = model.generate(input_ids, cache=cache, max_new_tokens=64)  # past_key_values= in older releases
    cache.resident_bytes(), cache.offloaded_bytes()

What it arranges, and why:

- The cache (`ShadowKVModelCache`, a transformers `Cache`) holds one `ShadowKVCacheLayer` per
  decoder layer. transformers hands a cache's `update()` the post-RoPE keys of the new tokens and
  never the query. The prefill's keys are kept as they come, and their pre-RoPE form, which the
  low-rank factorisation needs (RoPE makes keys high-rank), is recovered by rotating them back by
  the same angles (`ShadowKVCache.prefill_post_rope`): a rotation is exactly invertible, so this
  costs one elementwise pass and float32 rounding, where capturing the keys before RoPE would need
  a hook inside every attention module of every architecture.
- Decode needs the query, so the model's attention is switched to `kernelhub_shadowkv_<impl>`, an
  attention function registered through transformers' `AttentionInterface` (and its mask function
  through `AttentionMaskInterface`) that wraps the model's own (`sdpa` or `eager`). It runs the
  model's own attention for the prompt (dense and exact) and whenever no ShadowKV layer asked for
  the call; for a decode step whose `update()` this cache answered, it runs ShadowKV's sparse
  attention on the query. The switch stays on the model: to undo it, call
  `model.set_attn_implementation(<impl>)`.
- RoPE comes from the model: its rotary embedding's inverse frequencies (`rope_theta`, and
  the `linear` or Llama-3.1's `llama3` rescaling already applied, in the float32 transformers
  computes them in; the full-attention layers' own where the model keeps one set per layer type),
  so the keys ShadowKV rebuilds at decode are rotated exactly as the model rotates. Other rope
  types (their cos/sin carry an attention factor or depend on the sequence length) are refused
  with a message naming them, and so are partial RoPE and RoPE in another form than Llama's
  rotate-half one (Cohere's and Helium's interleaved pairs), found by running the model's own
  `apply_rotary_pos_emb` on a probe. The softmax scale is each attention module's `scaling`
  (Granite's `attention_multiplier`, Gemma's `query_pre_attn_scalar`).
- Only full-attention layers get a ShadowKV cache. A layer of another type (a sliding window,
  chunked attention: Gemma 2/3, Qwen2 with `use_sliding_window`) keeps the cache layer
  transformers' `DynamicCache(config=)` gives it and the model's own attention, so it stays exact.
  A model with no full-attention layer, or whose attention caps its logits (Gemma 2's
  `attn_logit_softcapping`) or adds sinks, is refused: ShadowKV's sparse attention does neither.
- Prompts shorter than `dense_below` (default: budget + local + outliers * chunk_size, the number
  of tokens a ShadowKV step attends to anyway, so below it sparsity saves nothing) stay dense and
  exact: the layer keeps every key and value, as DynamicCache does.

Limits, each a clear error: batches must be of equal-length prompts (a left-padded batch has
per-sequence positions ShadowKV's shared chunk layout cannot hold); one prefill, then decoding one
token per step (no chunked prefill, no speculative multi-token steps); `crop` removes decoded
tokens only; beam search works (`reorder_cache`).
"""

from __future__ import annotations

import functools
import math
import sys
import threading
from collections.abc import Callable

import torch

from kernelhub.reference.rope import apply_rope, rope_rows
from kernelhub.shadowkv.cache import ShadowKVCache

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
except ImportError as exc:  # the `hf` extra
    raise ImportError("kernelhub.hf needs transformers 5: pip install 'kernelhub[hf]'") from exc
try:  # the cache layer type of each decoder layer, as DynamicCache(config=) chooses it
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, get_layer_types_and_kwargs
except ImportError:  # an early 5.x release: every layer full attention unless config.layer_types says otherwise
    DYNAMIC_LAYER_TYPE_MAPPING, get_layer_types_and_kwargs = {}, None

ATTENTION_PREFIX = "kernelhub_shadowkv_"
# Rotations fixed per position whose cos/sin carry no extra factor: the rotary module's inv_freq holds
# all of the scaling (`linear`: divided by the factor; `llama3`: per-frequency).
SUPPORTED_ROPE = ("default", "linear", "llama3")
WRAPPED_ATTENTION = ("sdpa", "eager")
FULL_ATTENTION = "full_attention"  # the layer type ShadowKV serves; others keep transformers' own cache layer
# What a model may hand its attention function that ShadowKV's sparse attention does not do.
UNSUPPORTED_ATTENTION_ARGUMENTS = {"softcap": "caps its attention logits", "s_aux": "adds attention sinks",
                                   "sliding_window": "attends to a sliding window"}


class ShadowKVError(ValueError):
    """A model, batch or generation setting ShadowKV cannot serve (the message says which and why)."""


# -- the model's RoPE and shapes ---------------------------------------------------------------------

def _inv_freq(model, layer_type: str) -> tuple[torch.Tensor, float]:
    """The inverse frequencies `[D / 2]` and cos/sin factor of the model's RoPE for `layer_type`
    layers: a rotary embedding module's `<layer_type>_inv_freq` where it keeps one per layer type
    (Gemma 3: other thetas for sliding and full layers), else its `inv_freq`."""
    for module in model.modules():
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        inv_freq = getattr(module, f"{layer_type}_inv_freq", None)
        if inv_freq is not None:
            return inv_freq, getattr(module, f"{layer_type}_attention_scaling", 1.0)
        if getattr(module, "inv_freq", None) is not None:
            return module.inv_freq, getattr(module, "attention_scaling", 1.0)
    raise ShadowKVError(f"{type(model).__name__}: no rotary embedding module with inv_freq found; ShadowKV "
                        "needs a RoPE model (Llama, Mistral, Qwen2, ...)")


def _attention_modules(model) -> dict[int, torch.nn.Module]:
    """Each decoder layer's attention module by its `layer_idx` (transformers' attention modules keep
    their index and their softmax `scaling`)."""
    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    return {module.layer_idx: module for module in model.modules()
            if isinstance(getattr(module, "layer_idx", None), int) and is_number(getattr(module, "scaling", None))}


def _refuse_other_rope_forms(attention: torch.nn.Module, inv_freq: torch.Tensor) -> None:
    """Refuse a model whose RoPE is not Llama's rotate-half form, the one ShadowKV rebuilds keys with
    (Cohere rotates interleaved channel pairs): its own `apply_rotary_pos_emb` is run on a probe with
    kernelhub's cos/sin rows. (At full rank a wrong form would cancel out, keys being rotated back and
    forth by the same function; at a lower rank the un-rotated keys would not be low rank.)"""
    apply = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
    if apply is None:
        return  # no function to compare with
    positions = torch.tensor([0, 1, 5, 77, 1000])
    cos, sin = rope_rows(positions, inv_freq=inv_freq.detach().cpu())
    probe = torch.randn(1, 1, len(positions), cos.shape[-1], generator=torch.Generator().manual_seed(0))
    expected = apply_rope(probe, torch.arange(len(positions)).view(1, 1, -1), cos, sin)
    try:
        _, rotated = apply(probe, probe, cos[None], sin[None])
    except Exception:  # another signature: nothing to compare with
        return
    if rotated.shape != expected.shape or not torch.allclose(rotated.float(), expected, rtol=1e-5, atol=1e-5):
        raise ShadowKVError(f"{type(attention).__name__} applies RoPE in another form than Llama's rotate-half "
                            "one (interleaved channel pairs, say), which ShadowKV rebuilds keys with: not supported")


def _rope_type(config, layer_type: str) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params.get(layer_type), dict):  # one set of parameters per layer type
        params = params[layer_type]
    return params.get("rope_type", params.get("type", "default")) or "default"


def _layer_types(config) -> list[tuple[str, dict]]:
    """(type, transformers' cache layer arguments) of every decoder layer, as `DynamicCache(config=)`
    sees them: `full_attention`, `sliding_attention` ({"sliding_window": W}), ..."""
    if get_layer_types_and_kwargs is not None:
        return list(zip(*get_layer_types_and_kwargs(config)))
    types = getattr(config, "layer_types", None) or [FULL_ATTENTION] * config.num_hidden_layers
    return [(layer_type, {}) for layer_type in types]


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# -- attention: the model's own, or ShadowKV's for a decode step --------------------------------------

class _Pending(threading.local):
    """What the last `update()` answered: (its returned key tensor, the layer), read by the attention
    function right after (the two run back to back in every decoder layer)."""

    key: torch.Tensor | None = None
    layer: ShadowKVCacheLayer | None = None


_pending = _Pending()


def _own_attention(name: str, module) -> Callable:
    if name == "eager":  # each model file has its own eager function, in its own module
        return sys.modules[type(module).__module__].eager_attention_forward
    return AttentionInterface._global_mapping[name]


def _attention_for(wrapped: str) -> Callable:
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = _pending.layer if _pending.key is key else None
        _pending.key = _pending.layer = None
        if layer is not None and layer.shadow is not None:
            _refuse_padding(attention_mask)
            _refuse_unsupported(kwargs)
            if layer.decoding:
                return layer.attend(query, key, value, scaling), None
        return _own_attention(wrapped, module)(module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)

    attention.__name__ = attention.__qualname__ = f"{ATTENTION_PREFIX}{wrapped}"
    return attention


def _refuse_padding(mask: torch.Tensor | None) -> None:
    """A left-padded batch (the last query row masks some keys: bool False, or an additive -inf) has
    per-sequence positions that ShadowKV's shared chunk layout cannot hold; a dense layer serves it."""
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return
    last = mask[:, :, -1, :]
    padded = bool((~last).any()) if mask.dtype == torch.bool else bool((last != 0).any())
    if padded:
        raise ShadowKVError("the attention mask pads some sequences of the batch: a ShadowKV cache needs "
                            "prompts of one length (batch them by length, or generate them one at a time)")


def _refuse_unsupported(arguments: dict) -> None:
    """A layer the model has ShadowKV serve must attend plainly: no logit cap, sinks or window."""
    for name, what in UNSUPPORTED_ATTENTION_ARGUMENTS.items():
        if arguments.get(name) is not None:
            raise ShadowKVError(f"this layer {what} ({name}={arguments[name]!r}), which ShadowKV's sparse "
                                "attention does not")


def _install_attention(model) -> str:
    """Register `kernelhub_shadowkv_<impl>` for the model's attention `impl` and switch the model to it."""
    config = _text_config(model)
    current = config._attn_implementation
    wrapped = current.removeprefix(ATTENTION_PREFIX) if current else "eager"
    if wrapped not in WRAPPED_ATTENTION:
        raise ShadowKVError(f"the model's attention implementation is {current!r}; ShadowKV wraps "
                            f"{' or '.join(WRAPPED_ATTENTION)} (load the model with attn_implementation='sdpa')")
    name = ATTENTION_PREFIX + wrapped
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _attention_for(wrapped))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[wrapped])
    if current != name:
        model.set_attn_implementation(name)
    return name


# -- the cache ---------------------------------------------------------------------------------------------

class ShadowKVCacheLayer(CacheLayerMixin):
    """One decoder layer's cache: dense while the prompt is short, else a `ShadowKVCache`."""

    is_compileable = False
    is_sliding = False
    is_croppable = True  # decoded tokens only (`crop`)

    def __init__(self, make_cache: Callable[[], ShadowKVCache], dense_below: int):
        super().__init__()
        self._make_cache = make_cache
        self.dense_below = dense_below
        self.shadow: ShadowKVCache | None = None  # set by a prefill of at least dense_below tokens
        self.decoding = False  # the last update was a decode step of `shadow`

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new tokens' post-RoPE keys and values `[B, H_kv, q, D]`; returns what the
        attention reads: every key and value (prompt, dense mode) or the new token's (decode)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[2]
        if self.shadow is not None:
            if new != 1:
                raise ShadowKVError(f"a ShadowKV cache decodes one token per step, got {new} (no chunked "
                                    "prefill or multi-token steps after the prompt)")
            self.decoding = True
        elif self.keys is None and new >= self.dense_below:
            shadow = self._make_cache()
            shadow.prefill_post_rope(key_states, value_states)
            self.shadow, self.decoding = shadow, False
        else:  # dense: the prompt is short, or this layer stays dense
            self.keys = key_states if self.keys is None else torch.cat([self.keys, key_states], dim=-2)
            self.values = value_states if self.values is None else torch.cat([self.values, value_states], dim=-2)
            key_states, value_states = self.keys, self.values
            self.decoding = False
        _pending.key, _pending.layer = key_states, self
        return key_states, value_states

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None):
        """ShadowKV attention of one decode step: query `[B, H_q, 1, D]` post-RoPE -> `[B, 1, H_q, D]`."""
        if scaling is not None and not math.isclose(scaling, self.shadow.scale or 0.0, rel_tol=1e-9):
            raise ShadowKVError(f"the model scales attention by {scaling}, the ShadowKV cache by {self.shadow.scale}")
        if query.shape[2] != 1:
            raise ShadowKVError(f"a ShadowKV cache decodes one token per step, got {query.shape[2]} queries")
        out = self.shadow.decode_post_rope(query[:, :, 0], key[:, :, 0], value[:, :, 0])  # [B, H_q, D]
        return out[:, None]

    # -- what transformers asks of a layer --------------------------------------------------------------

    def get_seq_length(self) -> int:
        if self.shadow is not None:
            return self.shadow.length
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.shadow is not None:
            self.shadow.select_batch(indices)
        elif self.keys is not None:
            self.keys, self.values = self.keys[indices], self.values[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.shadow is not None:
            self.shadow.select_batch(torch.arange(self.shadow.batch).repeat_interleave(repeats))
        elif self.keys is not None:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (transformers passes a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop: pass a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0:
            return
        if self.shadow is not None:
            try:
                self.shadow.crop_generated(-tokens_to_remove)
            except ValueError as exc:
                raise ShadowKVError(f"crop: {exc}") from None
        elif self.keys is not None:
            self.keys, self.values = self.keys[..., :tokens_to_remove, :], self.values[..., :tokens_to_remove, :]

    def reset(self) -> None:
        self.keys = self.values = self.shadow = None
        self.decoding = self.is_initialized = False

    def resident_bytes(self) -> int:
        if self.shadow is not None:
            return self.shadow.resident_bytes()
        return _dense_bytes(self)

    def offloaded_bytes(self) -> int:
        return 0 if self.shadow is None else self.shadow.offloaded_bytes()


class ShadowKVModelCache(Cache):
    """A transformers `Cache` of one `ShadowKVCacheLayer` per full-attention decoder layer and
    transformers' own layer for each other one (see `shadowkv_cache`)."""

    def __init__(self, layers: list[CacheLayerMixin]):
        super().__init__(layers=layers)

    def resident_bytes(self) -> int:
        """Bytes every layer keeps on the compute device."""
        return sum(layer.resident_bytes() if isinstance(layer, ShadowKVCacheLayer) else _dense_bytes(layer)
                   for layer in self.layers)

    def offloaded_bytes(self) -> int:
        """Bytes of values every layer keeps in offload (host) memory."""
        return sum(layer.offloaded_bytes() for layer in self.layers if isinstance(layer, ShadowKVCacheLayer))


def _dense_bytes(layer: CacheLayerMixin) -> int:
    """Bytes of the keys and values a transformers cache layer holds."""
    tensors = (getattr(layer, "keys", None), getattr(layer, "values", None))
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def shadowkv_cache(model, *, rank: int = 160, chunk_size: int = 8, budget: int = 2048, outliers: int = 48,
                   local: int = 32, dense_below: int | None = None,
                   offload_device: torch.device | str = "cpu", gram: str = "float32") -> ShadowKVModelCache:
    """A cache to pass to `model.generate(..., cache=)` (`past_key_values=` in earlier transformers 5
    releases, and in a forward loop), holding one `kernelhub.shadowkv.ShadowKVCache` per full-attention
    decoder layer, with the model's RoPE (that layer type's, where the model has one per type), head
    dimension, GQA groups and attention scale; a layer of another type (a sliding window, chunked
    attention) keeps transformers' own cache layer and the model's own attention, exactly as
    `DynamicCache(config=)` would. Switches the model's attention to ShadowKV's wrapper of its own
    (module docstring). rank, chunk_size, budget, outliers, local, offload_device, gram: as
    `ShadowKVCache`; dense_below: prompts shorter than this stay dense and exact (default
    budget + local + outliers * chunk_size)."""
    config = _text_config(model)
    layer_types = _layer_types(config)
    kinds = {layer_type for layer_type, _ in layer_types}
    if FULL_ATTENTION not in kinds:
        raise ShadowKVError(f"{type(model).__name__} has no full-attention layer (its layers: "
                            f"{', '.join(sorted(kinds))}); ShadowKV compresses full attention only (use DynamicCache)")
    other = kinds - {FULL_ATTENTION} - set(DYNAMIC_LAYER_TYPE_MAPPING)
    if other:
        raise ShadowKVError(f"layer types {sorted(other)}: transformers has no dynamic cache layer for them here")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ShadowKVError(f"the model caps its attention logits (attn_logit_softcapping="
                            f"{config.attn_logit_softcapping}), which ShadowKV's sparse attention does not")
    rope_type = _rope_type(config, FULL_ATTENTION)
    if rope_type not in SUPPORTED_ROPE:
        raise ShadowKVError(f"rope_scaling type {rope_type!r} is not supported yet: ShadowKV here supports "
                            f"{', '.join(SUPPORTED_ROPE)}")
    inv_freq, attention_scaling = _inv_freq(model, FULL_ATTENTION)
    if attention_scaling != 1.0:
        raise ShadowKVError(f"the model's RoPE scales cos/sin by {attention_scaling}; ShadowKV supports "
                            "pure rotations only")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    inv_freq = inv_freq.detach().clone()
    if 2 * inv_freq.numel() != head_dim:
        raise ShadowKVError(f"the model rotates {2 * inv_freq.numel()} of its head dimension's {head_dim} "
                            "channels (partial RoPE): not supported")
    attention = _attention_modules(model)
    full_layers = [i for i, (layer_type, _) in enumerate(layer_types) if layer_type == FULL_ATTENTION]
    if full_layers[0] in attention:
        _refuse_other_rope_forms(attention[full_layers[0]], inv_freq)
    # Each layer's softmax scale is its attention module's (Granite's attention_multiplier, Gemma's
    # query_pre_attn_scalar ** -0.5); where a model keeps none, 1 / sqrt(D).
    scales = {i: float(attention[i].scaling) if i in attention else head_dim ** -0.5 for i in full_layers}
    if dense_below is None:
        dense_below = budget + local + outliers * chunk_size
    if isinstance(dense_below, bool) or not isinstance(dense_below, int) or dense_below < 0:
        raise ValueError(f"dense_below: expected an int >= 0, got {dense_below!r}")
    settings = dict(rank=rank, chunk_size=chunk_size, budget=budget, outliers=outliers, local=local,
                    offload_device=offload_device, inv_freq=inv_freq, gram=gram)
    for scale in set(scales.values()):
        ShadowKVCache(**settings, scale=scale)  # checks every argument now, not at the first prefill
    _install_attention(model)
    return ShadowKVModelCache([
        ShadowKVCacheLayer(functools.partial(ShadowKVCache, **settings, scale=scales[i]), dense_below)
        if layer_type == FULL_ATTENTION else DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**arguments)
        for i, (layer_type, arguments) in enumerate(layer_types)])
