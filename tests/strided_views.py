"""Every kind of view torch can make, all holding the same values: the inputs of the layout tests.

`layouts(t)` yields `(name, view)` for a contiguous tensor `t`, each view equal to `t` element for
element but laid out differently in memory:

    contiguous           t itself
    transposed           the dimensions in reverse order in memory (what `.t()` / `.permute` give)
    sliced               step 2 in every dimension, at an offset, inside a larger buffer
    negative_index       the tail of a larger flat buffer, `buf[-t.numel():]` (storage offset > 0,
                         ending at the end of the storage)
    broadcast_d{i}       a zero stride in dimension i (`expand`), when t is constant along i;
                         `..._transposed` the same from the transposed layout (strides like (1, 0))
    broadcast_all        every stride zero, when t is one value repeated
    overlapping          the last two dimensions with strides (1, 1), so neighbouring rows share
                         memory (`as_strided`), when t is constant along their anti-diagonals

Padding around the sliced and negative-index views is poisoned (`kernelhub.checking.poison_`), so a
kernel that reads past a view reads garbage. `structured(draw, shape, kind)` builds values that
admit the broadcast ("rows": constant along dimension 0, "cols": along the last) or the
overlapping views ("hankel"); `layouts(t, writable=True)` yields only the layouts an `out=` may
have (one memory location per element).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from kernelhub.checking import poison_

KINDS = ("rows", "cols", "hankel")


def _poisoned(shape, like: torch.Tensor) -> torch.Tensor:
    buf = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf.fill_(True) if buf.dtype == torch.bool else poison_(buf)


def transposed(t: torch.Tensor) -> torch.Tensor:
    """`t`'s values with its dimensions in reverse order in memory."""
    reverse = list(range(t.dim()))[::-1]
    return t.permute(reverse).contiguous().permute(reverse)


def _sliced(t: torch.Tensor) -> torch.Tensor:
    big = _poisoned([2 * n + 1 for n in t.shape], t)
    view = big[tuple(slice(1, 1 + 2 * n, 2) for n in t.shape)]
    return view.copy_(t)


def _negative_index(t: torch.Tensor) -> torch.Tensor:
    flat = _poisoned((t.numel() + 7,), t)
    return flat[-t.numel():].view(t.shape).copy_(t) if t.numel() else flat[:0].view(t.shape)


def _broadcasts(t: torch.Tensor, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    source = t if layout == "" else transposed(t)
    for dim, size in enumerate(t.shape):
        if size > 1:
            view = source.narrow(dim, 0, 1).expand(t.shape)
            if torch.equal(view, t):
                yield f"broadcast_d{dim}{layout}", view
    if layout == "" and t.numel() > 1 and t.dim() > 0:
        view = t.reshape(-1)[:1].view([1] * t.dim()).expand(t.shape)
        if torch.equal(view, t):
            yield "broadcast_all", view


def _overlapping(t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if t.dim() < 2 or t.shape[-2] < 2 or t.shape[-1] < 2:
        return
    cols = t.shape[-1]
    # The anti-diagonals: the first row, then the last column below it.
    diagonals = torch.cat([t[..., 0, :], t[..., 1:, cols - 1]], dim=-1).contiguous()  # [..., rows + cols - 1]
    view = diagonals.as_strided(t.shape, (*diagonals.stride()[:-1], 1, 1))
    if torch.equal(view, t):
        yield "overlapping", view


def layouts(t: torch.Tensor, *, writable: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view) pairs of `t`'s values in every layout its values allow (see the module docstring)."""
    assert t.is_contiguous(), "layouts() starts from a contiguous tensor"
    yield "contiguous", t
    if t.dim() >= 2:
        yield "transposed", transposed(t)
    yield "sliced", _sliced(t)
    yield "negative_index", _negative_index(t)
    if writable:
        return
    yield from _broadcasts(t, "")
    if t.dim() >= 2:
        yield from _broadcasts(t, "_transposed")
    yield from _overlapping(t)


def structured(draw: Callable[..., torch.Tensor], shape, kind: str) -> torch.Tensor:
    """A contiguous tensor of `shape` from `draw(*shape)` (random values), made to admit the
    broadcast views ("rows": constant along dimension 0; "cols": along the last dimension) or the
    overlapping one ("hankel": constant along the anti-diagonals of the last two dimensions)."""
    shape = tuple(shape)
    if kind == "rows" and shape:
        return draw(1, *shape[1:]).expand(shape).contiguous()
    if kind == "cols" and shape:
        return draw(*shape[:-1], 1).expand(shape).contiguous()
    if kind == "hankel" and len(shape) >= 2:
        rows, cols = shape[-2], shape[-1]
        diagonals = draw(*shape[:-2], rows + cols - 1)
        return diagonals.as_strided(shape, (*diagonals.stride()[:-1], 1, 1)).contiguous()
    return draw(*shape)
