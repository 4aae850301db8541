"""Sparse gather registration: the tuned `sparse_gather` spec, whose inputs carry a previous step's
resident chunks as a decode step does."""

from __future__ import annotations

import torch

from kernelhub import checking
from kernelhub.kernels.sparse_gather import space
from kernelhub.kernels.sparse_gather.kernel import sparse_gather_triton
from kernelhub.reference import sparse_gather as ref
from kernelhub.registry import FamilySpec, register

# Share of the chunks selected at one step that were also selected at the previous one (ShadowKV).
RESIDENT_OVERLAP = 0.6


def make_inputs(shape, dtype: str, device, seed: int) -> dict:
    """Random `values [B, H_kv, C, chunk, D]` and a selection `chunk_idx [B, H_kv, k]` (int64) of
    distinct chunks in random order (uniform with repeats where k > C), all generated on `device`.

    Where `space.has_resident(shape)`, also the previous step's gather: `resident_idx [B, H_kv, k]`
    holds 60% of the selected chunks and, for the rest, chunks not selected now (-1, an empty slot,
    once those run out), shuffled; `resident` holds those chunks (zeros for empty slots).
    """
    batch, heads, num_chunks, chunk, d, k = shape
    gen = checking.generator(device, seed)
    on = dict(device=device, generator=gen)
    values = torch.randn(batch, heads, num_chunks, chunk, d, dtype=getattr(torch, dtype), **on)
    if k <= num_chunks:
        order = torch.rand(batch, heads, num_chunks, **on).argsort(dim=-1)  # a random permutation per head
        chunk_idx = order[..., :k]
    else:
        order = None
        chunk_idx = torch.randint(0, num_chunks, (batch, heads, k), **on)
    inputs = {"values": values, "chunk_idx": chunk_idx}
    if not space.has_resident(shape):
        return inputs

    n_hits = round(RESIDENT_OVERLAP * k)
    kept = torch.randperm(k, **on)[:n_hits]
    hits = chunk_idx[..., kept]  # [B, H_kv, n_hits]
    unselected = order[..., k:] if order is not None else chunk_idx.new_empty((batch, heads, 0))
    misses = unselected[..., :k - n_hits]
    empty = chunk_idx.new_full((batch, heads, k - n_hits - misses.shape[-1]), -1)
    resident_idx = torch.cat([hits, misses, empty], dim=-1)[..., torch.randperm(k, **on)]
    resident = ref.sparse_gather(values, resident_idx.clamp(min=0))
    resident.view(batch, heads, k, chunk, d).masked_fill_((resident_idx < 0)[..., None, None], 0.0)
    inputs.update(resident_idx=resident_idx, resident=resident)
    return inputs


def reference(inputs: dict) -> torch.Tensor:
    return ref.sparse_gather(inputs["values"], inputs["chunk_idx"])


def launch(inputs: dict, config: dict, out: torch.Tensor) -> torch.Tensor:
    return sparse_gather_triton(inputs["values"], inputs["chunk_idx"], config=config, out=out,
                                resident_idx=inputs.get("resident_idx"), resident=inputs.get("resident"))


def new_output(inputs: dict) -> torch.Tensor:
    batch, heads, _, chunk, d = inputs["values"].shape
    k = inputs["chunk_idx"].shape[-1]
    return torch.empty(batch, heads, k * chunk, d, dtype=inputs["values"].dtype, device=inputs["chunk_idx"].device)


def compare(actual: torch.Tensor, expected: torch.Tensor, inputs: dict) -> str | None:
    return checking.mismatch_exact(actual, expected)  # a copy: bit for bit


SPEC = register(FamilySpec.from_space(
    space, name="sparse_gather",
    summary="gather the selected value chunks of every KV head (ShadowKV), reusing the previous step's",
    make_inputs=make_inputs, reference=reference, launch=launch, new_output=new_output, compare=compare,
))
