"""The CPU path of `lowrank_keys(k, rank, gram="int8")`: the Gram matrix of the keys quantised to
int8 per channel, summed exactly in int32 by oneDNN's int8 GEMM, then the float32 path's `eigh`
and a float32 projection of the keys themselves.

    q, s = per-channel int8 quantisation of K_b          (`reference.lowrank_keys.channel_quantized_keys`)
    G_q  = diag(s) (Q^T Q) diag(s)                       (Q^T Q exact in int32; scaled in float64)
    basis = top eigenvectors of G_q,   a = K_b basis^T    (the unquantised keys, float32 accumulation)

Why: without AMX a float32 Gram runs at the core's float32 FMA rate, which bounds the float32
method; the int8 product of the same shape ran 4 times faster on this project's AVX512-VNNI VM
(0.07 s against 0.31 s at S = 32K, benchmarks/results/cpu_lowrank_keys.md). Only the basis sees
the quantisation (a is projected from the exact keys), and what it perturbs is how the directions
near the rank cut mix: on the benchmark's keys the error grows by about 0.1% of itself from
S = 2K on. (With no more tokens than H_kv * D the op computes the float32 Gram instead: ops.py.)

Every pass reads the keys `[B, H_kv, S, D]` where they lie (a cache slice in place, any strides),
in blocks of tokens: no merged `[B, S, H_kv * D]` float copy is made.
"""

from __future__ import annotations

import torch

from kernelhub.kernels.int8_gemm.cpu import int_mm_cpu

# Tokens per block of every pass: a [4096, D] float32 block (2 MiB at D = 128) stays in the cache
# between the operations on it.
_TOKENS_PER_BLOCK = 4096
# int32 holds a sum of S products of int8 values in [-127, 127] for S < 2**31 / 127**2 = 133,144:
# longer sequences are summed in chunks of this many tokens, then in int64.
MAX_TOKENS_PER_PRODUCT = 1 << 17
# Columns per block row of the Gram matrix's lower block triangle (H_kv * D = 1024: 9/16 of the work).
_GRAM_BLOCK = 128
_DIVISOR_127 = torch.tensor([127.0])  # a tensor divisor, as the reference's
_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def _blocks(seq: int):
    return ((start, min(seq, start + _TOKENS_PER_BLOCK)) for start in range(0, seq, _TOKENS_PER_BLOCK))


def channel_scales(k: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """float32 `[B, H_kv, D]`: max over tokens of |k| per channel, divided by a tensor 127 (NaN
    where a channel holds NaN, Inf where it holds Inf and no NaN). One read of k."""
    batch, heads, seq, head_dim = k.shape
    absmax = torch.zeros(batch, heads, head_dim, dtype=torch.float32)
    for b in range(batch):
        for h in range(heads):
            for start, stop in _blocks(seq):
                keys, into = k[b, h, start:stop], scratch[:stop - start]
                block = torch.abs(keys, out=into) if keys.dtype == torch.float32 else into.copy_(keys).abs_()
                torch.maximum(absmax[b, h], block.amax(dim=0), out=absmax[b, h])  # NaN propagates
    return torch.div(absmax, _DIVISOR_127)


def quantize_channels(k: torch.Tensor, scale: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """int8 `[B, S, H_kv * D]`: the merged keys quantised with the finite per-channel `scale
    [B, H_kv, D]`, bit for bit `reference.lowrank_keys.channel_quantized_keys`. A channel whose
    scale is normal needs no clamp (its quotients stay below 127.5: kernelhub/kernels/int8_gemm/cpu.py);
    a subnormal one gets the reference's clamp, an all-zero one (0 / 0) q = 0."""
    batch, heads, seq, head_dim = k.shape
    q = torch.empty(batch, seq, heads * head_dim, dtype=torch.int8)
    needs_clamp = bool((scale < _SMALLEST_NORMAL).any())
    for b in range(batch):
        for h in range(heads):
            columns = slice(h * head_dim, (h + 1) * head_dim)
            for start, stop in _blocks(seq):
                quotient = torch.div(k[b, h, start:stop], scale[b, h], out=scratch[:stop - start]).round_()
                if needs_clamp:
                    quotient.clamp_(-127, 127).nan_to_num_(0.0)
                q[b, start:stop, columns].copy_(quotient)
    return q


def _integer_gram(q: torch.Tensor) -> torch.Tensor:
    """int8 `q [S, HD]` -> `Q^T Q`, exact, its lower block triangle (above it 0): int32 when S fits
    one product, int64 summed over chunks of tokens otherwise."""
    seq, hd = q.shape
    chunks = [q[start:start + MAX_TOKENS_PER_PRODUCT] for start in range(0, seq, MAX_TOKENS_PER_PRODUCT)]
    total = torch.zeros(hd, hd, dtype=torch.int32 if len(chunks) == 1 else torch.int64)
    for chunk in chunks:
        for start in range(0, hd, _GRAM_BLOCK):
            stop = min(hd, start + _GRAM_BLOCK)
            block = int_mm_cpu(chunk[:, start:stop].t(), chunk[:, :stop])  # int32 [stop - start, stop]
            total[start:stop, :stop] += block
    return total


def int8_gram(k: torch.Tensor) -> torch.Tensor | None:
    """float32 `[B, HD, HD]`: the lower block triangle of each G_q divided by the square of its
    largest scale (the eigenvectors do not change with the scale, and keys of any magnitude stay
    finite), or None when k holds NaN or Inf (its scales say so)."""
    batch, heads, seq, head_dim = k.shape
    scratch = torch.empty(min(seq, _TOKENS_PER_BLOCK), head_dim, dtype=torch.float32)
    scale = channel_scales(k, scratch)
    if not bool(torch.isfinite(scale).all()):
        return None
    q = quantize_channels(k, scale, scratch)
    merged_scale = scale.reshape(batch, heads * head_dim).to(torch.float64)
    largest = merged_scale.amax(dim=1, keepdim=True)
    unit = merged_scale / torch.where(largest > 0, largest, torch.ones_like(largest))  # [B, HD] in [0, 1]
    gram = torch.empty(batch, heads * head_dim, heads * head_dim, dtype=torch.float32)
    for b in range(batch):
        exact = _integer_gram(q[b]).to(torch.float64)
        gram[b] = exact.mul_(unit[b, :, None]).mul_(unit[b, None, :])
    return gram


def project_heads(k: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """float32 `a [B, S, r] = K_b basis_b^T` of `k [B, H_kv, S, D]` and float32 `basis [B, r, H_kv * D]`,
    summed over heads block by block of tokens (the block of a stays in the cache). A block of one
    head's keys is read in place when it is contiguous float32 (a cache's slice of tokens is),
    otherwise from a float32 copy: the result does not depend on k's layout."""
    batch, heads, seq, head_dim = k.shape
    rank = basis.shape[1]
    a = torch.empty(batch, seq, rank, dtype=torch.float32)
    scratch = torch.empty(min(seq, _TOKENS_PER_BLOCK), head_dim, dtype=torch.float32)
    for b in range(batch):
        per_head = [basis[b, :, h * head_dim:(h + 1) * head_dim].t() for h in range(heads)]  # [D, r] each
        for start, stop in _blocks(seq):
            out = a[b, start:stop]
            for h in range(heads):
                keys = k[b, h, start:stop]
                if keys.dtype != torch.float32 or not keys.is_contiguous():
                    # The GEMM's summation order depends on its operand's layout: one layout for all.
                    keys = scratch[:stop - start].copy_(keys)
                if h == 0:
                    torch.mm(keys, per_head[h], out=out)
                else:
                    out.addmm_(keys, per_head[h])
    return a
