"""Realistic synthetic KV caches for measuring ShadowKV without model weights.

What the generator reproduces, and why it matters to ShadowKV:
- pre-RoPE keys with a decaying singular spectrum whose right singular vectors mix all KV heads
  (ShadowKV's premise: keys merged over heads are low-rank), a per-head mean direction (real keys
  are not centred, which is what makes chunk landmarks informative) and a few large-magnitude
  channels per head (as seen in real K caches);
- keys of neighbouring tokens that are correlated (a slowly drifting component), so chunks of 8
  tokens are coherent and their mean is a useful landmark;
- queries that attend strongly to a few planted chunks ("needles") on top of a diffuse
  background, so that the right chunks must be found among tens of thousands.
Queries are returned pre-RoPE, planted so that after RoPE at their decode position they point at
the needles' post-RoPE keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernelhub.reference.rope import apply_rope, rope_tables


@dataclass
class SyntheticCache:
    k: torch.Tensor  # [B, H_kv, S, D] pre-RoPE keys at positions 0..S-1
    v: torch.Tensor  # [B, H_kv, S, D]
    queries: torch.Tensor  # [steps, B, H_q, D] pre-RoPE queries at positions S, S+1, ...
    new_k: torch.Tensor  # [steps, B, H_kv, D] pre-RoPE keys of the decoded tokens
    new_v: torch.Tensor  # [steps, B, H_kv, D]
    needles: torch.Tensor  # int64 [B, H_kv, n_needles]: chunk indices the queries were planted on


def inverse_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The pre-RoPE vector whose RoPE at `positions` is `x` (rotation by the opposite angle)."""
    return apply_rope(x, positions, cos, -sin)


def make_synthetic_cache(batch: int, kv_heads: int, q_heads: int, seq_len: int, head_dim: int, *,
                         steps: int = 1, n_needles: int = 4, chunk_size: int = 8, protect_tail: int = 64,
                         spectrum_rank: int = 384, spectrum_decay: float = 40.0, big_channels: int = 4,
                         needle_strength: float | None = None, rope_theta: float = 500000.0, seed: int = 0,
                         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> SyntheticCache:
    """Keys, values, decode queries and planted needles; see the module docstring.

    spectrum_rank/spectrum_decay: the merged keys have singular values exp(-i / spectrum_decay)
    for i < spectrum_rank, plus a small isotropic floor. needle_strength: the logit margin of a
    query head's own needle over the background (default ln(S) + 4). Needles are drawn among chunks that end
    before the last `protect_tail` tokens (so they are not in a local window).
    """
    if needle_strength is None:
        # A query that retrieves a needle must out-score the whole background: with N(0, 1) logits
        # over S tokens that takes a margin of about ln(S); 4 more keeps the needle's share of the
        # attention mass the same at every context length.
        needle_strength = math.log(seq_len) + 4.0
    if q_heads % kv_heads:
        raise ValueError(f"q_heads: expected a multiple of kv_heads={kv_heads}, got {q_heads}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    width = kv_heads * head_dim
    rank = min(spectrum_rank, width)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    basis, _ = torch.linalg.qr(randn(width, rank))  # orthonormal columns shared by all heads
    sigma = torch.exp(-torch.arange(rank, dtype=torch.float32) / spectrum_decay)
    # Coefficients: white noise plus a slowly drifting component (a random walk, normalised), so
    # tokens of one chunk are correlated.
    coeff = randn(batch, seq_len, rank)
    drift = torch.cumsum(randn(batch, seq_len, rank) * 0.1, dim=1)
    drift = drift / drift.std(dim=1, keepdim=True).clamp_min(1e-6)
    coeff = (coeff + 2.0 * drift) * sigma * math.sqrt(width / rank) * 2.0
    merged = coeff @ basis.T + 0.02 * randn(batch, seq_len, width)  # [B, S, H_kv*D]
    k = merged.view(batch, seq_len, kv_heads, head_dim).transpose(1, 2).contiguous()
    k = k + randn(1, kv_heads, 1, head_dim) * 0.5  # per-head mean direction
    channels = torch.randperm(head_dim, generator=gen)[:big_channels]
    k[..., channels] *= 8.0  # a few large-magnitude channels
    v = randn(batch, kv_heads, seq_len, head_dim)

    cos, sin = rope_tables(seq_len + steps, head_dim, rope_theta)
    positions = torch.arange(seq_len).expand(batch, kv_heads, seq_len)

    # Needles: chunks whose pre-RoPE keys carry a distinctive content vector d, drawn inside the
    # keys' dominant subspace (real content lives there; a direction outside it would be exactly
    # what a low-rank cache is allowed to drop), with a magnitude twice the typical key norm.
    n_candidates = max(1, (seq_len - protect_tail) // chunk_size)
    n_needles = min(n_needles, n_candidates)
    needles = torch.stack([torch.randperm(n_candidates, generator=gen)[:n_needles]
                           for _ in range(batch * kv_heads)]).view(batch, kv_heads, -1)
    needle_tokens = (needles[..., None] * chunk_size + torch.arange(chunk_size)).flatten(-2)  # [B, H_kv, n*chunk]
    top = min(32, rank)
    content = randn(batch, n_needles, top) @ basis[:, :top].T  # [B, n, H_kv*D]
    content = content.view(batch, n_needles, kv_heads, head_dim).transpose(1, 2)  # [B, H_kv, n, D]
    content = content / content.norm(dim=-1, keepdim=True)
    magnitude = 2.0 * float(k.norm(dim=-1).mean())
    planted = content.repeat_interleave(chunk_size, dim=2) * magnitude  # [B, H_kv, n*chunk, D]
    k.scatter_add_(2, needle_tokens[..., None].expand(-1, -1, -1, head_dim), planted)
    k_rope = apply_rope(k, positions, cos, sin)
    # What a query must point at, after RoPE: the content as seen at the needle chunk's centre.
    centre = needles * chunk_size + chunk_size // 2
    directions = apply_rope(content, centre, cos, sin)  # [B, H_kv, n, D], unit norm

    group = q_heads // kv_heads
    background_scale = math.sqrt(head_dim) / k_rope.norm(dim=-1).mean()  # background logits ~ N(0, 1)
    queries, new_k, new_v = [], [], []
    for step in range(steps):
        # Each query head of a group leans on one needle and keeps a quarter weight on the others,
        # scaled so that its own needle's tokens score `needle_strength` logits.
        lean = torch.nn.functional.one_hot(torch.arange(group) % n_needles, n_needles).float()
        weights = (0.25 + 0.75 * lean).expand(batch, kv_heads, group, n_needles)
        q_post = torch.einsum("bhgn,bhnd->bhgd", weights, directions) * (needle_strength * math.sqrt(head_dim) / magnitude)
        q_post = q_post + randn(batch, kv_heads, group, head_dim) * background_scale / math.sqrt(head_dim)
        q_post = q_post.reshape(batch, q_heads, head_dim)
        position = torch.full((batch, q_heads), seq_len + step)
        queries.append(inverse_rope(q_post, position, cos, sin))
        new_k.append(randn(batch, kv_heads, head_dim) + k[:, :, -1])  # near the last key
        new_v.append(randn(batch, kv_heads, head_dim))

    def out(t):
        return t.to(device=device, dtype=dtype)

    return SyntheticCache(k=out(k), v=out(v), queries=out(torch.stack(queries)), new_k=out(torch.stack(new_k)),
                          new_v=out(torch.stack(new_v)), needles=needles.to(device))
