"""RMSNorm + int8 quantisation family: the norm of a residual stream (after an optional residual
add) quantised per row for the int8 GEMM that follows, in one kernel.

kernel.py (Triton), space.py (tunables, constraints, DEFAULTs, shapes, buckets), spec.py
(registration), ops.py (the public op).
"""
