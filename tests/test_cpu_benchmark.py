"""pytest-benchmark entry for the CPU path (disabled by default: each runs once, as a check).

    python -m pytest tests/test_cpu_benchmark.py --benchmark-enable

benchmarks/cpu_int8.py prints the full table against fp32 matmul and bare torch._int_mm.
"""

import pytest
import torch

import kernelhub.ops as ops
from kernelhub.checking import mismatch_close
from kernelhub.kernels.int8_gemm.space import LLAMA3_8B
from kernelhub.reference import int8_gemm as ref


@pytest.mark.parametrize("layer", ["o", "down"])
@pytest.mark.parametrize("m", [1, 128])
def test_int8_scaled_gemm_cpu(benchmark, layer, m):
    n, k = LLAMA3_8B[layer]
    gen = torch.Generator().manual_seed(m)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen).t()
    scale_a, scale_b = torch.rand(m, generator=gen) / 100, torch.rand(n, generator=gen) / 100
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    result = benchmark(ops.int8_scaled_gemm, a, b, scale_a, scale_b, bias)
    expected = ref.int8_scaled_gemm(a, b, scale_a, scale_b, bias)
    assert mismatch_close(result, expected, rtol=2 * torch.finfo(torch.bfloat16).eps, atol_frac=1e-6) is None
