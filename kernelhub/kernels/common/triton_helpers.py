"""Triton helpers the kernels share: the grouped tile order of a GEMM and the float32 `tl.dot`
with the interpreter's workaround. `@triton.jit` helpers are inlined into each kernel that calls
them, so they cost nothing at run time; they are part of every kernel's version.

Dots under Triton's interpreter (CPU tensors): Triton 3.9's interpreter multiplies bfloat16
operands as their raw uint16 bit patterns (`InterpreterBuilder.create_dot`), so there every
16-bit operand is upcast to float32 first. The products are the same: a 16-bit product is exact in
float32, and the GPU's 16-bit `tl.dot` accumulates in float32 too. float32 operands (and the upcast
ones) use `input_precision="ieee"`: the default on NVIDIA GPUs is TF32, which keeps 10 mantissa bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# Every kernelhub launch passes these options. No fused multiply-add contraction: `a * b + c` rounds
# twice, as the reference's separate operations do (bit-exactness of the int8 epilogue, the
# quantisers and the RMSNorm sum depends on it; elsewhere it keeps results closest to the
# reference), and a kernel compiles the same under every Triton (3.9 defaults to contraction and
# warns that 3.10 will not). A dot's multiply-accumulate is one tensor-core operation either way.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def dot_flags(operand: torch.Tensor) -> dict[str, bool]:
    """The meta-parameters `IEEE_FP32` and `UPCAST_TO_FP32` of `float32_dot` for operands like
    `operand` (float16, bfloat16 or float32; on a CPU tensor, for Triton's interpreter)."""
    interpreted = operand.device.type == "cpu"
    float32 = operand.dtype == torch.float32
    return {"IEEE_FP32": float32 or interpreted, "UPCAST_TO_FP32": interpreted and not float32}


@triton.jit
def float32_dot(x, y, acc, IEEE_FP32: tl.constexpr, UPCAST_TO_FP32: tl.constexpr):
    """`acc + x @ y` accumulated in float32 (`dot_flags` gives the flags for the operands)."""
    if UPCAST_TO_FP32:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    if IEEE_FP32:
        acc = tl.dot(x, y, acc, input_precision="ieee")
    else:
        acc = tl.dot(x, y, acc)
    return acc


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid`'s [BLOCK_M, BLOCK_N] tile of an [M, N] output, in grouped
    order (Triton tutorial 03): programs visit GROUP_M rows of tiles column by column, so those
    running at the same time share rows of A and columns of B in L2. GROUP_M = 1 is row-major."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n
