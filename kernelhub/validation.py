"""Argument checks for the public ops: each error names the argument and what was expected.

They run before anything launches, so a bad call never reaches a kernel. Three rules hold for
every op and live here, once:

- No autograd. The ops have no backward, so with grad mode on, an input that requires grad is a
  TypeError (`tensor`, `out_tensor`); under `torch.no_grad()` / `torch.inference_mode()`, where
  inference runs, Parameters and other grad-requiring tensors are read like any tensor.
- Any view is an input. Every path reads its operands through their strides or copies them first
  (broadcast, overlapping, transposed, sliced: the result never depends on the layout).
- `out=` is written as if element by element in no particular order, so it must not overlap
  itself (a zero stride, rows that share memory) nor any input (`out_tensor(..., inputs=...)`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`: how dtypes appear in messages and in the config database."""
    return str(dtype).removeprefix("torch.")


def refuse_autograd(name: str, value: torch.Tensor) -> None:
    """A TypeError for a tensor autograd would have to track (grad mode on): the ops have no backward."""
    if value.requires_grad and torch.is_grad_enabled():
        raise TypeError(f"{name}: requires grad, but kernelhub ops have no backward: call under "
                        f"torch.no_grad() / torch.inference_mode(), or pass {name}.detach()")


def tensor(name: str, value, *, dtypes: Sequence[torch.dtype], ndim: int) -> torch.Tensor:
    """`value` must be a tensor of one of `dtypes` with `ndim` dimensions (and need no autograd)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        expected = " or ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {expected}, got {dtype_name(value.dtype)}")
    if value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
    if value.requires_grad:  # tested here first: the check costs a call on every op's hot path
        refuse_autograd(name, value)
    return value


def shape(name: str, value: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    """`value.shape` must equal `expected`; `meaning` spells the expected shape symbolically."""
    if value.shape != expected and tuple(value.shape) != tuple(expected):  # a torch.Size equals its tuple
        raise ValueError(f"{name}: expected shape {meaning} = {tuple(expected)}, got {tuple(value.shape)}")


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (None is skipped) on one device; returns it."""
    first = None
    for value in tensors.values():
        if value is not None:
            if first is None:
                first = value.device
            elif value.device != first:
                _refuse_devices(tensors)
    return first


def _refuse_devices(tensors: Mapping[str, torch.Tensor | None]) -> None:
    """The ValueError naming the first tensor on another device than the first tensor's."""
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(f"{n} is on {d} but {first_name} is on {first}: all tensors must be on one device")


def device(name: str, value) -> torch.device:
    """A `torch.device` or device string that names a device this process can use.

    `cuda` without an index becomes `cuda:<current>`, so it compares equal to a tensor's `.device`.
    """
    try:
        parsed = torch.device(value)
    except (TypeError, RuntimeError) as exc:
        raise TypeError(f"{name}: expected a torch.device or a device string, got {value!r} ({exc})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {parsed} requested, but CUDA is not available")
        if parsed.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        if parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {parsed} requested, but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return parsed


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of `t` may share memory (a zero stride, or strides too small for the sizes).

    Exact for every layout slicing, transposing, permuting and expanding can make: with the
    dimensions of size > 1 sorted by stride, each stride must exceed the span of the smaller ones.
    A stranger interleaved layout that passes no element twice may be reported as overlapping.
    """
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    span = 0  # in elements, the reach of the dimensions with smaller strides
    for stride, size in dims:
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of the memory `t` can touch."""
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def _overlapped_input(out: torch.Tensor, inputs: Mapping[str, torch.Tensor | None]) -> str | None:
    """The first input whose memory may be `out`'s (conservatively: their address ranges meet)."""
    if out.numel() == 0:
        return None
    out_start, out_end = _byte_span(out)
    for name, t in inputs.items():
        if t is None or t.numel() == 0 or t.device != out.device:
            continue
        start, end = _byte_span(t)
        if start < out_end and out_start < end:
            return name
    return None


def out_tensor(value: torch.Tensor | None, *, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
               inputs: Mapping[str, torch.Tensor | None] | None = None,
               advice: Mapping[str, str] | None = None) -> torch.Tensor | None:
    """A user-provided `out=`: exactly `shape`, `dtype` and `device`, any strides, writable without
    autograd, with no two elements in the same memory, and sharing no memory with `inputs`
    (name -> tensor; `advice` maps a name to what to do instead, appended to that error).

    While torch.compile traces there are no addresses to compare; the compiled op then computes
    into a fresh tensor and copies it into `out`, which is right even if they overlap.
    """
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape) or value.dtype != dtype or value.device != device:
        raise ValueError(f"out: expected shape {tuple(shape)}, dtype {dtype_name(dtype)}, "
                         f"device {device}; got {tuple(value.shape)}, {dtype_name(value.dtype)}, {value.device}")
    refuse_autograd("out", value)
    if has_internal_overlap(value):
        raise ValueError(f"out: elements share memory (strides {tuple(value.stride())} for shape "
                         f"{tuple(value.shape)}), so what it holds would depend on the order of the writes; "
                         "pass a tensor with one memory location per element (e.g. torch.empty)")
    if inputs and not torch.compiler.is_compiling():
        name = _overlapped_input(value, inputs)
        if name is not None:
            hint = (advice or {}).get(name)
            raise ValueError(f"out: overlaps {name} in memory" + (f": {hint}" if hint else
                             f"; the op would overwrite {name} while reading it: pass a separate out"))
    return value
