"""Rotary position embedding, Llama's rotate-half form: the one RoPE convention of kernelhub.

    inv_freq[i] = theta ** (-2 i / D)                  i = 0 .. D/2 - 1
    angle[p, i] = p * inv_freq[i]
    cos[p] = concat(cos(angle[p]), cos(angle[p]))      [max_position, D]: each half repeated
    sin[p] = concat(sin(angle[p]), sin(angle[p]))
    rope(x, p) = x * cos[p] + rotate_half(x) * sin[p],  rotate_half(x) = concat(-x[D/2:], x[:D/2])

Tables are computed in float64 and stored in float32, so every implementation reads the same
numbers.
"""

from __future__ import annotations

import torch


def rope_rows(positions: torch.Tensor, head_dim: int, theta: float = 500000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) rows of the tables at integer `positions [n]`, each float32 `[n, head_dim]`.

    Bit-identical to the same rows of `rope_tables`, so a caller may build only the rows it needs.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim: RoPE needs an even head dimension, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angle = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [n, D/2]
    angle = torch.cat([angle, angle], dim=-1)  # [n, D]
    return angle.cos().to(torch.float32), angle.sin().to(torch.float32)


def rope_tables(max_position: int, head_dim: int, theta: float = 500000.0,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each float32 `[max_position, head_dim]`."""
    return rope_rows(torch.arange(max_position, device=device), head_dim, theta)


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
