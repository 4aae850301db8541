"""Landmark top-k family (ShadowKV): score every chunk's landmark against the decode query, keep the
best k chunks per KV head. One tuned kernel, `landmark_topk`; `landmarks` and `outlier_chunks`
(ops.py) are one-off torch computations at prefill and are not tuned.

kernel.py (Triton), space.py (tunables, constraints, DEFAULTs, shapes, buckets), spec.py
(registration and the top-k tolerance), ops.py (the public ops).
"""
