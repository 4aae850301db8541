"""The kernel families. Importing this package registers every built-in family."""

import os

from kernelhub.kernels import int8_gemm, landmark_topk, lowrank_keys, sparse_gather, tp_overlap  # noqa: F401


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
