"""Landmark chunk selection (ShadowKV), the specification: readable PyTorch, slow is fine.

ShadowKV cuts the post-RoPE keys of a long context into chunks of `chunk_size` consecutive tokens
and summarises each chunk by its landmark, the mean of its keys. At each decode step the query
scores every chunk by its landmark, and only the top-k chunks per KV head are fetched.

    landmarks:       L[b, h, c] = mean_{t in chunk c} k_rope[b, h, t]                 (float32 mean)
                     chunk c = tokens c * chunk_size .. (c + 1) * chunk_size - 1, c < C = S // chunk_size;
                     the last S % chunk_size tokens form no chunk (ShadowKV keeps them exact in its
                     local window)
    outlier_chunks:  o[b, h, c] = min_{t in chunk c} cos(k_rope[b, h, t], L[b, h, c])   (float32)
                     the n chunks of lowest o, ascending o (chunks their landmark summarises worst;
                     ShadowKV keeps them exact on the GPU)
    landmark_topk:   g = H_q // H_kv; query head j belongs to KV head j // g
                     s[b, j, c] = q[b, j] . L[b, j // g, c] / sqrt(D)     (-inf where exclude[b, j // g, c])
                     p[b, j, :] = softmax_c(s[b, j, :])
                     score[b, h, c] = max_{j in group h} p[b, j, c]        (-inf where excluded)
                     the k chunks of highest score per (b, h), by descending score

cos(x, y) = x . y / (max(|x|, eps) * max(|y|, eps)) with eps = 1e-8 (torch.nn.functional.cosine_similarity).
All arithmetic is float32; ties between equal scores may be broken either way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def landmarks(k_rope: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
    """Chunk means of `k_rope [B, H_kv, S, D]` -> `[B, H_kv, S // chunk_size, D]` in k_rope.dtype."""
    b, h, s, d = k_rope.shape
    c = s // chunk_size
    chunks = k_rope[:, :, :c * chunk_size].to(torch.float32).reshape(b, h, c, chunk_size, d)
    return chunks.mean(dim=3).to(k_rope.dtype)


def outlier_scores(k_rope: torch.Tensor, landmarks: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
    """float32 `[B, H_kv, C]`: each chunk's lowest cosine similarity between a key and its landmark."""
    b, h, c, d = landmarks.shape
    keys = k_rope[:, :, :c * chunk_size].to(torch.float32).reshape(b, h, c, chunk_size, d)
    cos = F.cosine_similarity(keys, landmarks.to(torch.float32)[:, :, :, None, :], dim=-1, eps=1e-8)
    return cos.amin(dim=-1)


def outlier_chunks(k_rope: torch.Tensor, landmarks: torch.Tensor, n: int, chunk_size: int = 8) -> torch.Tensor:
    """int64 `[B, H_kv, n]`: the n chunks of lowest `outlier_scores`, ascending score."""
    return torch.topk(outlier_scores(k_rope, landmarks, chunk_size), n, dim=-1, largest=False).indices


def chunk_scores(q: torch.Tensor, landmarks: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """float32 `[B, H_kv, C]`: the group-max softmax probability of every chunk (-inf where excluded).

    q [B, H_q, D], landmarks [B, H_kv, C, D], exclude bool [B, H_kv, C] or None.
    """
    b, h_q, d = q.shape
    h_kv, c = landmarks.shape[1], landmarks.shape[2]
    g = h_q // h_kv
    per_query_head = landmarks.to(torch.float32).repeat_interleave(g, dim=1)  # [B, H_q, C, D]
    s = torch.einsum("bjd,bjcd->bjc", q.to(torch.float32), per_query_head) / math.sqrt(d)  # [B, H_q, C]
    if exclude is not None:
        s = s.masked_fill(exclude.repeat_interleave(g, dim=1), float("-inf"))
    p = torch.softmax(s, dim=-1)  # [B, H_q, C]: the full probability matrix
    score = p.reshape(b, h_kv, g, c).amax(dim=2)  # [B, H_kv, C]
    if exclude is not None:
        score = score.masked_fill(exclude, float("-inf"))
    return score


def landmark_topk(q: torch.Tensor, landmarks: torch.Tensor, k: int,
                  exclude: torch.Tensor | None = None) -> torch.Tensor:
    """int64 `[B, H_kv, k]`: the k chunks of highest `chunk_scores` per KV head, by descending score."""
    return torch.topk(chunk_scores(q, landmarks, exclude), k, dim=-1, sorted=True).indices


def selected_scores(q: torch.Tensor, landmarks: torch.Tensor, idx: torch.Tensor,
                    exclude: torch.Tensor | None = None) -> torch.Tensor:
    """float32 `[B, H_kv, k]`: the `chunk_scores` of the chunks `idx [B, H_kv, k]` (-inf if excluded)."""
    return chunk_scores(q, landmarks, exclude).gather(-1, idx)
