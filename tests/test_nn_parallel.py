"""kernelhub.nn.ColumnParallelLinear / RowParallelLinear on local gloo ranks (W = 2 and 3).

Each rank builds its shard from the full layers (the same on every rank) and feeds its part of
the full input; the result must equal the unsharded layers' output on the full input, cut to
what that rank holds, bit for bit: weights, biases and inputs are small integers in float32, so
every sum is exact whatever its order. That holds through a Llama MLP with ReLU (SiLU makes the
down projection's input non-integer, so its sums depend on the order: checked to a tolerance)
and through the attention projections around a stand-in for attention that is exact.

What each rank runs is defined here, at module level, so that LocalWorld can send it by name.
One world per size serves the whole module (starting ranks costs seconds).
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import local_worlds as worlds  # noqa: F401
from kernelhub.nn import ColumnParallelLinear, RowParallelLinear

# -- what each rank runs ---------------------------------------------------------------------------


def _ints(*shape: int, seed: int) -> torch.Tensor:
    """Integers in [-2, 2] as float32, the same on every rank for a seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=gen).to(torch.float32)


def _linear(in_features: int, out_features: int, bias: bool, seed: int) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(_ints(out_features, in_features, seed=seed))
        if bias:
            linear.bias.copy_(_ints(out_features, seed=seed + 1))
    return linear


def _columns(y: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s block of the last axis of y (a column-parallel output's shard)."""
    width = y.shape[-1] // world
    return y[..., rank * width:(rank + 1) * width]


def _tokens(y: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s block of the token axis (second-to-last) of y."""
    count = y.shape[-2] // world
    return y[..., rank * count:(rank + 1) * count, :]


def _compare(failures: list[str], what: str, got, expected: torch.Tensor, exact: bool = True) -> None:
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        failures.append(f"{what}: got {shape}, expected shape {tuple(expected.shape)}")
    elif exact and not torch.equal(got, expected):
        failures.append(f"{what}: max |diff| {(got - expected).abs().max().item()}")
    elif not exact and not torch.allclose(got, expected, rtol=1e-5, atol=1e-4):
        failures.append(f"{what}: max |diff| {(got - expected).abs().max().item()} beyond the tolerance")


def llama_mlp(bias: bool, batch: tuple[int, ...], act: str) -> list[str]:
    """down(act(gate(x)) * up(x)) with gate + up fused in one ColumnParallelLinear and down a
    RowParallelLinear, against the unsharded MLP on every rank's tokens; the mismatches."""
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, intermediate, local_tokens = 10, 4 * world, 3
    gate, up = _linear(hidden, intermediate, bias, seed=1), _linear(hidden, intermediate, bias, seed=3)
    down = _linear(intermediate, hidden, bias, seed=5)
    activation = {"relu": torch.relu, "silu": nn.functional.silu}[act]
    x_full = _ints(*batch, world * local_tokens, hidden, seed=7)  # every rank's tokens, in rank order
    with torch.no_grad():
        gate_full, up_full = gate(x_full), up(x_full)
        y_full = down(activation(gate_full) * up_full)

    gate_up = ColumnParallelLinear.from_linears([gate, up])
    down_rows = RowParallelLinear.from_linear(down)
    x = _tokens(x_full, rank, world)  # [*, M_local, hidden]
    outputs = gate_up(x)
    failures = []
    if not isinstance(outputs, tuple) or len(outputs) != 2:
        return [f"gate_up returned {type(outputs).__name__}, expected a tuple of 2"]
    g, u = outputs
    _compare(failures, "gate", g, _columns(gate_full, rank, world))
    _compare(failures, "up", u, _columns(up_full, rank, world))
    y = down_rows(activation(g) * u)  # [*, M_local, hidden]
    _compare(failures, f"down ({act})", y, _tokens(y_full, rank, world), exact=act != "silu")
    return failures


def attention_projections(bias: bool, batch: tuple[int, ...]) -> list[str]:
    """q, k, v fused in one ColumnParallelLinear (grouped-query widths: 2 query heads per key/value
    head), o a RowParallelLinear, around an exact stand-in for attention; the mismatches.

    The stand-in, per query head h with key/value head h // 2, is q_h * k + cumsum of v over the
    tokens: head-local like attention (so a rank computes it on its own heads), mixing tokens
    like attention (so it needs every token, in order), and integer."""
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, head_dim, local_tokens = 10, 3, 2
    heads, kv_heads = 2 * world, world
    q = _linear(hidden, heads * head_dim, bias, seed=11)
    k = _linear(hidden, kv_heads * head_dim, bias, seed=13)
    v = _linear(hidden, kv_heads * head_dim, bias, seed=15)
    o = _linear(heads * head_dim, hidden, bias, seed=17)

    def attend(q_out, k_out, v_out):  # [*, S, heads' * head_dim], [*, S, kv_heads' * head_dim] x 2
        split = lambda t: t.unflatten(-1, (-1, head_dim))  # noqa: E731  [*, S, heads, head_dim]
        qh, kh, vh = split(q_out), split(k_out), split(v_out)
        kh, vh = kh.repeat_interleave(2, dim=-2), vh.repeat_interleave(2, dim=-2)
        return (qh * kh + vh.cumsum(dim=-3)).flatten(-2)

    x_full = _ints(*batch, world * local_tokens, hidden, seed=19)
    with torch.no_grad():
        q_full, k_full, v_full = q(x_full), k(x_full), v(x_full)
        y_full = o(attend(q_full, k_full, v_full))

    qkv = ColumnParallelLinear.from_linears((q, k, v))
    o_rows = RowParallelLinear.from_linear(o)
    failures = []
    q_out, k_out, v_out = qkv(_tokens(x_full, rank, world))
    for name, got, full in (("q", q_out, q_full), ("k", k_out, k_full), ("v", v_out, v_full)):
        _compare(failures, name, got, _columns(full, rank, world))
    _compare(failures, "o", o_rows(attend(q_out, k_out, v_out)), _tokens(y_full, rank, world))
    return failures


def single_linears() -> list[str]:
    """from_linear on one linear, both layers: inputs with no and with three leading dimensions,
    batch-major (copied) and token-major (read in place) inputs, the shards in the state dict;
    the mismatches."""
    rank, world = dist.get_rank(), dist.get_world_size()
    column_linear, row_linear = _linear(7, 2 * world, True, seed=21), _linear(3 * world, 5, True, seed=23)
    column, row = ColumnParallelLinear.from_linear(column_linear), RowParallelLinear.from_linear(row_linear)
    failures = []
    for batch in [(), (2, 1, 3)]:
        x_full = _ints(*batch, world * 2, 7, seed=25)
        h_full = _ints(*batch, world * 2, 3 * world, seed=27)
        with torch.no_grad():
            column_full, row_full = column_linear(x_full), row_linear(h_full)
        _compare(failures, f"column {batch}", column(_tokens(x_full, rank, world)), _columns(column_full, rank, world))
        _compare(failures, f"row {batch}", row(_columns(h_full, rank, world)), _tokens(row_full, rank, world))
    token_major = _ints(world * 2, 4, 3, seed=29).movedim(0, 1)  # [4, M, K / W] laid out [M, 4, K / W]
    with torch.no_grad():
        expected = row_linear(torch.cat([token_major] * world, dim=-1))  # every rank passes the same shard
    _compare(failures, "row, token-major input", row(token_major), _tokens(expected, rank, world))
    state = {name: tuple(t.shape) for name, t in column.state_dict().items()}
    state |= {f"row.{name}": tuple(t.shape) for name, t in row.state_dict().items()}
    if state != {"weight": (2, 7), "bias": (2,), "row.weight": (5, 3), "row.bias": (5,)}:
        failures.append(f"state dict shapes {state}")
    if not torch.equal(column.weight, column_linear.weight[2 * rank:2 * rank + 2]) or not torch.equal(
            row.weight, row_linear.weight[:, 3 * rank:3 * rank + 3]) or column.weight.requires_grad:
        failures.append("the shards are not the linears' rows / columns of this rank, or require grad")
    return failures


def subgroup() -> str | list[str]:
    """Layers on a group of ranks 0 and 1 of three: on those, the two-rank result; on rank 2 (not
    a member), the error."""
    rank = dist.get_rank()
    group = dist.new_group([0, 1])  # every rank calls new_group, members or not
    linear, down = _linear(6, 4, True, seed=31), _linear(4, 6, True, seed=33)
    if rank == 2:
        try:
            ColumnParallelLinear.from_linear(linear, group=group)
        except ValueError as exc:
            return f"ValueError: {exc}"
        return "no error"
    x_full = _ints(2, 2 * 3, 6, seed=35)
    with torch.no_grad():
        h_full = linear(x_full)
        y_full = down(h_full)
    h = ColumnParallelLinear.from_linear(linear, group=group)(_tokens(x_full, rank, 2))
    failures = []
    _compare(failures, "column", h, _columns(h_full, rank, 2))
    _compare(failures, "row", RowParallelLinear.from_linear(down, group=group)(h), _tokens(y_full, rank, 2))
    return failures


def _error(fn, *args) -> str:
    try:
        fn(*args)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def size_errors() -> tuple[list[str], int, list[str]]:
    """The errors for sizes that do not divide by W and for bad inputs, how many collectives ran
    while making them (none may), and the mismatches of a good call afterwards."""
    from kernelhub.reference import tp_overlap as ref

    world = dist.get_world_size()
    odd = 2 * world + 1
    column = ColumnParallelLinear.from_linear(_linear(4, 2 * world, False, seed=41))
    row = RowParallelLinear.from_linear(_linear(2 * world, 4, False, seed=43))
    linear = lambda k, n, bias=True: _linear(k, n, bias, seed=45)  # noqa: E731
    original, calls = ref.all_gather_single, []

    def counting(*args, **kwargs):  # the signature exchange every op call starts with
        calls.append(1)
        return original(*args, **kwargs)

    ref.all_gather_single = counting
    try:
        errors = [
            _error(ColumnParallelLinear.from_linear, linear(4, odd)),
            _error(ColumnParallelLinear.from_linears, [linear(4, 2 * world), linear(4, odd)]),
            _error(RowParallelLinear.from_linear, linear(odd, 4)),
            _error(row, torch.ones(2, odd, 2)),  # M = odd tokens
            _error(ColumnParallelLinear.from_linears, [linear(4, 2 * world), linear(5, 2 * world)]),
            _error(ColumnParallelLinear.from_linears, [linear(4, 2 * world), linear(4, 2 * world, bias=False)]),
            _error(ColumnParallelLinear.from_linears, []),
            _error(ColumnParallelLinear.from_linears, linear(4, 2 * world)),
            _error(ColumnParallelLinear, 4, [2 * world, odd]),
            _error(column, torch.ones(3, 5)),
            _error(column, torch.ones(3, 4, dtype=torch.float64)),
            _error(column, torch.ones(4)),
            _error(row, torch.ones(world, 3)),
            _error(column, torch.ones(3, 4, requires_grad=True)),
        ]
    finally:
        ref.all_gather_single = original
    after = []
    _compare(after, "column after the errors", column(torch.ones(3, 4)), torch.ones(3 * world, 4) @ column.weight.t())
    return errors, len(calls), after


def size_errors_expected(world: int) -> list[str]:
    odd = 2 * world + 1
    return [
        f"ValueError: linear: out_features = {odd} is not divisible by the world size {world}",
        f"ValueError: linears[1]: out_features = {odd} is not divisible by the world size {world}",
        f"ValueError: linear: in_features = {odd} is not divisible by the world size {world}",
        f"ValueError: x: M = x.shape[-2] = {odd} is not divisible by the world size {world}",
        "ValueError: linears[1]: in_features = 5, but linears[0]'s is 4: fused linears share one input",
        "ValueError: linears[1] has no bias, but linears[0] has one: fused linears all have a bias or none has",
        "ValueError: linears: expected at least one torch.nn.Linear, got none",
        "TypeError: linears: expected a list of torch.nn.Linear, got one torch.nn.Linear "
        "(from_linear builds a layer of one)",
        f"ValueError: out_features[1] = {odd} is not divisible by the world size {world}",
        "ValueError: x: expected shape [*, M, in_features = 4], got (3, 5)",
        "TypeError: x: expected dtype float32 (the ColumnParallelLinear's weight dtype), got float64",
        "ValueError: x: expected shape [*, M, in_features = 4], got (4,)",
        f"ValueError: x: expected shape [*, M, in_features / W = 2], got ({world}, 3)",
        "TypeError: x: requires grad, but ColumnParallelLinear has no backward: call it under torch.no_grad() / "
        "torch.inference_mode(), or pass x.detach()",
    ]


# -- the tests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [2, 3])
def test_llama_mlp_equals_the_unsharded_mlp(worlds, world_size):
    world = worlds(world_size)
    for bias in (False, True):
        for batch in ((2,), ()):
            assert world.run(llama_mlp, bias, batch, "relu") == [[]] * world_size, (bias, batch)
    assert world.run(llama_mlp, True, (2,), "silu") == [[]] * world_size


@pytest.mark.parametrize("world_size", [2, 3])
def test_attention_projections_equal_the_unsharded_ones(worlds, world_size):
    world = worlds(world_size)
    for bias in (False, True):
        assert world.run(attention_projections, bias, (2,)) == [[]] * world_size, bias
    assert world.run(attention_projections, True, (1, 2)) == [[]] * world_size


@pytest.mark.parametrize("world_size", [2, 3])
def test_from_linear_on_one_linear(worlds, world_size):
    assert worlds(world_size).run(single_linears) == [[]] * world_size


def test_a_group_of_some_ranks(worlds):
    results = worlds(3).run(subgroup)
    assert results[:2] == [[], []]
    assert results[2].startswith("ValueError: group: this process (global rank 2) is not a member"), results[2]


@pytest.mark.parametrize("world_size", [2, 3])
def test_sizes_that_do_not_divide_are_named_errors_before_any_collective(worlds, world_size):
    for errors, collectives, after in worlds(world_size).run(size_errors):
        assert errors == size_errors_expected(world_size)
        assert collectives == 0
        assert after == []


def test_without_a_process_group_the_layers_say_so():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ColumnParallelLinear.from_linear(nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match="init_process_group"):
        RowParallelLinear(4, 4)
