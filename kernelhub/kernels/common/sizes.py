"""Sizes every family computes: powers of two (Triton blocks are powers of two) and element sizes."""

from __future__ import annotations

import torch


def next_pow2(x: int, minimum: int = 1) -> int:
    """The smallest power of two >= x and >= `minimum` (1 for x <= 1): the block that covers x.

    `next_pow2(40) == 64`, `next_pow2(5, minimum=16) == 16` (tl.dot needs 16 on every axis).
    """
    return max(minimum, 1 << (max(1, x) - 1).bit_length())


def element_bytes(dtype: str) -> int:
    """Bytes per element of a torch dtype named as in the database key: `element_bytes("bfloat16") == 2`."""
    return getattr(torch, dtype).itemsize
