"""What each rank runs in tests/test_tp_overlap.py (module level, so LocalWorld can send it to ranks).

Every case returns plain data (bools, strings, lists) that the test asserts on, or raises.
"""

from __future__ import annotations

import os
import time

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


def exact_cases(cases: list[tuple], backend: str | None = None) -> list[str]:
    """Run every (op, rows, N, K, dtype, config) through kernelhub and the reference; the mismatches.

    config None: the public op (stored config or DEFAULT, poisoned `out=`); else the spec's
    launcher with that config. backend: KERNELHUB_BACKEND for the duration ("triton" runs the
    chunk GEMM in Triton's interpreter).
    """
    from kernelhub.registry import get_family

    previous = os.environ.get("KERNELHUB_BACKEND")
    if backend:
        os.environ["KERNELHUB_BACKEND"] = backend
    failures = []
    try:
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
    finally:
        if backend:
            if previous is None:
                del os.environ["KERNELHUB_BACKEND"]
            else:
                os.environ["KERNELHUB_BACKEND"] = previous
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
