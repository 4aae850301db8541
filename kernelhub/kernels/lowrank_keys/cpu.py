"""The CPU path of `lowrank_keys(k, rank, gram="int8")`: the Gram matrix of the keys quantised to
int8 per channel, summed exactly in int32 by oneDNN's int8 GEMM, then the float32 path's `eigh`
and a float32 projection of the keys themselves.

    q, s = per-channel int8 quantisation of K_b          (`reference.lowrank_keys.channel_quantized_keys`)
    G_q  = diag(s) (Q^T Q) diag(s)                       (Q^T Q exact in int32; scaled in float64)
    basis = top eigenvectors of G_q,   a = K_b basis^T    (the unquantised keys, float32 accumulation)

Why: without AMX a float32 Gram runs at the core's float32 FMA rate, which bounds the float32
method; the int8 product of the same shape ran 3 to 4 times faster on this project's AVX512-VNNI
VMs (0.06 s against 0.18 s at S = 32K on the Xeon, benchmarks/results/cpu_lowrank_keys.md). Only
the basis sees the quantisation (a is projected from the exact keys), and what it perturbs is how
the directions near the rank cut mix: on the benchmark's keys the error grows by about 0.1% of
itself from S = 2K on. (With no more tokens than H_kv * D the op computes the float32 Gram instead: ops.py.)

The quantisation is the compiled quantiser's (kernelhub/kernels/int8_gemm/native.py, its channel
entries) where it is built, else torch's passes, bit for bit the same. The Gram matrix is summed
chunk by chunk of tokens: each chunk's int8 keys are written into one reused buffer and go into
the int32 product while they are in the cache, so no [B, S, H_kv * D] int8 copy is made (at
S = 32K it would be 32 MiB, allocated and page-faulted in at every call). Every pass reads the keys
`[B, H_kv, S, D]` where they lie (a cache slice in place, any strides).
"""

from __future__ import annotations

import torch

from kernelhub.kernels.int8_gemm import native
from kernelhub.kernels.int8_gemm.cpu import int_mm_cpu, native_threads

# Tokens per block of torch's passes: a [4096, D] float32 block (2 MiB at D = 128) stays in the
# cache between the operations on it.
_TOKENS_PER_BLOCK = 4096
# Tokens per chunk of the int8 Gram: 8 MiB of int8 keys at H_kv * D = 1024, reused for every chunk;
# the int32 product of chunks this long ran within 5% of one product over all tokens (2-core Xeon VM).
_TOKENS_PER_CHUNK = 8192
# int32 holds a sum of S products of int8 values in [-127, 127] for S < 2**31 / 127**2 = 133,144:
# longer sequences are summed in chunks of this many tokens, then in int64.
MAX_TOKENS_PER_PRODUCT = 1 << 17
# Columns per block row of the Gram matrix's lower block triangle (H_kv * D = 1024: 9/16 of the work).
_GRAM_BLOCK = 128
_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def _blocks(seq: int, size: int | None = None):
    """(start, stop) of each block of `size` tokens (default _TOKENS_PER_BLOCK) of `seq`."""
    size = size or _TOKENS_PER_BLOCK
    return ((start, min(seq, start + size)) for start in range(0, seq, size))


def _divided_by_127(absmax: torch.Tensor) -> torch.Tensor:
    return absmax / torch.full_like(absmax, 127.0)  # a tensor divisor, as the reference's


def _as_float32(keys: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """`keys [H, T, D]` itself when float32, else converted (exactly) into `scratch`."""
    if keys.dtype == torch.float32:
        return keys
    return scratch[:, :keys.shape[1]].copy_(keys)


def _conversion_scratch(k: torch.Tensor, tokens: int) -> torch.Tensor | None:
    heads, head_dim = k.shape[1], k.shape[3]
    return None if k.dtype == torch.float32 else torch.empty(heads, tokens, head_dim, dtype=torch.float32)


def channel_scales(k: torch.Tensor) -> torch.Tensor:
    """float32 `[B, H_kv, D]`: max over tokens of |k| per channel, divided by a tensor 127 (NaN
    where a channel holds NaN, Inf where it holds Inf and no NaN). One read of k."""
    batch, heads, seq, head_dim = k.shape
    quantizer = native.quantizer()
    if quantizer is not None:
        chunk = min(seq, _TOKENS_PER_CHUNK)
        scratch = _conversion_scratch(k, chunk)
        largest = torch.zeros(batch, heads * head_dim, dtype=torch.int32)
        for b in range(batch):
            for start, stop in _blocks(seq, chunk):
                keys = _as_float32(k[b, :, start:stop], scratch)
                quantizer.channel_absmax_bits(keys, largest[b], native_threads(quantizer, keys.numel()))
        return _divided_by_127(largest.view(torch.float32).view(batch, heads, head_dim))
    absmax = torch.zeros(batch, heads, head_dim, dtype=torch.float32)
    scratch = torch.empty(min(seq, _TOKENS_PER_BLOCK), head_dim, dtype=torch.float32)
    for b in range(batch):
        for h in range(heads):
            for start, stop in _blocks(seq):
                keys, into = k[b, h, start:stop], scratch[:stop - start]
                block = torch.abs(keys, out=into) if keys.dtype == torch.float32 else into.copy_(keys).abs_()
                torch.maximum(absmax[b, h], block.amax(dim=0), out=absmax[b, h])  # NaN propagates
    return _divided_by_127(absmax)


def quantize_channels(keys: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
                      scratch: torch.Tensor | None = None) -> torch.Tensor:
    """int8 `out [T, H_kv * D]` (unit column stride): one sequence's keys `[H_kv, T, D]` (a chunk
    of its tokens) merged and quantised with the finite per-channel `scale [H_kv, D]` (contiguous),
    bit for bit `reference.lowrank_keys.channel_quantized_keys`. `scratch`: float32 `[H_kv, >= T, D]`
    for keys of another dtype (converted there, exactly). Torch's passes: a channel whose scale is
    normal needs no clamp (its quotients stay below 127.5: kernelhub/kernels/int8_gemm/cpu.py), a
    subnormal one gets the reference's clamp, an all-zero one (0 / 0) q = 0."""
    heads, tokens, head_dim = keys.shape
    quantizer = native.quantizer()
    if quantizer is not None:
        if keys.dtype != torch.float32:
            scratch = scratch if scratch is not None else torch.empty(heads, tokens, head_dim)
            keys = _as_float32(keys, scratch)
        quantizer.channels(keys, scale.reshape(heads * head_dim), out, native_threads(quantizer, keys.numel()))
        return out
    needs_clamp = bool((scale < _SMALLEST_NORMAL).any())
    block = torch.empty(min(tokens, _TOKENS_PER_BLOCK), head_dim, dtype=torch.float32)
    for h in range(heads):
        columns = slice(h * head_dim, (h + 1) * head_dim)
        for start, stop in _blocks(tokens):
            quotient = torch.div(keys[h, start:stop], scale[h], out=block[:stop - start]).round_()
            if needs_clamp:
                quotient.clamp_(-127, 127).nan_to_num_(0.0)
            out[start:stop, columns].copy_(quotient)
    return out


def _integer_gram(q: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """int8 `q [S, HD]` -> `Q^T Q`, exact, its lower block triangle (above it 0), added into `total`
    (int32 or int64 `[HD, HD]`) if given, else into a new one: int32 when S fits one product,
    int64 summed over chunks of tokens otherwise."""
    seq, hd = q.shape
    chunks = [q[start:start + MAX_TOKENS_PER_PRODUCT] for start in range(0, seq, MAX_TOKENS_PER_PRODUCT)]
    if total is None:
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
    hd = heads * head_dim
    scale = channel_scales(k)
    if not bool(torch.isfinite(scale).all()):
        return None
    chunk = min(seq, _TOKENS_PER_CHUNK)
    q = torch.empty(chunk, hd, dtype=torch.int8)  # one chunk's int8 keys, reused
    scratch = _conversion_scratch(k, chunk)
    merged_scale = scale.reshape(batch, hd).to(torch.float64)
    largest = merged_scale.amax(dim=1, keepdim=True)
    unit = merged_scale / torch.where(largest > 0, largest, torch.ones_like(largest))  # [B, HD] in [0, 1]
    gram = torch.empty(batch, hd, hd, dtype=torch.float32)
    for b in range(batch):
        exact = torch.zeros(hd, hd, dtype=torch.int32 if seq <= MAX_TOKENS_PER_PRODUCT else torch.int64)
        for start, stop in _blocks(seq, chunk):
            _integer_gram(quantize_channels(k[b, :, start:stop], scale[b], q[:stop - start], scratch), exact)
        gram[b] = exact.to(torch.float64).mul_(unit[b, :, None]).mul_(unit[b, None, :])
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
