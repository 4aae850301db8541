"""Argument checks for the public ops: each error names the argument and what was expected.

They run before anything launches, so a bad call never reaches a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`: how dtypes appear in messages and in the config database."""
    return str(dtype).removeprefix("torch.")


def tensor(name: str, value, *, dtypes: Sequence[torch.dtype], ndim: int) -> torch.Tensor:
    """`value` must be a tensor of one of `dtypes` with `ndim` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        expected = " or ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {expected}, got {dtype_name(value.dtype)}")
    if value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
    return value


def shape(name: str, value: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    """`value.shape` must equal `expected`; `meaning` spells the expected shape symbolically."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {meaning} = {tuple(expected)}, got {tuple(value.shape)}")


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    present = {n: t for n, t in tensors.items() if t is not None}
    devices = {n: t.device for n, t in present.items()}
    first_name, first = next(iter(devices.items()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(f"{n} is on {d} but {first_name} is on {first}: all tensors must be on one device")
    return first


def out_tensor(value: torch.Tensor | None, *, shape: Sequence[int], dtype: torch.dtype,
               device: torch.device) -> torch.Tensor | None:
    """A user-provided `out=` must match exactly: shape, dtype and device."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape) or value.dtype != dtype or value.device != device:
        raise ValueError(f"out: expected shape {tuple(shape)}, dtype {dtype_name(dtype)}, "
                         f"device {device}; got {tuple(value.shape)}, {dtype_name(value.dtype)}, {value.device}")
    return value
