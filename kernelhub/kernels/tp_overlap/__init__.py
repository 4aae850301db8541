"""Tensor-parallel overlap family (Flux): GEMM + AllGather and GEMM + ReduceScatter over torch.distributed.

kernel.py (the Triton chunk GEMM), overlap.py (the overlapped schedules and the chunk GEMM they
call), space.py (what the three specs' spaces share), gemm_space.py, all_gather_space.py and
reduce_scatter_space.py (each spec's tunables, constraints, DEFAULTs, shapes, buckets), spec.py
(registration), ops.py (the public ops).
"""
