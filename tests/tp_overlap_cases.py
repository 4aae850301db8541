"""What each rank runs in tests/test_tp_overlap.py (module level, so LocalWorld can send it to ranks).

Every case returns plain data (bools, strings, lists) that the test asserts on, or raises.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings

import torch
import torch.distributed as dist

import kernelhub.ops as ops
from kernelhub.checking import poison_
from kernelhub.kernels.tp_overlap import overlap
from kernelhub.reference import tp_overlap as ref


def _small_ints(rows: int, cols: int, dtype: str, seed: int) -> torch.Tensor:
    """Integers in [-2, 2], different on every rank: sums stay exact in bfloat16 for K * W <= 64."""
    gen = torch.Generator().manual_seed(seed * 1000 + dist.get_rank())
    return torch.randint(-2, 3, (rows, cols), generator=gen).to(getattr(torch, dtype))


@contextlib.contextmanager
def backend_env(backend: str | None):
    """KERNELHUB_BACKEND=backend for the block (unchanged if None), restored after."""
    previous = os.environ.get("KERNELHUB_BACKEND")
    if backend:
        os.environ["KERNELHUB_BACKEND"] = backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("KERNELHUB_BACKEND", None)
        else:
            os.environ["KERNELHUB_BACKEND"] = previous


def exact_cases(cases: list[tuple], backend: str | None = None) -> list[str]:
    """Run every (op, rows, N, K, dtype, config) through kernelhub and the reference; the mismatches.

    config None: the public op (stored config or DEFAULT, poisoned `out=`); else the spec's
    launcher with that config. backend: KERNELHUB_BACKEND for the duration ("triton" runs the
    chunk GEMM in Triton's interpreter).
    """
    from kernelhub.kernels.loader import get_family

    failures = []
    with backend_env(backend):
        for seed, (op, rows, n, k, dtype, config) in enumerate(cases):
            a, b = _small_ints(rows, k, dtype, seed), _small_ints(k, n, dtype, seed + 500)
            world = dist.get_world_size()
            if op == "all_gather_gemm":
                expected, expected_gathered = ref.all_gather_gemm(a, b, return_gathered=True)
                out = poison_(torch.empty(world * rows, n, dtype=a.dtype))
                if config is None:
                    got, gathered = ops.all_gather_gemm(a, b, return_gathered=True, out=out)
                    ok = got.data_ptr() == out.data_ptr() and torch.equal(got, expected) and torch.equal(
                        gathered, expected_gathered)
                else:
                    got = get_family(op).launch({"a": a, "b": b}, config, out)
                    ok = torch.equal(got, expected)
            else:
                expected = ref.gemm_reduce_scatter(a, b)
                out = poison_(torch.empty(rows // world, n, dtype=a.dtype))
                if config is None:
                    got = ops.gemm_reduce_scatter(a, b, out=out)
                    ok = got.data_ptr() == out.data_ptr() and torch.equal(got, expected)
                else:
                    got = get_family(op).launch({"a": a, "b": b}, config, out)
                    ok = torch.equal(got, expected)
            if not ok:
                diff = (got.float() - expected.float()).abs()
                failures.append(f"{op} rows={rows} N={n} K={k} {dtype} {config}: max |diff| {diff.nan_to_num(1e9).max()}")
    return failures


def error_of(fn, *args, **kwargs) -> str:
    """'<ExceptionType>: <message>' of what `fn` raises ('no error' if it returns)."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def shapes_differ_by_rank() -> str:
    rank = dist.get_rank()
    a = torch.ones(3 + rank, 8)  # rank 1 passes 4 rows, rank 0 three
    return error_of(ops.all_gather_gemm, a, torch.ones(8, 5))


def bad_dtype_on_last_rank() -> str:
    last = dist.get_rank() == dist.get_world_size() - 1
    a = torch.ones(2 * dist.get_world_size(), 8, dtype=torch.int32 if last else torch.float32)
    return error_of(ops.gemm_reduce_scatter, a, torch.ones(8, 5))


def rows_not_divisible() -> str:
    return error_of(ops.gemm_reduce_scatter, torch.ones(dist.get_world_size() + 1, 8), torch.ones(8, 5))


def both_ops_after_errors() -> bool:
    """After the errors above, the group still works: a correct call matches the reference."""
    return not exact_cases([("all_gather_gemm", 3, 5, 8, "float32", None), ("gemm_reduce_scatter", 6, 5, 8, "float32", None)])


def different_config_databases(url_by_rank: list[str]) -> bool:
    """Ranks whose config databases disagree (CHUNKS) still agree on one config and compute right."""
    from kernelhub import configs

    os.environ["KERNELHUB_DB"] = url_by_rank[dist.get_rank()]
    configs.clear_cache()
    try:
        return not exact_cases([("all_gather_gemm", 9, 7, 12, "float32", None),
                                ("gemm_reduce_scatter", 18, 7, 12, "float32", None)])
    finally:
        configs.clear_cache()


def with_straggler(cases: list[tuple], delay_s: float) -> list[str]:
    """Rank 1 posts each transfer `delay_s` late and waits `delay_s` before each receive; the mismatches."""
    original_exchange, original_wait = overlap._exchange, overlap._Transfer.wait

    def late_exchange(*args, **kwargs):
        time.sleep(delay_s)
        return original_exchange(*args, **kwargs)

    def late_wait(self):
        time.sleep(delay_s)
        return original_wait(self)

    if dist.get_rank() == 1:
        overlap._exchange, overlap._Transfer.wait = late_exchange, late_wait
    try:
        return exact_cases(cases)
    finally:
        overlap._exchange, overlap._Transfer.wait = original_exchange, original_wait


def one_rank_fails_mid_op(how: str) -> str:
    """Rank 1 fails as its first transfer is posted ('raise' and go on living, or 'exit' the
    process); the other ranks' error, with how long they took to get it."""
    original = overlap._exchange

    def failing_exchange(*args, **kwargs):
        if how == "exit":
            os._exit(3)
        raise RuntimeError("injected failure on rank 1")

    if dist.get_rank() == 1:
        overlap._exchange = failing_exchange
    started = time.monotonic()
    try:
        a = torch.ones(4, 8)
        return error_of(ops.all_gather_gemm, a, torch.ones(8, 5)) + f" after {time.monotonic() - started:.1f} s"
    finally:
        overlap._exchange = original


def world_size_one() -> bool:
    """With one rank both ops are a plain GEMM of the local operands."""
    a, b = _small_ints(7, 9, "float32", 1), _small_ints(9, 5, "float32", 2)
    out, gathered = ops.all_gather_gemm(a, b, return_gathered=True)
    return torch.equal(out, a @ b) and torch.equal(gathered, a) and torch.equal(ops.gemm_reduce_scatter(a, b), a @ b)


def layout_mismatches(backend: str, kinds: tuple[str, ...]) -> list[str]:
    """Both ops with a and b (one at a time) in every layout of `strided_views.layouts`, and `out`
    in every writable one (poisoned), against the result on contiguous operands; the mismatches.
    Values are small integers built to admit the broadcast and overlapping views, so every
    result is exact. They are the same on every rank, so that every rank makes the same views
    and the ranks call the ops in step."""
    from strided_views import layouts, structured

    failures = []
    with backend_env(backend):
        world = dist.get_world_size()
        for seed, kind in enumerate(kinds):
            gen = torch.Generator().manual_seed(seed)
            draw = lambda *size: torch.randint(-2, 3, size, generator=gen).to(torch.float32)  # noqa: E731
            for op, rows, out_rows in ((ops.all_gather_gemm, 3, 3 * world),
                                       (ops.gemm_reduce_scatter, 2 * world, 2)):
                inputs = {"a": structured(draw, (rows, 5), kind), "b": structured(draw, (5, 4), kind)}
                expected = op(**inputs)
                runs = [(f"{name} {layout}", inputs | {name: view}, poison_(torch.empty(out_rows, 4)))
                        for name, value in inputs.items() for layout, view in layouts(value)]
                runs += [(f"out {layout}", inputs, out)
                         for layout, out in layouts(poison_(torch.empty(out_rows, 4)), writable=True)]
                for what, kwargs, out in runs:
                    got = op(**kwargs, out=out)
                    if got is not out or not torch.equal(out, expected):
                        failures.append(f"{op.__name__} {kind}: {what}")
    return failures


def out_overlaps_a() -> str:
    a = torch.zeros(2 * dist.get_world_size(), 4)
    return error_of(ops.all_gather_gemm, a[:2], torch.ones(4, 4), out=a)


def requires_grad_then_no_grad() -> bool:
    """A weight that requires grad (an nn.Parameter): a named TypeError with grad mode on, on every
    rank and for both ops, and the plain result under torch.no_grad()."""
    a, b = _small_ints(4, 6, "float32", 3), torch.nn.Parameter(_small_ints(6, 5, "float32", 4))
    refused = [error_of(ops.all_gather_gemm, a, b), error_of(ops.gemm_reduce_scatter, a, b)]
    with torch.no_grad():
        same = (torch.equal(ops.all_gather_gemm(a, b), ref.all_gather_gemm(a, b))
                and torch.equal(ops.gemm_reduce_scatter(a, b), ref.gemm_reduce_scatter(a, b)))
    return same and all(e.startswith("TypeError: b: requires grad, but kernelhub ops have no backward")
                        for e in refused)


def future_warnings() -> list[str]:
    """The FutureWarnings both ops and both references raise (torch 2.13 deprecates the collective
    names torch 2.11 has); none is expected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for backend in ("auto", "reference"):
            exact_cases([("all_gather_gemm", 3, 5, 8, "float32", None),
                         ("gemm_reduce_scatter", 6, 5, 8, "float32", None)], backend)
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


# -- all_gather_gemm with a list of B (one gather shared by several GEMMs: fused QKV, gate + up) ---

def list_cases(cases: list[tuple], backend: str | None = None) -> list[str]:
    """Run every (rows, widths, K, dtype, config) through all_gather_gemm with b a list of [K, N_i]
    (one per width) and through the reference; the mismatches.

    config None: the public op four ways (a list b, a tuple b with return_gathered, a poisoned
    `out=` list, and each b alone, which must give the same as its element of the list); else
    the schedule `overlap.all_gather_gemm` with that config and the chunk GEMM a call would run.
    """
    from kernelhub import backend as backends
    from kernelhub.kernels.tp_overlap.spec import GEMM_SPEC

    failures = []
    with backend_env(backend):
        for seed, (rows, widths, k, dtype, config) in enumerate(cases):
            a = _small_ints(rows, k, dtype, seed)
            bs = [_small_ints(k, n, dtype, seed + 500 + i) for i, n in enumerate(widths)]
            expected, expected_gathered = ref.all_gather_gemm(a, bs, return_gathered=True)
            world = dist.get_world_size()
            fresh = lambda: [poison_(torch.empty(world * rows, n, dtype=a.dtype)) for n in widths]  # noqa: E731
            runs = []
            if config is None:
                runs.append(("list", ops.all_gather_gemm(a, bs)))
                got, gathered = ops.all_gather_gemm(a, tuple(bs), return_gathered=True)
                runs.append(("tuple, return_gathered", got))
                if not torch.equal(gathered, expected_gathered):
                    failures.append(f"rows={rows} widths={widths} K={k} {dtype}: the gathered a differs")
                outs = fresh()
                got = ops.all_gather_gemm(a, bs, out=outs)
                if not all(g.data_ptr() == o.data_ptr() for g, o in zip(got, outs)):
                    failures.append(f"rows={rows} widths={widths} K={k} {dtype}: out= not returned")
                runs.append(("out=", got))
                runs.append(("one b at a time", [ops.all_gather_gemm(a, b) for b in bs]))
            else:
                outs, gathered = fresh(), torch.empty(world * rows, k, dtype=a.dtype)
                gemm = overlap.chunk_gemm(GEMM_SPEC, a, backends.choose(a))
                overlap.all_gather_gemm(a, bs, outs, gathered, group=None, chunks=config["CHUNKS"],
                                        order=config["ORDER"], gemm=gemm)
                runs.append((f"schedule {config}", outs))
            for how, got in runs:
                if not isinstance(got, list) or len(got) != len(widths):
                    failures.append(f"rows={rows} widths={widths} K={k} {dtype} {how}: returned {type(got).__name__}")
                    continue
                for i, (g, e) in enumerate(zip(got, expected)):
                    if not torch.equal(g, e):
                        diff = (g.float() - e.float()).abs().nan_to_num(1e9).max()
                        failures.append(f"rows={rows} widths={widths} K={k} {dtype} {how}: b[{i}] max |diff| {diff}")
    return failures


def list_argument_errors() -> list[str]:
    """What all_gather_gemm says (on every rank, all passing the same) for bad lists of b and out."""
    world = dist.get_world_size()
    a, b = torch.ones(3, 8), torch.ones(8, 5)
    shared = torch.empty(3 * world, 5)
    calls = [
        ([b, torch.ones(8, 4, dtype=torch.bfloat16)], None),
        ([b, torch.ones(7, 4)], None),
        ([], None),
        ([b, "not a tensor"], None),
        ([b, b], torch.empty(3 * world, 5)),
        ([b, b], [torch.empty(3 * world, 5)]),
        ([b, torch.ones(8, 4)], [torch.empty(3 * world, 5), torch.empty(3 * world, 5)]),
        ([b, b], [shared, shared]),
    ]
    return [error_of(ops.all_gather_gemm, a, bs, out=out) for bs, out in calls]


def list_differs_by_rank() -> str:
    """Rank 0 passes two matrices of widths 5 + 4, the others one of width 9: same total, other count."""
    a = torch.ones(3, 8)
    bs = [torch.ones(8, 5), torch.ones(8, 4)] if dist.get_rank() == 0 else [torch.ones(8, 9)]
    return error_of(ops.all_gather_gemm, a, bs)


def list_world_size_one() -> bool:
    """With one rank, the list form is a plain GEMM per b."""
    a = _small_ints(7, 9, "float32", 1)
    bs = [_small_ints(9, n, "float32", 2 + n) for n in (5, 1, 3)]
    outs, gathered = ops.all_gather_gemm(a, bs, return_gathered=True)
    return torch.equal(gathered, a) and all(torch.equal(out, a @ b) for out, b in zip(outs, bs))
