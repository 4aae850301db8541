"""ShadowKV's low-rank pre-RoPE key cache, the specification (plain PyTorch, float64 where it matters).

The keys of one sequence, merged over its KV heads, form a token-major matrix

    K_b = k[b].transpose(0, 1).reshape(S, H_kv * D)        # K_b[s, h * D + d] = k[b, h, s, d]

which is close to rank r (ShadowKV keeps r = 160 of Llama-3-8B's H_kv * D = 1024 columns). The
factorisation is the truncated SVD, the best rank-r approximation in the least-squares sense
(Eckart-Young):

    K_b = U diag(sigma) V^T,   a_b = U[:, :r] * sigma[:r]   [S, r],   basis_b = V^T[:r]   [r, H_kv * D]

so `a_b @ basis_b` is the optimum; a and basis themselves are unique only up to a sign (or a
rotation among equal singular values), so compare reconstructions, not factors.

Decode rebuilds the post-RoPE keys of chosen tokens from the factors:

    out[b, h, i] = rope(a_b[p] @ basis_b[:, h * D:(h + 1) * D], p),     p = positions[b, h, i]

with `kernelhub.reference.rope` (Llama's rotate-half form); the RoPE rows may be given apart from
the positions (`rope_positions`), for tables that hold only the rows of the chosen tokens.

`gram` is the intermediate the Triton path computes first, `G_b = K_b^T K_b` in float32.

`lowrank_keys_int8_gram` is the faster, near-optimal method `lowrank_keys(..., gram="int8")` names:
the basis from the Gram matrix of the keys quantised per channel (column of K_b) to int8,

    Q_b, s_b = int8_gemm.quantize_int8(K_b^T) (its rows are K_b's columns),   G_q = diag(s_b) Q_b Q_b^T diag(s_b)

(Q_b Q_b^T is a sum of integers, exact), and a_b = K_b basis_b^T of the keys themselves.
"""

from __future__ import annotations

import torch

from kernelhub.reference.int8_gemm import quantize_int8
from kernelhub.reference.rope import apply_rope


def merge_heads(k: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys `k [B, H_kv, S, D]` -> token-major `[B, S, H_kv * D]` (column h * D + d = head h, dim d)."""
    batch, heads, seq, head_dim = k.shape
    return k.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def gram(k: torch.Tensor) -> torch.Tensor:
    """`G_b = K_b^T K_b` of the merged keys: float32 `[B, H_kv * D, H_kv * D]`, summed in float64."""
    keys = merge_heads(k).to(torch.float64)
    return (keys.transpose(1, 2) @ keys).to(torch.float32)


def lowrank_keys(k: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factorisation of the merged keys: (a `[B, S, rank]`, basis `[B, rank, H_kv * D]`).

    Both in k.dtype, from the float64 SVD; `a @ basis` approximates `merge_heads(k)`.
    """
    keys = merge_heads(k).to(torch.float64)
    u, sigma, vh = torch.linalg.svd(keys, full_matrices=False)
    a = u[..., :rank] * sigma[..., None, :rank]
    basis = vh[..., :rank, :]
    return a.to(k.dtype), basis.to(k.dtype)


def channel_quantized_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged keys quantised per channel: int8 `q [B, S, H_kv * D]` and float32 `scale [B, H_kv * D]`,
    `quantize_int8` of each `K_b^T` (a channel's scale is its max |k| / 127)."""
    batch, heads, seq, head_dim = k.shape
    columns = merge_heads(k).transpose(1, 2).reshape(batch * heads * head_dim, seq)  # [B * HD, S]
    q, scale = quantize_int8(columns)
    return q.reshape(batch, heads * head_dim, seq).transpose(1, 2), scale.reshape(batch, heads * head_dim)


def lowrank_keys_int8_gram(k: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a `[B, S, rank]`, basis `[B, rank, H_kv * D]`) in k.dtype: basis the top-`rank` eigenvectors
    of G_q (the Gram matrix of `channel_quantized_keys`), a = K_b basis^T; float64 throughout."""
    q, scale = channel_quantized_keys(k)
    exact = q.to(torch.float64)
    scale = scale.to(torch.float64)
    gram_q = (exact.transpose(1, 2) @ exact) * scale[:, :, None] * scale[:, None, :]
    _, vectors = torch.linalg.eigh(gram_q)  # ascending eigenvalues
    basis = vectors[..., -rank:].flip(-1).transpose(1, 2)  # [B, rank, HD]
    a = merge_heads(k).to(torch.float64) @ basis.transpose(1, 2)
    return a.to(k.dtype), basis.to(k.dtype)


def reconstruct_keys(a: torch.Tensor, basis: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, rope_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Post-RoPE keys of the tokens at `positions [B, H_kv, n]`: `[B, H_kv, n, D]` in a.dtype.

    a `[B, S, r]`, basis `[B, r, H_kv * D]`, cos/sin float32 `[P, D]` (`rope_tables`, or
    `rope_rows`). Token i's rows of a are `positions[..., i]`; its rows of cos and sin are
    `rope_positions[..., i]` (default: the same positions, so the tables are indexed by position).
    The product is formed in float64 and RoPE applied in float32, then rounded once to a.dtype.
    """
    batch, heads, _ = positions.shape
    rank = a.shape[2]
    head_dim = basis.shape[2] // heads
    positions = positions.to(torch.int64)
    rows = a[torch.arange(batch, device=a.device)[:, None, None], positions]  # [B, H_kv, n, r]
    per_head = basis.reshape(batch, rank, heads, head_dim).permute(0, 2, 1, 3)  # [B, H_kv, r, D]
    keys = (rows.to(torch.float64) @ per_head.to(torch.float64)).to(torch.float32)  # [B, H_kv, n, D]
    rope_rows = positions if rope_positions is None else rope_positions.to(torch.int64)
    return apply_rope(keys, rope_rows, cos, sin).to(a.dtype)
