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


# -- per-call overhead of the op layer, on shapes where the kernel costs almost nothing ------------
#
#     python -m pytest tests/test_cpu_benchmark.py -k overhead --benchmark-enable \
#         --benchmark-columns=median,iqr,rounds --benchmark-sort=name
#
# Compare the medians within a group: `ops.*` over `bare` is validation + backend choice + the
# kernel op (kernelhub/kernels/common/library.py, whose docstring holds the figures); `kernel op`
# over `impl` is what an eager call adds to the implementation: the `torch.compiler.is_compiling()`
# check (the ops made it themselves before the helper) and one Python call.

def _per_call(benchmark, fn, *args):
    """Rounds of 200 calls each, so that the timer's own cost and resolution do not count."""
    return benchmark.pedantic(fn, args, iterations=200, rounds=60, warmup_rounds=5)


def _tiny_int8():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=gen).t().contiguous()  # [64, 32]
    return a, b


_TINY_OUT = torch.empty(32, 32, dtype=torch.int32)
OVERHEAD_INT8_GEMM = {
    "bare _int_mm": lambda a, b: torch._int_mm(a, b),
    "ops.int8_gemm": lambda a, b: ops.int8_gemm(a, b),
    "bare _int_mm out=": lambda a, b: torch._int_mm(a, b, out=_TINY_OUT),
    "ops.int8_gemm out=": lambda a, b: ops.int8_gemm(a, b, out=_TINY_OUT),
}


@pytest.mark.parametrize("path", list(OVERHEAD_INT8_GEMM))
def test_overhead_int8_gemm(benchmark, path):
    benchmark.group = "overhead: int8 [32, 64] @ [64, 32]"
    a, b = _tiny_int8()
    result = _per_call(benchmark, OVERHEAD_INT8_GEMM[path], a, b)
    assert torch.equal(result, (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32))


@pytest.mark.parametrize("path", ["reference", "ops.quantize_int8"])
def test_overhead_quantize_int8(benchmark, path):
    benchmark.group = "overhead: quantize_int8 [32, 64] float32"
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    fn = ref.quantize_int8 if path == "reference" else ops.quantize_int8
    q, scale = _per_call(benchmark, fn, x)
    expected_q, expected_scale = ref.quantize_int8(x)
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale)


@pytest.mark.parametrize("path", ["impl", "kernel op"])
def test_overhead_of_the_kernel_op_helper(benchmark, path):
    from kernelhub.kernels.common.library import KERNEL_OPS

    benchmark.group = "overhead: the torch.library helper (int8_gemm's kernel op vs its implementation)"
    a, b = _tiny_int8()
    op = KERNEL_OPS["int8_gemm"]
    result = _per_call(benchmark, op.impl if path == "impl" else op, a, b, None)
    assert torch.equal(result, (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32))
