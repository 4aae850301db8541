"""Sequence-parallel tensor-parallel linear layers (Megatron-LM's sequence parallelism, as Flux and
PyTorch's async TP run it): each rank holds a 1/W shard of the weights and of the tokens, and the
communication is overlapped with the GEMM by `kernelhub.ops.all_gather_gemm` and
`kernelhub.ops.gemm_reduce_scatter`.

A transformer block's two halves, on each of W ranks (x: this rank's M_local tokens):

    q, k, v = qkv(x)          # ColumnParallelLinear.from_linears([q_proj, k_proj, v_proj])
                              #   [*, M_local, hidden] -> every token, this rank's heads
    ... attention over this rank's heads ...
    y = o(attn)               # RowParallelLinear.from_linear(o_proj)
                              #   [*, W * M_local, hidden / W] -> this rank's tokens, summed over ranks
    gate, up = gate_up(y)     # ColumnParallelLinear.from_linears([gate_proj, up_proj])
    z = down(act(gate) * up)  # RowParallelLinear.from_linear(down_proj)

For rank r of W, with X the concatenation of every rank's input along the token axis (the
second-to-last) and Y = linear(X) the unsharded layer's output:

- ColumnParallelLinear: x = X[..., r*M_local:(r+1)*M_local, :] gives, for each linear i, its output
  columns r*N_i/W ... (r+1)*N_i/W for every token: Y_i[..., r*N_i/W:(r+1)*N_i/W].
- RowParallelLinear: x = X[..., r*K/W:(r+1)*K/W] (this rank's input features, for every token)
  gives this rank's tokens of the summed output: Y[..., r*M/W:(r+1)*M/W, :].

Leading dimensions `*` (a batch) travel with the tokens. The ops work on 2-D [rows, K] operands
whose rows are split into one block per rank, so the token axis is moved to the front: x
[*, M, K] is read as rows [M * prod(*), K] in the order (token, *), where rank r's block of rows
is exactly its block of tokens. Outputs come back in that order too: they are views [*, M', N]
of memory laid out [M', *, N] (token-major, Megatron's [S, B, H] layout), with no copy. A
ColumnParallelLinear's output, or anything elementwise of it (act(gate) * up), therefore reaches
the next RowParallelLinear without a copy; a batch-major input costs one copy of the input
(`.contiguous()` on an output gives batch-major memory if something needs it). With no leading
dimensions every tensor is contiguous.

The layers are for inference: no backward (call them under `torch.no_grad()` or
`torch.inference_mode()` when the input requires grad). Sizes that do not divide by the world
size raise a ValueError naming the argument and the numbers, locally, before any collective:
out_features for a ColumnParallelLinear and in_features for a RowParallelLinear when the layer is
built, the token count M of a RowParallelLinear's input at each call. Every rank of the group
must call a layer with the same shapes: the ops' signature exchange turns shapes that differ
into an error on every rank, but an input that fails the layer's own checks on one rank only
leaves the others waiting in that exchange until the process group's timeout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import accumulate

import torch
import torch.distributed as dist
from torch import nn

import kernelhub.ops as ops

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rank_and_world(group) -> tuple[int, int]:
    """This process's rank in `group` (None: the default group) and the group's size."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialised: call torch.distributed.init_process_group "
                           "first (gloo on CPU, nccl on GPU)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
    return rank, dist.get_world_size(group)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def _divisible(name: str, value: int, world: int) -> int:
    """value / world, or a ValueError naming `name` and both numbers."""
    if value % world:
        raise ValueError(f"{name} = {value} is not divisible by the world size {world}")
    return value // world


def _check_linear(name: str, linear) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{name}: expected a torch.nn.Linear, got {type(linear).__name__}")
    if linear.weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32, float16 or bfloat16 weight, got "
                        f"{str(linear.weight.dtype).removeprefix('torch.')}")
    return linear


def _check_input(layer: str, x, features: int, weight: torch.Tensor, meaning: str) -> None:
    """x must be a [*, M, features] tensor of the weight's dtype and device, with no autograd."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x: expected dtype {str(weight.dtype).removeprefix('torch.')} (the {layer}'s weight dtype), "
                        f"got {str(x.dtype).removeprefix('torch.')}")
    if x.device != weight.device:
        raise ValueError(f"x: expected a tensor on the {layer}'s device {weight.device}, got {x.device}")
    if x.dim() < 2 or x.shape[-1] != features:
        raise ValueError(f"x: expected shape [*, M, {meaning} = {features}], got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x: every dimension must be at least 1, got {tuple(x.shape)}")
    if x.requires_grad and torch.is_grad_enabled():
        raise TypeError(f"x: requires grad, but {layer} has no backward: call it under torch.no_grad() / "
                        "torch.inference_mode(), or pass x.detach()")


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """x [*, M, K] as rows [M * prod(*), K] in (token, *) order (a view when x is token-major)."""
    return x.movedim(-2, 0).reshape(-1, x.shape[-1])


def _from_token_rows(rows: torch.Tensor, tokens: int, leading: Sequence[int]) -> torch.Tensor:
    """rows [tokens * prod(leading), N] in (token, *) order as a [*leading, tokens, N] view."""
    return rows.view(tokens, *leading, rows.shape[-1]).movedim(0, -2)


class ColumnParallelLinear(nn.Module):
    """One or several linears sharing an input, split by output features over the ranks of `group`,
    with the tokens gathered from every rank: one `all_gather_gemm` for all of them.

    Input x `[*, M_local, in_features]`: this rank's tokens (float32, float16 or bfloat16, the
    weight's dtype). Output, for each linear i, `[*, W * M_local, out_features[i] / W]`: every
    rank's tokens (rank r's at r * M_local) and this rank's columns of linear i's output
    (r * N_i / W ... (r + 1) * N_i / W); a tuple of them when the layer was built from a list of
    widths (`from_linears`), one tensor when from one (`from_linear`). Each output is a view of
    token-major memory (module docstring).

    Parameters (the state dict, this rank's shard): `weight` `[sum_i N_i / W, in_features]`, the
    rows r * N_i / W ... (r + 1) * N_i / W of each linear's weight, stacked; `bias`
    `[sum_i N_i / W]` likewise, or None. The constructor makes them zeros: build a layer with
    `from_linear` / `from_linears`, or load a state dict. They do not require grad.
    """

    def __init__(self, in_features: int, out_features: int | Sequence[int], bias: bool = True, *,
                 group=None, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.rank, self.world_size = _rank_and_world(group)
        self.group = group
        self.in_features = _positive_int("in_features", in_features)
        self.fused = not isinstance(out_features, int)
        widths = tuple(out_features) if self.fused else (out_features,)
        if not widths:
            raise ValueError("out_features: expected at least one width, got none")
        names = [f"out_features[{i}]" for i in range(len(widths))] if self.fused else ["out_features"]
        self.out_features = tuple(_positive_int(name, n) for name, n in zip(names, widths))
        self.local_out_features = tuple(_divisible(name, n, self.world_size)
                                        for name, n in zip(names, self.out_features))
        rows = sum(self.local_out_features)
        self.weight = nn.Parameter(torch.zeros(rows, in_features, device=device, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(rows, device=device, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None) -> ColumnParallelLinear:
        """This rank's shard of `linear` (the full layer, the same on every rank): forward returns
        one tensor `[*, W * M_local, out_features / W]`."""
        _check_linear("linear", linear)
        return cls._sharded([linear], ["linear"], linear.out_features, group)

    @classmethod
    def from_linears(cls, linears: Iterable[nn.Linear], group=None) -> ColumnParallelLinear:
        """This rank's shard of several linears of one input (q, k, v or gate, up; the full layers,
        the same on every rank), fused: forward gathers the tokens once and returns a tuple, the
        i-th output `[*, W * M_local, linears[i].out_features / W]`. linears: a list, tuple or
        nn.ModuleList whose linears have one in_features, dtype and device, and all a bias or
        none."""
        if isinstance(linears, nn.Linear):
            raise TypeError("linears: expected a list of torch.nn.Linear, got one torch.nn.Linear "
                            "(from_linear builds a layer of one)")
        if not isinstance(linears, Iterable):
            raise TypeError(f"linears: expected a list of torch.nn.Linear, got {type(linears).__name__}")
        linears = list(linears)
        if not linears:
            raise ValueError("linears: expected at least one torch.nn.Linear, got none")
        names = [f"linears[{i}]" for i in range(len(linears))]
        for name, linear in zip(names, linears):
            _check_linear(name, linear)
        first = linears[0]
        for name, linear in zip(names[1:], linears[1:]):
            if linear.in_features != first.in_features:
                raise ValueError(f"{name}: in_features = {linear.in_features}, but linears[0]'s is "
                                 f"{first.in_features}: fused linears share one input")
            if linear.weight.dtype != first.weight.dtype or linear.weight.device != first.weight.device:
                raise ValueError(f"{name}: weight of {str(linear.weight.dtype).removeprefix('torch.')} on "
                                 f"{linear.weight.device}, but linears[0]'s is of "
                                 f"{str(first.weight.dtype).removeprefix('torch.')} on {first.weight.device}: "
                                 "fused linears have one dtype and device")
            if (linear.bias is None) != (first.bias is None):
                raise ValueError(f"{name} has {'no' if linear.bias is None else 'a'} bias, but linears[0] "
                                 f"{'has none' if first.bias is None else 'has one'}: fused linears all have a bias "
                                 "or none has")
        return cls._sharded(linears, names, [linear.out_features for linear in linears], group)

    @classmethod
    def _sharded(cls, linears: list[nn.Linear], names: list[str], out_features, group) -> ColumnParallelLinear:
        rank, world = _rank_and_world(group)
        for name, linear in zip(names, linears):  # errors name the linear, not the constructor's argument
            _divisible(f"{name}: out_features", linear.out_features, world)
        first = linears[0]
        layer = cls(first.in_features, out_features, bias=first.bias is not None, group=group,
                    device=first.weight.device, dtype=first.weight.dtype)
        shards = [slice(rank * n, (rank + 1) * n) for n in layer.local_out_features]
        with torch.no_grad():
            layer.weight.copy_(torch.cat([linear.weight.detach()[rows] for linear, rows in zip(linears, shards)]))
            if layer.bias is not None:
                layer.bias.copy_(torch.cat([linear.bias.detach()[rows] for linear, rows in zip(linears, shards)]))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        _check_input("ColumnParallelLinear", x, self.in_features, self.weight, "in_features")
        *leading, tokens, _ = x.shape
        bounds = [0, *accumulate(self.local_out_features)]  # each linear's rows of the stacked weight
        weights = [self.weight[lo:hi].t() for lo, hi in zip(bounds, bounds[1:])]  # [K, N_i / W] views
        outs = ops.all_gather_gemm(_token_rows(x), weights, group=self.group)  # [W * M_local * prod(*), N_i / W]
        if self.bias is not None:
            for out, lo, hi in zip(outs, bounds, bounds[1:]):
                out.add_(self.bias[lo:hi])
        outs = tuple(_from_token_rows(out, self.world_size * tokens, leading) for out in outs)
        return outs if self.fused else outs[0]

    def extra_repr(self) -> str:
        widths = self.out_features if self.fused else self.out_features[0]
        return (f"in_features={self.in_features}, out_features={widths}, bias={self.bias is not None}, "
                f"rank={self.rank}, world_size={self.world_size}")


class RowParallelLinear(nn.Module):
    """A linear split by input features over the ranks of `group`, its output summed over the ranks
    and scattered by tokens: one `gemm_reduce_scatter`.

    Input x `[*, M, in_features / W]`: every token, this rank's input features
    (r * K / W ... (r + 1) * K / W), as a ColumnParallelLinear's output (or the attention over its
    heads) has them; M divisible by W. Output `[*, M / W, out_features]`: this rank's tokens
    (r * M / W ... (r + 1) * M / W) of the summed output, the bias added once to it, a view of
    token-major memory (module docstring).

    Parameters (the state dict, this rank's shard): `weight` `[out_features, in_features / W]`,
    columns r * K / W ... (r + 1) * K / W of the linear's weight; `bias` `[out_features]` (whole:
    it is added after the sum), or None. The constructor makes them zeros: build a layer with
    `from_linear`, or load a state dict. They do not require grad.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group=None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.rank, self.world_size = _rank_and_world(group)
        self.group = group
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.local_in_features = _divisible("in_features", in_features, self.world_size)
        self.weight = nn.Parameter(torch.zeros(out_features, self.local_in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None) -> RowParallelLinear:
        """This rank's shard of `linear` (the full layer, the same on every rank)."""
        _check_linear("linear", linear)
        rank, world = _rank_and_world(group)
        local = _divisible("linear: in_features", linear.in_features, world)
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, group=group,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight.detach()[:, rank * local:(rank + 1) * local])
            if layer.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("RowParallelLinear", x, self.local_in_features, self.weight, "in_features / W")
        *leading, tokens, _ = x.shape
        # The reduce-scatter splits the rows into W blocks; in (token, *) order each block is a
        # block of tokens only if the tokens divide (M * prod(*) may divide when M does not).
        local_tokens = _divisible("x: M = x.shape[-2]", tokens, self.world_size)
        out = ops.gemm_reduce_scatter(_token_rows(x), self.weight.t(), group=self.group)  # [M / W * prod(*), N]
        if self.bias is not None:
            out.add_(self.bias)  # once, on this rank's rows of the sum
        return _from_token_rows(out, local_tokens, leading)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, world_size={self.world_size}")
