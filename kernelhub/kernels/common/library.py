"""One decorator that registers a public op with `torch.library`: `@kernel_op("name", fake=...)`.

Every public op reads `validate -> one call to its kernel op`. The kernel op is the op's
implementation, registered as `kernelhub::name` (a custom op with a fake, so that
`torch.compile(fullgraph=True)` traces it without a graph break) and wrapped so that:

- an eager call runs the implementation directly: through the dispatcher a call costs 7 to 12 us
  more (torch.library's Python layer; README "Measured"), more than a decode-size kernel itself;
- a call while compiling goes through the registered op, so the graph holds one node that
  the compiler neither inlines nor breaks on;
- `out=` stays outside the registered op, which allocates its result and mutates nothing
  (`mutates_args=()`): while compiling, the result is copied into `out`.

    def _fake_int8_gemm(a, b):
        return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)

    @kernel_op("int8_gemm", fake=_fake_int8_gemm)
    def _int8_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        ...                                     # backend -> config -> launch, into out if given

    def int8_gemm(a, b, *, out=None):
        ...                                     # validation
        return _int8_gemm(a, b, out)

The schema comes from the implementation's annotations (`torch.library.infer_schema`):
`torch.Tensor`, `torch.Tensor | None` (an optional tensor), `int` (SymInt), `float`, `bool`,
`torch.dtype`, `torch.device`, and a tensor or a tuple of tensors as the result. A last parameter
named `out` (annotated `torch.Tensor | None`, the result written into it when given) is the op's
`out=` and is not part of the schema; an op whose result is a tuple has no `out`. The fake takes
the schema's arguments (those without `out`) and returns empty tensors of the result's shapes,
dtypes and devices (`new_empty` on an input keeps its device); it must not read data.
Call the kernel op positionally, `out` last, exactly as the implementation's signature reads.

Cost of an eager call: the `torch.compiler.is_compiling()` check the ops made themselves before
this helper, plus one Python call with `*args` forwarding, about 0.03 us (timeit, empty
implementation). End to end that is below what this machine resolves. Per call on [32, 64] @
[64, 32] int8 and a [32, 64] float32 quantisation (2-core Xeon VM with AMX, shared with other
jobs; torch 2.13.0+cpu, one thread), what each op adds over bare `torch._int_mm` or the
reference expression, the ops before this helper (commit fa1be70, loaded in the same process)
and with it, 201 interleaved rounds of 500 calls, 10th percentile (medians agree within 0.3 us):

    op                          before      with the helper
    int8_gemm                   +6.02 us    +6.01 us      (bare torch._int_mm: 2.4 to 2.8 us)
    int8_gemm, out=             +11.86 us   +11.88 us     (validation.out_tensor's overlap check)
    int8_scaled_gemm            +19.43 us   +19.16 us     (the two-pass epilogue included)
    quantize_int8               +4.52 us    +4.69 us      (reference: 29 to 36 us; noisiest)

The same comparison, without the old code, stays in the suite as pytest-benchmark entries
(`kernel op` vs `impl` is the eager path of a kernel op against calling its implementation):

    OMP_NUM_THREADS=1 python -m pytest tests/test_cpu_benchmark.py -k overhead --benchmark-enable \\
        --benchmark-columns=min,median,iqr,rounds --benchmark-sort=name
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

NAMESPACE = "kernelhub"

# Every registered kernel op by name (without the namespace), in registration order: the tests
# hold each one's fake to its eager result.
KERNEL_OPS: dict[str, Callable] = {}

_OPTIONAL_TENSOR = torch.Tensor | None


def kernel_op(name: str, *, fake: Callable) -> Callable[[Callable], Callable]:
    """Register the decorated implementation as the custom op `kernelhub::<name>` with `fake` as
    its fake, and return the kernel op: a function with the implementation's signature that runs
    the implementation itself in eager mode and the registered op while compiling.

    The kernel op carries `impl` (the implementation), `overload` (the registered
    `torch.ops.kernelhub.<name>.default`) and `takes_out` (whether its last parameter is `out`).
    Raises TypeError at registration for an `out` that is not last or not `torch.Tensor | None`,
    or an `out` beside a tuple result.
    """
    def register(impl: Callable) -> Callable:
        signature = inspect.signature(impl, eval_str=True)
        params = list(signature.parameters.values())
        takes_out = bool(params) and params[-1].name == "out"
        if any(p.name == "out" for p in params[:-1]):
            raise TypeError(f"{name}: `out` must be the implementation's last parameter")
        if takes_out:
            if params[-1].annotation != _OPTIONAL_TENSOR:
                raise TypeError(f"{name}: `out` must be annotated torch.Tensor | None, "
                                f"got {params[-1].annotation!r}")
            if signature.return_annotation is not torch.Tensor:
                raise TypeError(f"{name}: an op with `out` returns one torch.Tensor, "
                                f"got {signature.return_annotation!r}")
            params = params[:-1]

        def prototype(*args):  # what the schema is read from: the signature without `out`
            raise AssertionError("never called")

        prototype.__signature__ = signature.replace(parameters=params)
        schema = torch.library.infer_schema(prototype, mutates_args=())
        run = (lambda *args: impl(*args, None)) if takes_out else impl  # the registered op allocates its result
        custom = torch.library.custom_op(f"{NAMESPACE}::{name}", run, mutates_args=(), schema=schema)
        custom.register_fake(fake)
        overload = getattr(getattr(torch.ops, NAMESPACE), name).default
        is_compiling = torch.compiler.is_compiling  # looked up once, not on every eager call

        if takes_out:
            def call(*args):
                if is_compiling():
                    out = args[-1]
                    result = overload(*args[:-1])
                    return result if out is None else out.copy_(result)
                return impl(*args)
        else:
            def call(*args):
                if is_compiling():
                    return overload(*args)
                return impl(*args)

        functools.update_wrapper(call, impl)
        call.impl, call.overload, call.takes_out = impl, overload, takes_out
        KERNEL_OPS[name] = call
        return call

    return register
