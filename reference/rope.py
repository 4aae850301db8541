"""Rotary position embedding, Llama's rotate-half form: the one RoPE convention of kernelhub.

    inv_freq[i] = theta ** (-2 i / D)                  i = 0 .. D/2 - 1 (or a model's own, below)
    angle[p, i] = p * inv_freq[i]
    cos[p] = concat(cos(angle[p]), cos(angle[p]))      [max_position, D]: each half repeated
    sin[p] = concat(sin(angle[p]), sin(angle[p]))
    rope(x, p) = x * cos[p] + rotate_half(x) * sin[p],  rotate_half(x) = concat(-x[D/2:], x[:D/2])

By default the inverse frequencies and the angles are computed in float64 and the tables stored in
float32, so every implementation reads the same numbers. A model brings its own inverse frequencies
(`inv_freq=`: Llama-3.1's rescaled ones, say, as transformers' rotary embedding holds them, in
float32); the angles are then computed in their dtype, as the model computes them, so the tables
are the model's own bit for bit.
"""

from __future__ import annotations

import torch


def inverse_frequencies(head_dim: int, theta: float = 500000.0, *, device: torch.device | str | None = None
                        ) -> torch.Tensor:
    """float64 `[head_dim / 2]`: `theta ** (-2 i / head_dim)`, RoPE without rescaling."""
    if head_dim % 2:
        raise ValueError(f"head_dim: RoPE needs an even head dimension, got {head_dim}")
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)


def rope_rows(positions: torch.Tensor, head_dim: int | None = None, theta: float = 500000.0, *,
              inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) rows of the tables at integer `positions [n]`, each float32 `[n, D]`.

    From `inv_freq [D / 2]` when given (its dtype is the angles'), else from `head_dim` and `theta`.
    Bit-identical to the same rows of `rope_tables`, so a caller may build only the rows it needs.
    """
    if inv_freq is None:
        if head_dim is None:
            raise TypeError("rope_rows: pass head_dim (and theta) or inv_freq")
        inv_freq = inverse_frequencies(head_dim, theta, device=positions.device)
    inv_freq = inv_freq.to(positions.device)
    angle = positions.to(inv_freq.dtype)[:, None] * inv_freq[None, :]  # [n, D/2]
    half_cos, half_sin = angle.cos().to(torch.float32), angle.sin().to(torch.float32)
    return torch.cat([half_cos, half_cos], dim=-1), torch.cat([half_sin, half_sin], dim=-1)  # each half repeated


def rope_tables(max_position: int, head_dim: int | None = None, theta: float = 500000.0,
                device: torch.device | str | None = None, *, inv_freq: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each float32 `[max_position, D]` (arguments as `rope_rows`)."""
    return rope_rows(torch.arange(max_position, device=device), head_dim, theta, inv_freq=inv_freq)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of `x [..., D]` at integer `positions` (shape `x.shape[:-1]`), computed in float32.

    Returns float32; callers cast to their storage dtype.
    """
    c = cos[positions]  # [..., D]
    s = sin[positions]
    x = x.to(torch.float32)
    return x * c + rotate_half(x) * s


def undo_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of `apply_rope` (a rotation by the opposite angle): pre-RoPE `x [..., D]` from its
    post-RoPE form, computed in float32. Exact up to float32 rounding (cos^2 + sin^2 = 1)."""
    c = cos[positions]
    s = sin[positions]
    x = x.to(torch.float32)
    return x * c - rotate_half(x) * s
