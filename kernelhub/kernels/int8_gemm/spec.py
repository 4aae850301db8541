"""int8 GEMM registration: the tuned `int8_gemm` spec (int32 output and the fused dequantising
epilogue, by output dtype) and the untuned `quantize_int8` kernel."""

from __future__ import annotations

import torch

from kernelhub import checking
from kernelhub.kernels.int8_gemm import quantize, space
from kernelhub.kernels.int8_gemm.kernel import int8_gemm_triton
from kernelhub.reference import int8_gemm as ref
from kernelhub.registry import FamilySpec, FixedKernel, register, register_fixed


def make_inputs(shape, dtype: str, device, seed: int) -> dict:
    """Random int8 `a [M, K]`, and `b [K, N]` as the transposed view of a weight `[N, K]` (the
    nn.Linear layout, so no copy is made); for a float `dtype`, also positive float32 scales and
    a bias in that dtype. Generated on `device` itself (tune shapes are too large for the CPU)."""
    m, n, k = shape
    gen = checking.generator(device, seed)
    on = dict(device=device, generator=gen)
    inputs = {
        "a": torch.randint(-127, 128, (m, k), dtype=torch.int8, **on),
        "b": torch.randint(-127, 128, (n, k), dtype=torch.int8, **on).t(),
        "out_dtype": getattr(torch, dtype),
    }
    if dtype != "int32":
        inputs["scale_a"] = torch.rand(m, **on) * 0.02 + 1e-3
        inputs["scale_b"] = torch.rand(n, **on) * 0.02 + 1e-3
        inputs["bias"] = torch.randn(n, **on).to(inputs["out_dtype"])
    return inputs


def reference(inputs: dict) -> torch.Tensor:
    if inputs["out_dtype"] == torch.int32:
        return ref.int8_gemm(inputs["a"], inputs["b"])
    return ref.int8_scaled_gemm(inputs["a"], inputs["b"], inputs["scale_a"], inputs["scale_b"],
                                inputs.get("bias"), inputs["out_dtype"])


def launch(inputs: dict, config: dict, out: torch.Tensor) -> torch.Tensor:
    return int8_gemm_triton(inputs["a"], inputs["b"], config=config, out=out, scale_a=inputs.get("scale_a"),
                            scale_b=inputs.get("scale_b"), bias=inputs.get("bias"))


def new_output(inputs: dict) -> torch.Tensor:
    return torch.empty(inputs["a"].shape[0], inputs["b"].shape[1], dtype=inputs["out_dtype"],
                       device=inputs["a"].device)


def compare(actual: torch.Tensor, expected: torch.Tensor, inputs: dict) -> str | None:
    if expected.dtype == torch.int32:
        return checking.mismatch_exact(actual, expected)
    return checking.mismatch_close(actual, expected, rtol=2 * torch.finfo(expected.dtype).eps, atol_frac=1e-6)


SPEC = register(FamilySpec.from_space(
    space, name="int8_gemm", summary="int8 x int8 -> int32 GEMM, optionally with a fused dequantising epilogue",
    make_inputs=make_inputs, reference=reference, launch=launch, new_output=new_output, compare=compare,
))


# -- quantize_int8: untuned (its config follows from K) ------------------------------------------

def _quantize_inputs(shape, dtype: str, device, seed: int) -> dict:
    m, k = shape
    return {"x": torch.randn(m, k, dtype=getattr(torch, dtype), device=device,
                             generator=checking.generator(device, seed))}


def _quantize(inputs: dict):
    x = inputs["x"]
    return quantize.quantize_int8_triton(x, q_out=torch.empty(x.shape, dtype=torch.int8, device=x.device),
                                         scale_out=torch.empty(x.shape[0], dtype=torch.float32, device=x.device))


# Activations [M, K] of the Llama-3-8B linear layers per call, and its weights [N, K] at load time.
_ACTIVATIONS = [(m, k) for k in (4096, 14336) for m in (1, 16, 128, 1024, 8192)]
_WEIGHTS = [(n, k) for n, k in space.LLAMA3_8B.values()]
QUANTIZE = register_fixed(FixedKernel(
    name="quantize_int8",
    summary="per-row symmetric int8 quantisation (one program per row, two passes over K)",
    shape_names=("M", "K"),
    dtypes=("float32", "float16", "bfloat16"),
    shape_sets={"smoke": [(1, 1), (7, 63), (33, 129), (5, 1500)], "tune": _ACTIVATIONS + _WEIGHTS,
                "bench": _ACTIVATIONS + _WEIGHTS},
    make_inputs=_quantize_inputs,
    launch=_quantize,
    config=lambda shape: quantize.launch_config(shape[1]),
))
