"""Tensor-parallel overlap public ops: validate -> agree across ranks -> backend -> config -> overlapped schedule.

Every call starts with one small all_gather of each rank's call signature (shapes, dtype, whether
its arguments were valid, and its config), so that
- a rank whose arguments are invalid raises its error and every other rank raises a
  CollectiveError naming it, instead of waiting forever for its data;
- shapes that differ across ranks are an error on every rank, not a hang or garbage;
- every rank runs rank 0's config, even if the ranks' config databases differ.
That costs one tiny collective per call (see benchmarks/cpu_tp_overlap.py for its time).

`all_gather_gemm` also takes a list of B matrices that share one gather (a fused QKV or gate + up
projection): the signature then carries their count and total width N, which is also the width
its config is looked up for (one gather feeds GEMMs of N columns in all, as for one wide B).

Re-exported by `kernelhub.ops`. Not registered with torch.library: the ops take a process group,
which a custom op's schema cannot hold (and a list of B would be a `Tensor[]` argument).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from kernelhub import backend, configs, validation
from kernelhub.device import device_for_tensor
from kernelhub.errors import CollectiveError
from kernelhub.kernels.tp_overlap import overlap
from kernelhub.kernels.tp_overlap.spec import AG_SPEC, GEMM_SPEC, RS_SPEC
from kernelhub.reference import tp_overlap as ref

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = [validation.dtype_name(d) for d in _DTYPES]
_BACKEND_DEVICE = {"gloo": "cpu", "nccl": "cuda"}
# Configs travel between ranks as their index in the space's fixed enumeration.
_CONFIGS = {spec.name: list(spec.space.configs()) for spec in (AG_SPEC, RS_SPEC)}


def _group_size(group, op: str) -> tuple[int, int]:
    """(rank, world size) of `group`; a clear error when there is no process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group first (any backend: gloo on CPU, nccl on GPU)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
    return rank, dist.get_world_size(group)


def _b_list(b) -> tuple[list, list[str]]:
    """`b` of all_gather_gemm as (matrices, their names): a list or tuple names its elements
    `b[0]`, `b[1]`, ...; anything else is the one matrix `b`."""
    if isinstance(b, (list, tuple)):
        return list(b), [f"b[{i}]" for i in range(len(b))]
    return [b], ["b"]


def _check_operands(a, bs: list, names: list[str], group, rows_divisor: int, what_rows: str) -> None:
    validation.tensor("a", a, dtypes=_DTYPES, ndim=2)
    if not bs:
        raise ValueError("b: expected a [K, N] tensor or a non-empty list of them, got an empty list")
    for name, b in zip(names, bs):
        validation.tensor(name, b, dtypes=(a.dtype,), ndim=2)
        validation.same_device(a=a, **{name: b})
        if b.shape[0] != a.shape[1]:
            raise ValueError(f"{name}: expected shape [K, N] with K = a.shape[1] = {a.shape[1]}, got {tuple(b.shape)}")
        if min(a.shape[0], a.shape[1], b.shape[1]) < 1:
            raise ValueError(f"a, {name}: every dimension must be at least 1, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
    if a.shape[0] % rows_divisor:
        raise ValueError(f"a: {what_rows} = {a.shape[0]} is not divisible by the world size {rows_divisor}")
    expected = _BACKEND_DEVICE.get(dist.get_backend(group))
    if expected is not None and a.device.type != expected:
        raise ValueError(f"a: the {dist.get_backend(group)} process group needs {expected} tensors, got {a.device}")


def _out_element(name: str, value, **checks) -> torch.Tensor:
    """`validation.out_tensor` for one element of an `out=` list, its errors naming the element
    (`out[1]: ...`) where out_tensor names `out`."""
    try:
        return validation.out_tensor(value, **checks)
    except (TypeError, ValueError) as exc:
        raise type(exc)(name + str(exc).removeprefix("out")) from None


def _check_out(out, listed: bool, a, bs: list, names: list[str], rows: int) -> None:
    """`out=`: None, or one [rows, N] tensor for one b, or (b a list) a list or tuple of one
    [rows, N_i] tensor per b[i], sharing memory with no input and no other output."""
    if out is None:
        return
    inputs = {"a": a, **dict(zip(names, bs))}
    if not listed:
        validation.out_tensor(out, shape=(rows, bs[0].shape[1]), dtype=a.dtype, device=a.device, inputs=inputs)
        return
    if not isinstance(out, (list, tuple)):
        raise TypeError(f"out: b is a list, so out must be a list of {len(bs)} tensors, got {type(out).__name__}")
    if len(out) != len(bs):
        raise ValueError(f"out: expected {len(bs)} tensors, one per b[i], got {len(out)}")
    for i, (b, out_i) in enumerate(zip(bs, out)):
        earlier = {f"out[{j}]": out[j] for j in range(i)}
        _out_element(f"out[{i}]", out_i, shape=(rows, b.shape[1]), dtype=a.dtype, device=a.device,
                     inputs=inputs | earlier, advice=dict.fromkeys(earlier, "each output needs its own memory"))


def _agree(op: str, group, signature: list[int], problem: Exception | None, device: torch.device) -> list[list[int]]:
    """All ranks' signatures [ok, rows, K, N, dtype, B count, config index]; raises if any rank's call is bad."""
    mine = torch.tensor([0 if problem else 1, *signature], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        mine = mine.to(device)
    world = dist.get_world_size(group)
    everyone = torch.empty(world * mine.numel(), dtype=torch.int64, device=mine.device)
    try:
        ref.all_gather_single(everyone, mine, group=group)
    except Exception as exc:
        raise CollectiveError(f"{op}: exchanging call signatures with the other ranks failed: {exc}") from exc
    if problem is not None:
        raise problem
    rows = everyone.view(world, -1).tolist()
    bad = [rank for rank, row in enumerate(rows) if row[0] == 0]
    if bad:
        raise CollectiveError(f"{op}: rank(s) {bad} rejected their arguments (see the error on those ranks)")
    shapes = {tuple(row[1:6]) for row in rows}
    if len(shapes) > 1:
        listing = "; ".join(f"rank {r}: a {row[1:3]}, {_b_shapes(*row[2:4], row[5])}, {_DTYPE_NAMES[row[4]]}"
                            for r, row in enumerate(rows))
        raise ValueError(f"{op}: every rank must pass the same shapes and dtype, got {listing}")
    return rows


def _b_shapes(k: int, n: int, count: int) -> str:
    """How a signature's B reads in a message: `b [K, N]`, or the count and total width of a list."""
    return f"b [{k}, {n}]" if count == 1 else f"b {count} matrices [{k}, N_i] with N_i summing to {n}"


def _signature(a, bs: list) -> list[int]:
    """[rows of a, K, total N of the bs, dtype index, number of bs] of a call (-1 for what a bad
    argument does not define)."""
    if not (isinstance(a, torch.Tensor) and a.dim() == 2 and bs
            and all(isinstance(b, torch.Tensor) and b.dim() == 2 for b in bs)):
        return [-1, -1, -1, -1, -1]
    return [a.shape[0], a.shape[1], sum(b.shape[1] for b in bs), _DTYPES.index(a.dtype) if a.dtype in _DTYPES else -1,
            len(bs)]


def _prepare(op: str, spec, a, bs: list, names: list[str], group, rows_divisor_of, out_rows_of, out,
             listed: bool = False):
    """Validate locally, agree with every rank, and choose the config: -> (world size, config, path)."""
    _, world = _group_size(group, op)
    problem, config = None, None
    try:
        _check_operands(a, bs, names, group, rows_divisor_of(world), "M" if spec is RS_SPEC else "M_local")
        _check_out(out, listed, a, bs, names, out_rows_of(world))
        path = backend.choose(a)
        shape = (world, a.shape[0], sum(b.shape[1] for b in bs), a.shape[1])
        config = configs.best_config(spec, shape, validation.dtype_name(a.dtype), device_for_tensor(a))
    except (TypeError, ValueError, RuntimeError) as exc:
        problem = exc
    signature = _signature(a, bs) + [_CONFIGS[spec.name].index(config) if config else -1]
    device = a.device if isinstance(a, torch.Tensor) else torch.device("cpu")
    rows = _agree(op, group, signature, problem, device)
    return world, dict(_CONFIGS[spec.name][rows[0][-1]]), path


def all_gather_gemm(a: torch.Tensor, b: torch.Tensor | Sequence[torch.Tensor], *, group=None,
                    return_gathered: bool = False, out: torch.Tensor | Sequence[torch.Tensor] | None = None):
    """`all_gather(a) @ b` with the gather overlapped with the GEMM: a column-parallel layer.

    a: [M_local, K], this rank's rows; b: [K, N]; float32, float16 or bfloat16, one dtype, on the
    group's device (CPU for gloo, CUDA for nccl). Every rank of `group` (default: the world group)
    calls it with the same shapes. Returns out [W * M_local, N] in a's dtype (rank r's rows at
    r * M_local), and the gathered a [W * M_local, K] too when `return_gathered` (a column-parallel
    layer's backward needs it). out: optional [W * M_local, N] to write into. Equivalent to::

        gathered = torch.empty(W * M_local, K, dtype=a.dtype, device=a.device)
        torch.distributed.all_gather_single(gathered, a, group=group)  # all_gather_into_tensor before torch 2.13
        out = gathered @ b

    b may be a list (or tuple) of [K, N_i] matrices, as a fused QKV or gate + up projection has:
    `a` is gathered once and each chunk multiplied by every b_i as it lands. The result is then a
    list of [W * M_local, N_i] (`[gathered @ b_i for b_i in b]`), and out, if given, a list or
    tuple of one [W * M_local, N_i] per b_i; errors name the element (`b[1]`, `out[1]`).
    """
    listed = isinstance(b, (list, tuple))
    bs, names = _b_list(b)
    world, config, path = _prepare("all_gather_gemm", AG_SPEC, a, bs, names, group, lambda w: 1,
                                   lambda w: w * a.shape[0], out, listed)
    outs = [None] * len(bs) if out is None else list(out) if listed else [out]
    if path == "reference":
        results, gathered = ref.all_gather_gemm(a, bs, group=group, return_gathered=True)
        results = [result if out_i is None else out_i.copy_(result) for result, out_i in zip(results, outs)]
    else:
        m, k = a.shape
        results = [torch.empty((world * m, b_i.shape[1]), dtype=a.dtype, device=a.device) if out_i is None else out_i
                   for b_i, out_i in zip(bs, outs)]
        gathered = torch.empty((world * m, k), dtype=a.dtype, device=a.device)
        gemm = overlap.chunk_gemm(GEMM_SPEC, a, path)  # the backend chosen once, in _prepare
        if world == 1:
            for b_i, result in zip(bs, results):
                gemm(a, b_i, result)
            gathered.copy_(a)
        else:
            a = a.contiguous()  # its row chunks are sent as they lie in memory: a view (w.t(), expand) is copied
            overlap.all_gather_gemm(a, bs, results, gathered, group=group, chunks=config["CHUNKS"],
                                    order=config["ORDER"], gemm=gemm)
    result = results if listed else results[0]
    return (result, gathered) if return_gathered else result


def gemm_reduce_scatter(a: torch.Tensor, b: torch.Tensor, *, group=None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's rows of `sum over ranks of a @ b`, the sum overlapped with the GEMM: a row-parallel layer.

    a: [M, K_local] with M divisible by W; b: [K_local, N]; float32, float16 or bfloat16, one dtype,
    on the group's device. Every rank of `group` (default: the world group) calls it with the same
    shapes. Returns out [M / W, N] in a's dtype: rows r * M / W ... (r + 1) * M / W of the sum on
    rank r. Partials are rounded to a's dtype before they are sent, as the reference's are, and
    summed in float32. out: optional [M / W, N] to write into. Equivalent to::

        partial = a @ b
        out = torch.empty(M // W, N, dtype=a.dtype, device=a.device)
        torch.distributed.reduce_scatter_single(out, partial, group=group)  # reduce_scatter_tensor before 2.13
    """
    world, config, path = _prepare("gemm_reduce_scatter", RS_SPEC, a, [b], ["b"], group, lambda w: w,
                                   lambda w: a.shape[0] // w, out)
    if path == "reference":
        result = ref.gemm_reduce_scatter(a, b, group=group)
        return result if out is None else out.copy_(result)
    out = out if out is not None else torch.empty((a.shape[0] // world, b.shape[1]), dtype=a.dtype, device=a.device)
    gemm = overlap.chunk_gemm(GEMM_SPEC, a, path)  # the backend chosen once, in _prepare
    if world == 1:
        gemm(a, b, out)
    else:
        overlap.gemm_reduce_scatter(a, b, out, group=group, chunks=config["CHUNKS"], gemm=gemm)
    return out
