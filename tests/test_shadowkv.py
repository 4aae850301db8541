"""ShadowKVCache: exact where it must be, faithful where it approximates, honest about memory."""

import pytest
import torch

from kernelhub.shadowkv import ShadowKVCache
from kernelhub.shadowkv.fidelity import decode_fidelity, dense_decode
from kernelhub.shadowkv.synthetic import make_synthetic_cache


@pytest.fixture(params=["auto", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("KERNELHUB_BACKEND", request.param)
    return request.param


def _relative_error(actual, expected):
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("batch, kv_heads, q_heads, seq, head_dim", [
    (2, 2, 8, 203, 64),   # GQA, S not a multiple of the chunk
    (1, 2, 2, 300, 128),  # MHA, D = 128
    (1, 1, 4, 103, 64),   # one KV head
], ids=["gqa-S203-D64", "mha-S300-D128", "hkv1-S103"])
def test_full_rank_full_budget_equals_dense_attention(backend, batch, kv_heads, q_heads, seq, head_dim):
    """No token lost or counted twice: with every chunk selectable and exact keys, decode is dense attention.

    Full rank is H_kv * D, so the candidate tokens (S minus the local window) must number at least that.
    """
    synth = make_synthetic_cache(batch, kv_heads, q_heads, seq, head_dim, steps=3, protect_tail=24, seed=seq)
    cache = ShadowKVCache(rank=kv_heads * head_dim, budget=seq, outliers=3, local=16)
    cache.prefill(synth.k, synth.v)
    dense = dense_decode(synth.k, synth.v, synth.queries, synth.new_k, synth.new_v)
    for step in range(3):
        out = cache.decode(synth.queries[step], synth.new_k[step], synth.new_v[step])
        assert out.shape == (batch, q_heads, head_dim)
        assert _relative_error(out, dense[step]) < 1e-4, step
    selected = cache.selected_chunks
    # every non-outlier chunk is selected exactly once
    assert selected.shape[-1] == cache.n_chunks - cache.outlier_idx.shape[-1]
    both = torch.cat([selected, cache.outlier_idx], dim=-1).sort(dim=-1).values
    assert torch.equal(both, torch.arange(cache.n_chunks).expand_as(both))


def test_prefill_shorter_than_the_local_window_is_dense(backend):
    synth = make_synthetic_cache(1, 2, 4, 20, 64, steps=2, protect_tail=8, seed=3)
    cache = ShadowKVCache(local=32)
    cache.prefill(synth.k, synth.v)
    assert cache.n_chunks == 0 and cache.offloaded_bytes() == 0
    dense = dense_decode(synth.k, synth.v, synth.queries, synth.new_k, synth.new_v)
    for step in range(2):
        out = cache.decode(synth.queries[step], synth.new_k[step], synth.new_v[step])
        assert _relative_error(out, dense[step]) < 1e-5


def test_fidelity_on_a_realistic_cache():
    """The approximations (rank 160 of 512, budget a quarter of the chunks) keep what matters."""
    synth = make_synthetic_cache(1, 4, 16, 4096, 128, steps=2, n_needles=4, seed=11)
    cache = ShadowKVCache(rank=160, budget=1024, outliers=16, local=32)
    report = decode_fidelity(cache, synth.k, synth.v, synth.queries, synth.new_k, synth.new_v,
                             needles=synth.needles)
    assert report["needles_found"] == 1.0, report
    assert report["output_rel_error"] <= 5e-2, report
    assert report["key_rel_error"] < 0.2 and report["mass_covered"] > 0.9, report


def test_memory_accounting():
    synth = make_synthetic_cache(1, 2, 8, 1000, 64, seed=5)
    cache = ShadowKVCache(rank=32, budget=256, outliers=4, local=32)
    cache.prefill(synth.k, synth.v)
    cache.decode(synth.queries[0], synth.new_k[0], synth.new_v[0])
    full_kv = 2 * synth.k.numel() * synth.k.element_size()
    candidate_values = cache.n_chunks * cache.chunk_size * 2 * 64 * 4
    assert cache.offloaded_bytes() == candidate_values
    assert 0 < cache.resident_bytes() < full_kv / 2


def test_bad_use_is_a_clear_error():
    cache = ShadowKVCache()
    with pytest.raises(RuntimeError, match="prefill"):
        cache.decode(torch.zeros(1, 4, 64), torch.zeros(1, 2, 64), torch.zeros(1, 2, 64))
    with pytest.raises(ValueError, match="budget"):
        ShadowKVCache(budget=-1)
    synth = make_synthetic_cache(1, 2, 4, 100, 64, seed=1)
    cache.prefill(synth.k, synth.v)
    with pytest.raises(ValueError, match="q: expected"):
        cache.decode(torch.zeros(1, 3, 64), synth.new_k[0], synth.new_v[0])
    with pytest.raises(ValueError, match="k, v"):
        ShadowKVCache().prefill(synth.k, synth.v[:, :, :-1])
