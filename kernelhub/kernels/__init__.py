"""The kernel families. Importing this package registers every built-in family."""

import os

from kernelhub.kernels import int8_gemm, landmark_topk, lowrank_keys, sparse_gather, tp_overlap  # noqa: F401

# The shared-memory estimate behind each kernel's constraints (kernels/common/shared_memory.py's
# model), by spec or fixed-kernel name: (config, shape) -> SharedMemory. For the tests and the
# report that hold the estimates against the compiler; sparse_gather and quantize_int8 use none
# to speak of (0 B and 16 B measured).
SHARED_MEMORY_ESTIMATES = {
    "int8_gemm": lambda config, shape: int8_gemm.space.shared_memory(config),
    "landmark_topk": landmark_topk.space.shared_memory,
    "lowrank_gram": lambda config, shape: lowrank_keys.space.gram_shared_memory(config),
    "reconstruct_keys": lambda config, shape: lowrank_keys.space.reconstruct_shared_memory(config, shape[4]),
    "lowrank_project": lambda config, shape: lowrank_keys.space.project_shared_memory(config),
    "tp_gemm": lambda config, shape: tp_overlap.space.gemm_shared_memory(config),
}


def estimate_peak_dtypes(name: str) -> tuple[str, ...]:
    """The dtypes at which the two terms of `name`'s estimate peak: the widest operands (the
    pipeline) and 16-bit ones (the epilogue: tensor cores convert more than FMA dots). Its margin
    is judged on the largest compiler figure over them."""
    return ("int32", "bfloat16") if name == "int8_gemm" else ("float32", "bfloat16")


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
