"""What a real launch would compile, captured without a GPU.

A host wrapper (`int8_gemm_triton`, ...) is run as it runs on a GPU, on meta tensors (shapes,
dtypes and strides, no data; a meta tensor's address is 0, aligned as every CUDA allocation is),
under a stand-in Triton driver that reports the chosen target. Triton's JIT then binds the
arguments exactly as for a launch on that GPU: each pointer's dtype, each integer's specialisation
(divisible by 16, or equal to 1 and made a constant), every constexpr, and the launch options. Its
`jit_cache_hook`, called just before it would compile, records all of that and tells the JIT to
stop there, so nothing is compiled or launched: `Launch` is what `triton.compile` then builds.

Needs the real JIT: Triton imported with `TRITON_INTERPRET=0` (the compile workers are started so).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from kernelhub.compiler.targets import Target

@dataclass(frozen=True)
class Launch:
    """One Triton kernel as a launch would compile it (JSON-able, so it can cross to a worker)."""

    function: str  # "module:qualname" of the @triton.jit function
    signature: dict[str, str]  # argument -> "*i8", "i32", "constexpr", ...
    constants: list  # [[path, value], ...]: the constexprs and the specialised-to-1 integers
    attrs: list  # [[path, [[attribute, value], ...]], ...]: e.g. tt.divisibility 16
    options: dict  # num_warps, num_stages, num_ctas, enable_fp_fusion, ...

    @property
    def name(self) -> str:
        return self.function.rsplit(".", 1)[-1].rsplit(":", 1)[-1]

    def to_dict(self) -> dict:
        return {"function": self.function, "signature": self.signature, "constants": self.constants,
                "attrs": self.attrs, "options": self.options}

    @classmethod
    def from_dict(cls, d: dict) -> Launch:
        return cls(d["function"], d["signature"], d["constants"], d["attrs"], d["options"])

    def jit_function(self):
        module, qualname = self.function.split(":")
        return getattr(importlib.import_module(module), qualname)

    def source(self):
        """The `ASTSource` Triton compiles."""
        from triton.compiler import ASTSource

        constants = {tuple(path): value for path, value in self.constants}
        attrs = {tuple(path): [list(a) for a in value] for path, value in self.attrs}
        return ASTSource(self.jit_function(), dict(self.signature), constants, attrs)


def _json_constant(value):
    """A constexpr as JSON holds it (kernelhub's kernels take ints, bools, floats and None)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a constexpr of type {type(value).__name__}: {value!r}")


# The options a launch sets (from the hook's report); Triton fills in the rest for the target.
_OPTION_NAMES = ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion", "launch_cooperative_grid")


class _TargetDriver:
    """A Triton driver that reports `target` and a device of its own (the JIT caches its binder per
    device, so each target gets another device number), and can launch nothing."""

    _numbers = itertools.count(1_000)

    def __init__(self, target: Target):
        self._target = target.gpu_target()
        self._device = next(self._numbers)

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self._target

    def get_current_device(self) -> int:
        return self._device

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_device_interface(self):  # what Triton's benchmarking asks for: never reached here
        raise RuntimeError("kernelhub.compiler: no device to launch on")


def _check_real_jit() -> None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.cdiv, InterpretedFunction):
        raise RuntimeError("kernelhub.compiler needs Triton's JIT, but Triton was imported in interpreter mode: "
                           "run it in a process started with TRITON_INTERPRET=0 (the compile workers are)")


_drivers: dict[str, _TargetDriver] = {}


@contextlib.contextmanager
def _capturing(target: Target) -> Iterator[list[Launch]]:
    from triton import knobs
    from triton.runtime.driver import driver

    _check_real_jit()
    launches: list[Launch] = []

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:
        jit = fn.jit_function
        launches.append(Launch(
            function=f"{jit.fn.__module__}:{jit.fn.__qualname__}",
            signature=dict(compile["signature"]),
            constants=[[list(path), _json_constant(value)] for path, value in compile["constants"].items()],
            attrs=[[list(path), [list(a) for a in value]] for path, value in compile["configs"][0].items() if value],
            options={name: compile[name] for name in _OPTION_NAMES if name in compile},
        ))
        return True  # the JIT stops here: nothing is compiled or launched

    # One driver per target for the life of the process: the JIT caches a binder per device number.
    stand_in = _drivers.setdefault(target.arch, _TargetDriver(target))
    previous_hook, previous_driver = knobs.runtime.jit_cache_hook, driver._active
    driver.set_active(stand_in)
    knobs.runtime.jit_cache_hook = hook
    try:
        yield launches
    finally:
        # Not reset_active(): that would create the default driver, which fails where there is no GPU.
        knobs.runtime.jit_cache_hook = previous_hook
        driver.set_active(previous_driver)


def capture(target: Target, launch: Callable[[], object]) -> list[Launch]:
    """The Triton kernels `launch()` (a host wrapper called on meta tensors) would compile for `target`."""
    with _capturing(target) as launches:
        launch()
    return launches
