"""How faithful a ShadowKV decode step is to dense attention over the exact cache.

Metrics of one decode step (`decode_fidelity`):
- key_rel_error: ||K - a @ basis|| / ||K|| of the merged pre-RoPE keys of the candidate chunks;
- oracle_recall: share of the oracle top-k chunks that were selected, the oracle choosing among
  the same candidates (not outliers, not the local window) by true attention mass per chunk
  (the softmax over every token, summed over the chunk, max over the query heads of a group);
- mass_covered: share of the true attention probability on tokens the step attended to
  (outliers, local window, selected chunks, generated tokens), averaged over query heads;
- output_rel_error: ||out - dense|| / ||dense|| of the attention output;
- needles_found: share of planted needle chunks among the attended tokens.
"""

from __future__ import annotations

import math

import torch

from kernelhub.reference.rope import apply_rope, rope_tables
from kernelhub.shadowkv.cache import ShadowKVCache, gqa_attention


def _exact_sequence(k, v, queries, new_k, new_v, rope_theta):
    """Post-RoPE keys, values [B, H_kv, S + steps, D] and post-RoPE queries [steps, B, H_q, D], float32."""
    batch, heads, seq, head_dim = k.shape
    steps = queries.shape[0]
    cos, sin = rope_tables(seq + steps, head_dim, rope_theta, device=k.device)
    positions = torch.arange(seq + steps, device=k.device)
    keys = apply_rope(torch.cat([k, new_k.permute(1, 2, 0, 3)], dim=2), positions.expand(batch, heads, -1), cos, sin)
    values = torch.cat([v, new_v.permute(1, 2, 0, 3)], dim=2).to(torch.float32)
    q = apply_rope(queries, positions[seq:, None, None].expand(queries.shape[:3]), cos, sin)
    return keys, values, q


def dense_decode(k: torch.Tensor, v: torch.Tensor, queries: torch.Tensor, new_k: torch.Tensor,
                 new_v: torch.Tensor, rope_theta: float = 500000.0) -> list[torch.Tensor]:
    """Exact attention outputs of each decode step over the full cache, float32.

    k, v [B, H_kv, S, D] pre-RoPE prefill; queries [steps, B, H_q, D], new_k/new_v [steps, B, H_kv, D].
    """
    keys, values, q = _exact_sequence(k, v, queries, new_k, new_v, rope_theta)
    seq = k.shape[2]
    return [gqa_attention(q[t], keys[:, :, :seq + t + 1], values[:, :, :seq + t + 1]) for t in range(q.shape[0])]


def _last_step_probabilities(k, v, queries, new_k, new_v, rope_theta) -> torch.Tensor:
    """Dense attention probabilities [B, H_q, S + steps] of the last decode step."""
    keys, _, q = _exact_sequence(k, v, queries, new_k, new_v, rope_theta)
    batch, heads, _, head_dim = keys.shape
    q = q[-1].view(batch, heads, -1, head_dim)
    scores = torch.einsum("bhgd,bhtd->bhgt", q, keys) / math.sqrt(head_dim)
    return scores.softmax(dim=-1).flatten(1, 2)


def decode_fidelity(cache: ShadowKVCache, k: torch.Tensor, v: torch.Tensor, queries: torch.Tensor,
                    new_k: torch.Tensor, new_v: torch.Tensor, needles: torch.Tensor | None = None) -> dict:
    """Prefill `cache` with (k, v), decode every step, and measure the last step (module docstring)."""
    cache.prefill(k, v)
    for step in range(queries.shape[0]):
        out = cache.decode(queries[step], new_k[step], new_v[step])
    if cache.n_chunks == 0 or cache.selected_chunks is None:
        raise ValueError("decode_fidelity: the prefill is too short for any chunk to be selected "
                         f"(S = {k.shape[2]}, local window {cache.local}); nothing to measure")
    dense = dense_decode(k, v, queries, new_k, new_v, cache.rope_theta)[-1]
    batch, heads, seq, head_dim = k.shape
    chunk = cache.chunk_size
    candidate_end = cache.n_chunks * chunk

    merged = k[:, :, :candidate_end].transpose(1, 2).reshape(batch, candidate_end, heads * head_dim).float()
    approx = cache.a.float() @ cache.basis.float()
    key_rel_error = float((merged - approx).norm() / merged.norm())

    probs = _last_step_probabilities(k, v, queries, new_k, new_v, cache.rope_theta)  # [B, H_q, S + steps]
    group = probs.shape[1] // heads
    attended = torch.zeros(batch, heads, probs.shape[-1], dtype=torch.bool, device=k.device)
    attended[:, :, candidate_end:] = True  # local window and generated tokens
    for idx in (cache.outlier_idx, cache.selected_chunks):
        tokens = (idx[..., None] * chunk + torch.arange(chunk, device=k.device)).flatten(-2)
        attended.scatter_(2, tokens, True)
    attended_q = attended.repeat_interleave(group, dim=1)  # [B, H_q, T]
    mass_covered = float((probs * attended_q).sum(-1).mean())

    chunk_mass = probs[..., :candidate_end].reshape(batch, heads, group, cache.n_chunks, chunk).sum(-1).amax(2)
    chunk_mass = chunk_mass.masked_fill(cache.exclude, -1.0)
    selected = cache.selected_chunks
    oracle = chunk_mass.topk(selected.shape[-1], dim=-1).indices
    hits = (selected[..., :, None] == oracle[..., None, :]).any(-1).float()
    report = {
        "key_rel_error": key_rel_error,
        "oracle_recall": float(hits.mean()),
        "mass_covered": mass_covered,
        "output_rel_error": float((out.float() - dense).norm() / dense.norm()),
    }
    if needles is not None:
        needle_tokens = needles * chunk
        report["needles_found"] = float(torch.gather(attended, 2, needle_tokens).float().mean())
    return report
