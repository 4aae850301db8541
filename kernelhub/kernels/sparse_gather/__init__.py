"""Sparse gather family (ShadowKV): fetch the selected chunks of an offloaded value cache, reusing
the chunks the previous decode step already fetched.

kernel.py (Triton, and the hit map of resident chunks), space.py (tunables, constraints,
DEFAULTs, shapes, buckets), spec.py (registration), ops.py (the public op).
"""
