"""RMSNorm + int8 quantisation registration: the tuned `rmsnorm_quant` spec.

The contract's launcher writes one output tensor; this kernel has three (q, the scales and, with a
residual, h), so that output is one flat int8 buffer holding each contiguously, at 16-byte aligned
offsets (`outputs`): the kernel sees exactly the strides and alignment a real call's outputs have.
The check compares each of the three exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kernelhub import checking
from kernelhub.kernels.rmsnorm_quant import space
from kernelhub.kernels.rmsnorm_quant.kernel import rmsnorm_quant_triton
from kernelhub.reference import rmsnorm_quant as ref
from kernelhub.registry import FamilySpec, register

EPS = 1e-6
_ALIGN = 16


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def make_inputs(shape, dtype: str, device, seed: int) -> dict:
    """Random `x [M, K]` (scaled normal, as activations), `weight [K]` in [0.5, 1.5) (norm weights
    sit near 1), and where `residual` is 1 a normal `residual [M, K]`, all in `dtype`, on `device`."""
    m, k, residual = shape
    gen = checking.generator(device, seed)
    on = dict(device=device, generator=gen)
    torch_dtype = getattr(torch, dtype)
    inputs = {
        "x": (torch.randn(m, k, **on) * 4).to(torch_dtype),
        "weight": (torch.rand(k, **on) + 0.5).to(torch_dtype),
        "eps": EPS,
    }
    if residual:
        inputs["residual"] = torch.randn(m, k, **on).to(torch_dtype)
    return inputs


def outputs(buffer: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, ...]:
    """Views of a buffer from `new_output`: q int8 [M, K], scale float32 [M] and, with a residual,
    h [M, K] in x's dtype, each contiguous."""
    x = inputs["x"]
    m, k = x.shape
    scale_at = _aligned(m * k)
    q = buffer[:m * k].view(m, k)
    scale = buffer[scale_at:scale_at + 4 * m].view(torch.float32)
    if "residual" not in inputs:
        return q, scale
    h_at = _aligned(scale_at + 4 * m)
    return q, scale, buffer[h_at:h_at + m * k * x.element_size()].view(x.dtype).view(m, k)


def new_output(inputs: dict) -> torch.Tensor:
    x = inputs["x"]
    m, k = x.shape
    nbytes = _aligned(_aligned(m * k) + 4 * m)
    if "residual" in inputs:
        nbytes += m * k * x.element_size()
    return torch.empty(nbytes, dtype=torch.int8, device=x.device)


def reference(inputs: dict) -> torch.Tensor:
    buffer = new_output(inputs).zero_()
    results = ref.rmsnorm_quantize_int8(inputs["x"], inputs["weight"], inputs["eps"], inputs.get("residual"))
    for view, result in zip(outputs(buffer, inputs), results, strict=True):
        view.copy_(result)
    return buffer


def launch(inputs: dict, config: dict, out: torch.Tensor) -> torch.Tensor:
    q, scale, *h = outputs(out, inputs)
    rmsnorm_quant_triton(inputs["x"], inputs["weight"], inputs["eps"], config=config, q_out=q, scale_out=scale,
                         residual=inputs.get("residual"), h_out=h[0] if h else None)
    return out


def compare(actual: torch.Tensor, expected: torch.Tensor, inputs: dict) -> str | None:
    """q, scale and h bit for bit, each named where it differs."""
    for name, got, want in zip(("q", "scale", "h"), outputs(actual, inputs), outputs(expected, inputs)):
        problem = checking.mismatch_exact(got, want)
        if problem:
            return f"{name}: {problem}"
    return None


SPEC = register(FamilySpec.from_space(
    space, name="rmsnorm_quant",
    summary="RMSNorm (after an optional residual add) fused with per-row symmetric int8 quantisation",
    make_inputs=make_inputs, reference=reference, launch=launch, new_output=new_output, compare=compare,
    extra_sources=(Path(ref.__file__),),  # the summation order the kernel follows is the reference's
))
