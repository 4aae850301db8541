"""Correctness checks shared by `kernelhub check`, the tuner and the tests.

Outputs are poisoned before a kernel runs (NaN for floats, a garbage pattern for integers), so an
element the kernel forgot to write can never pass by luck. A failed comparison says where.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernelhub.registry import FamilySpec, Shape
from kernelhub.space import Config

# Written into integer outputs before a launch; unlikely as a real result and easy to spot.
INT_POISON = -0x5A5A5A5A


def generator(device: torch.device | str, seed: int) -> torch.Generator:
    """The seeded generator a family's `make_inputs` draws with on `device`. On the meta device
    (`kernelhub compile` builds launches from shapes alone) a CPU one, which meta tensors accept."""
    device = torch.device(device)
    return torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(seed)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill `t` in place with values no correct kernel leaves there; returns `t`."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    info = torch.iinfo(t.dtype)
    return t.fill_(max(info.min, min(info.max, INT_POISON)))


def _where(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor) -> str:
    idx = tuple(int(i) for i in bad.nonzero()[0])
    return (f"{int(bad.sum())} of {bad.numel()} elements differ; first at {list(idx)}: "
            f"got {actual[idx].item()!r}, expected {expected[idx].item()!r}")


def _same_layout(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype} != expected {expected.dtype}"
    return None


def mismatch_exact(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None if `actual` equals `expected` element for element, else where it does not."""
    problem = _same_layout(actual, expected)
    if problem:
        return problem
    actual, expected = actual.cpu(), expected.cpu()
    bad = actual != expected
    return _where(actual, expected, bad) if bool(bad.any()) else None


def mismatch_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol_frac: float) -> str | None:
    """None if |actual - expected| <= rtol * |expected| + atol_frac * max|expected| everywhere.

    `rtol` covers the final rounding to the output dtype; `atol_frac` the float32 rounding
    differences of the accumulation relative to the largest value. NaN anywhere fails.
    """
    problem = _same_layout(actual, expected)
    if problem:
        return problem
    a, e = actual.cpu().to(torch.float64), expected.cpu().to(torch.float64)
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = (a - e).abs()
    bad = ~(err <= rtol * e.abs() + atol_frac * scale)  # NaN compares False, so NaN is bad
    if bool(bad.any()):
        return _where(actual.cpu(), expected.cpu(), bad) + f" (rtol={rtol:g}, atol={atol_frac * scale:g})"
    return None


@dataclass(frozen=True)
class CheckOutcome:
    family: str
    shape: Shape
    dtype: str
    config: Config
    problem: str | None  # None means the output matched the reference
    raised: bool = False  # the problem is an exception (could not compile, launch or compare), not a wrong answer

    @property
    def ok(self) -> bool:
        return self.problem is None


def check_config(spec: FamilySpec, shape: Shape, dtype: str, config: Config, *, device, seed: int) -> CheckOutcome:
    """Run `spec`'s Triton launcher with `config` on fresh inputs and compare with the reference."""
    inputs = spec.make_inputs(shape, dtype, device, seed)
    expected = spec.reference(inputs)
    out = poison_(spec.new_output(inputs))
    try:
        actual = spec.launch(inputs, config, out)
        problem = spec.compare(actual, expected, inputs)
        if problem is None and actual.data_ptr() != out.data_ptr():
            problem = "launcher did not write into the `out` it was given"
    except Exception as exc:  # a config that cannot compile or launch is a failed check, not a crash
        return CheckOutcome(spec.name, tuple(shape), dtype, dict(config), f"{type(exc).__name__}: {exc}", raised=True)
    return CheckOutcome(spec.name, tuple(shape), dtype, dict(config), problem)
