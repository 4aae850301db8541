"""Sparse gather of value chunks, the specification (ShadowKV's value fetch, in plain PyTorch).

The value cache is stored chunk-major, `values [B, H_kv, C, chunk, D]`: chunk c of head h holds
tokens c*chunk ... c*chunk + chunk - 1. At each decode step a selection `chunk_idx [B, H_kv, k]`
names the chunks each KV head attends to, and they are gathered side by side:

    out[b, h, i*chunk + t, :] = values[b, h, chunk_idx[b, h, i], t, :]      out [B, H_kv, k*chunk, D]

Repeated and unsorted indices are allowed; the order of `chunk_idx` is the order of the output.

Reuse of the previous step's gather: `resident [B, H_kv, k_prev*chunk, D]` holds the chunks named
by `resident_idx [B, H_kv, k_prev]` (laid out like `out`). A selected chunk found in `resident_idx`
(same b and h) may be copied from `resident` instead of from `values`; when `resident` holds what
it claims to, the result is the same either way. `sparse_gather_with_resident` spells that rule
out, so tests can tell which of the two sources a kernel read.
"""

from __future__ import annotations

import torch


def sparse_gather(values: torch.Tensor, chunk_idx: torch.Tensor) -> torch.Tensor:
    """`values [B, H_kv, C, chunk, D]`, integer `chunk_idx [B, H_kv, k]` -> `[B, H_kv, k*chunk, D]`.

    The result lives on `values.device` and has `values.dtype`.
    """
    batch, heads = values.shape[:2]
    idx = chunk_idx.to(device=values.device, dtype=torch.int64)
    b = torch.arange(batch, device=values.device)[:, None, None]  # [B, 1, 1]
    h = torch.arange(heads, device=values.device)[None, :, None]  # [1, H_kv, 1]
    chunks = values[b, h, idx]  # [B, H_kv, k, chunk, D]: chunks[b, h, i] = values[b, h, idx[b, h, i]]
    return chunks.flatten(2, 3)


def sparse_gather_with_resident(values: torch.Tensor, chunk_idx: torch.Tensor, resident_idx: torch.Tensor,
                                resident: torch.Tensor) -> torch.Tensor:
    """`sparse_gather`, taking every selected chunk that `resident_idx` names from `resident`.

    Slow (a Python loop over every selected chunk); for tests. Where `resident_idx` names a chunk
    twice, the first slot is used.
    """
    chunk = values.shape[3]
    out = sparse_gather(values, chunk_idx)
    for b in range(chunk_idx.shape[0]):
        for h in range(chunk_idx.shape[1]):
            slots = resident_idx[b, h].tolist()
            for i, c in enumerate(chunk_idx[b, h].tolist()):
                if c in slots:
                    j = slots.index(c)
                    out[b, h, i * chunk:(i + 1) * chunk] = resident[b, h, j * chunk:(j + 1) * chunk]
    return out
