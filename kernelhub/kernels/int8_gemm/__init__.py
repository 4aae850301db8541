"""int8 GEMM family (NGEMM): int8 x int8 -> int32, and the same with a fused dequantising epilogue.

kernel.py (the GEMM kernels), quantize.py (the quantisation kernel), space.py (tunables,
constraints, DEFAULTs, shapes, buckets), spec.py (registration), ops.py (the public ops).
"""
