"""Which implementation a call runs: `KERNELHUB_BACKEND`, read on every call.

- `auto` (default): CUDA tensors run the Triton kernels with the best stored config; CPU tensors
  take the family's fastest exact CPU path.
- `triton`: always the Triton kernels (on a machine without a GPU, in Triton's interpreter).
- `reference`: the pure-PyTorch specification in `kernelhub.reference`.

The choice costs about 0.1 us a call (every public op makes it once): the variable is read from
the mapping underneath `os.environ` (one dict lookup; `os.environ.get` encodes the name and, with
the variable unset, raises and catches a KeyError: 0.7 us), each value seen is parsed once, and the
device is told by `Tensor.is_cuda` (`device.type` builds a string: 0.2 us). A changed variable
takes effect on the next call, as with `os.environ.get`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

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


def _settings() -> tuple[Mapping, object]:
    """Where `KERNELHUB_BACKEND` is read from and under which key, as cheaply as this Python allows:
    CPython's `os.environ` keeps its variables in a dict `_data` under encoded names, updated by
    every `os.environ` write; elsewhere, `os.environ` itself."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and callable(encode):
        return data, encode(BACKEND_ENV)
    return os.environ, BACKEND_ENV


_SETTINGS, _SETTING_KEY = _settings()
_MODES: dict[object, str] = {}  # a stored value of the variable (None: unset) -> the backend it names; valid ones only


def _mode(raw: object) -> str:
    """The backend a stored value of `KERNELHUB_BACKEND` names; ValueError for an unknown one."""
    text = os.environ.decodevalue(raw) if isinstance(raw, bytes) else raw
    mode = text or "auto"
    if mode not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={mode!r}: expected one of {', '.join(BACKENDS)}")
    _MODES[raw] = mode
    return mode


def choose(x: torch.Tensor) -> str:
    """'reference', 'triton' or 'cpu' for a call whose tensors are on `x`'s device."""
    raw = _SETTINGS.get(_SETTING_KEY)
    mode = _MODES.get(raw) or _mode(raw)
    if mode == "auto":
        return "triton" if x.is_cuda else "cpu"
    if mode == "triton" and not x.is_cuda:
        problem = interpreter_problem()
        if problem:
            raise RuntimeError(f"{BACKEND_ENV}=triton: {problem}")
    return mode
