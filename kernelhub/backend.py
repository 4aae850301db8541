"""Which implementation a call runs: `KERNELHUB_BACKEND`, read per call.

- `auto` (default): CUDA tensors run the Triton kernels with the best stored config; CPU tensors
  take the family's fastest exact CPU path.
- `triton`: always the Triton kernels (on a machine without a GPU, in Triton's interpreter).
- `reference`: the pure-PyTorch specification in `kernelhub.reference`.
"""

from __future__ import annotations

import os

import torch

from kernelhub.kernels import interpreter_problem

BACKEND_ENV = "KERNELHUB_BACKEND"
BACKENDS = ("auto", "triton", "reference")


def choose(device: torch.device) -> str:
    """'reference', 'triton' or 'cpu' for a call whose tensors are on `device`."""
    backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "triton" and device.type != "cuda":
        problem = interpreter_problem()
        if problem:
            raise RuntimeError(f"{BACKEND_ENV}=triton: {problem}")
    return backend
