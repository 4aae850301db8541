"""Low-rank key cache family (ShadowKV): the best rank-r factorisation of the pre-RoPE keys
(`lowrank_keys`: Gram matrix, eigh, projection) and the fused gather + reconstruct + RoPE of decode
(`reconstruct_keys`).

kernel.py (the three Triton kernels), space.py (what both tuned kernels' spaces share),
gram_space.py and reconstruct_space.py (each spec's tunables, constraints, DEFAULTs, shapes,
buckets), spec.py (registration and the tolerances), ops.py (the public ops).
"""
