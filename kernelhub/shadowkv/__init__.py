"""ShadowKV: a long-context decode cache with low-rank keys on the device and offloaded values.

`ShadowKVCache` composes kernelhub's three ShadowKV families (lowrank_keys / reconstruct_keys,
landmark_topk, sparse_gather) through `kernelhub.ops`; `synthetic` builds realistic caches and
`fidelity` measures a decode step against dense attention.
"""

from kernelhub.shadowkv.cache import ShadowKVCache, gqa_attention

__all__ = ["ShadowKVCache", "gqa_attention"]
