"""The chunk GEMM of the overlapped collectives: `C = A @ B` in Triton, float32 accumulation.

Equivalent to the following PyTorch code (`kernelhub.reference.tp_overlap.gemm`):

    out[:] = (a.float() @ b.float()).to(out.dtype)

The overlapped ops launch it once per chunk of rows, as each chunk arrives (all_gather_gemm) or
before each chunk leaves (gemm_reduce_scatter), on row slices of larger tensors: every operand is
addressed through its strides, so no chunk is copied.

Each program computes one [BLOCK_M, BLOCK_N] tile of C, visiting tiles in groups of GROUP_M rows
of tiles (`grouped_tile`) so that programs running together share rows of A and columns of B in
L2. The dot is the toolbox's `float32_dot` (kernels/common/triton_helpers.py: IEEE float32, and
16-bit operands upcast under Triton's interpreter, whose bfloat16 dot is wrong). The interpreter
also truncates a float32 -> bfloat16 store where a GPU rounds to nearest, so on the CPU the tile
goes through a float32 buffer and torch rounds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernelhub.kernels.common.triton_helpers import LAUNCH_OPTIONS, dot_flags, float32_dot, grouped_tile


@triton.jit
def gemm_kernel(
    # Pointers: A [M, K], B [K, N], C [M, N]; any float dtype, C's dtype may differ.
    a_ptr, b_ptr, c_ptr,
    # Sizes.
    M, N, K,
    # Strides, in elements.
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    # Meta-parameters.
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    IEEE_FP32: tl.constexpr, UPCAST_TO_FP32: tl.constexpr,  # dot_flags
):
    pid_m, pid_n = grouped_tile(tl.program_id(axis=0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = float32_dot(a, b, acc, IEEE_FP32, UPCAST_TO_FP32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn  # [BLOCK_M, BLOCK_N]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemm_triton(a: torch.Tensor, b: torch.Tensor, *, config: dict, out: torch.Tensor) -> torch.Tensor:
    """`out [M, N] = a [M, K] @ b [K, N]` with float32 accumulation; any strides; returns `out`.

    a, b: one float dtype (float32, float16, bfloat16); out: [M, N], any float dtype.
    `config`: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages (see gemm_space.SPACE).
    """
    m, k = a.shape
    n = b.shape[1]
    assert b.shape[0] == k and out.shape == (m, n), (a.shape, b.shape, out.shape)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    interpreted = a.device.type == "cpu"
    # On the CPU, 16-bit results are rounded by torch from a float32 tile (see the module docstring).
    target = torch.empty((m, n), dtype=torch.float32, device=out.device) if (
        interpreted and out.dtype != torch.float32) else out
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    gemm_kernel[grid](
        a, b, target, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), target.stride(0), target.stride(1),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        GROUP_M=config["GROUP_M"], **dot_flags(a),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **LAUNCH_OPTIONS,
    )
    if target is not out:
        out.copy_(target)
    return out
