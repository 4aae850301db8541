"""Which implementation a call runs: `KERNELHUB_BACKEND`, read per call.

- `auto` (default): CUDA tensors run the Triton kernels with the best stored config; CPU tensors
  take the family's fastest exact CPU path.
- `triton`: always the Triton kernels (on a machine without a GPU, in Triton's interpreter).
- `reference`: the pure-PyTorch specification in `kernelhub.reference`.
"""

from __future__ import annotations

import os

import torch

BACKEND_ENV = "KERNELHUB_BACKEND"
BACKENDS = ("auto", "triton", "reference")


def interpreter_problem() -> str | None:
    """Why Triton kernels cannot run on CPU tensors in this process, or None if they can."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels on CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing kernelhub"
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.cdiv, InterpretedFunction):
        return ("triton was imported before TRITON_INTERPRET=1 was set, so its library cannot run in the "
                "interpreter: import kernelhub before triton, or set TRITON_INTERPRET=1 in the environment")
    return None


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
