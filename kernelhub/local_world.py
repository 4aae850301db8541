"""W local processes joined in one torch.distributed group, serving jobs: how collective families
are checked, tuned and tested without a launcher such as torchrun.

    with LocalWorld(2) as world:                     # two ranks, gloo, one CPU thread each
        results = world.run(some_module.fn, 1, 2)    # fn(1, 2) on every rank; a list by rank

Each rank is a spawned process that initialises the default process group (rendezvous through a
file in a private temporary directory; `nccl` ranks take GPU `rank`), then runs the functions it
is sent, one at a time, and replies with the result or the error. Functions and results travel by
pickle, so functions must be importable (module level), and a script that starts a world needs
the usual `if __name__ == "__main__":` guard (spawned ranks import the main module). A job that
raises on any rank, a rank that dies, or a job that runs past `job_timeout_s` raises
`LocalWorldError`, naming each failed rank; after that the world is shut down (its process group
may hold half-finished transfers), and `alive` is False: make a new one.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

from kernelhub.errors import KernelhubError


STOP_GRACE_S = 3.0  # ranks hold nothing worth waiting longer for when told to stop


class LocalWorldError(KernelhubError):
    """A job failed on at least one rank: `failures` maps each failed rank to what happened,
    `results` each rank that answered to its result."""

    def __init__(self, failures: dict[int, str], results: dict[int, object] | None = None):
        self.failures = dict(sorted(failures.items()))
        self.results = dict(sorted((results or {}).items()))
        super().__init__("; ".join(f"rank {rank}: {what}" for rank, what in self.failures.items()))


def _serve(rank: int, world_size: int, init_file: str, backend: str, group_timeout_s: float,
           threads: int | None, conn) -> None:
    """A rank's main loop: join the group, then run jobs until told to stop (None)."""
    import torch
    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=group_timeout_s))
    conn.send(("ready", None))
    while True:
        job = conn.recv()
        if job is None:
            break
        fn, args = job
        try:
            conn.send(("ok", fn(*args)))
        except BaseException as exc:  # report everything, SystemExit included; the parent decides
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-4)}"))
    # No destroy_process_group(): it can wait on peers that already left; exiting frees everything.


class LocalWorld:
    """`world_size` local ranks in one process group (see the module docstring).

    backend: "gloo" (CPU) or "nccl" (one GPU per rank). threads: torch threads per rank (default 1,
    so W ranks do not oversubscribe the cores). group_timeout_s: the process group's timeout, after
    which a collective waiting for a failed peer raises. job_timeout_s: how long `run` waits.
    """

    def __init__(self, world_size: int, *, backend: str = "gloo", threads: int | None = 1,
                 group_timeout_s: float = 60.0, job_timeout_s: float = 300.0, start_timeout_s: float = 120.0):
        if world_size < 1:
            raise ValueError(f"world_size: expected at least 1, got {world_size}")
        self.world_size, self.backend, self.job_timeout_s = world_size, backend, job_timeout_s
        self._tmp = tempfile.mkdtemp(prefix="kernelhub-world-")
        context = multiprocessing.get_context("spawn")
        self._conns, self._procs = [], []
        for rank in range(world_size):
            parent, child = context.Pipe()
            proc = context.Process(target=_serve, daemon=True, name=f"kernelhub-rank{rank}",
                                   args=(rank, world_size, os.path.join(self._tmp, "rendezvous"), backend,
                                         group_timeout_s, threads, child))
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self.alive = True
        self._collect("starting the process group", start_timeout_s)

    def run(self, fn: Callable, *args) -> list:
        """`fn(*args)` on every rank at once; the results by rank, or LocalWorldError."""
        if not self.alive:
            raise KernelhubError("this LocalWorld was shut down after a failure; start a new one")
        for conn in self._conns:
            conn.send((fn, args))
        return self._collect(getattr(fn, "__qualname__", repr(fn)), self.job_timeout_s)

    def _collect(self, what: str, timeout_s: float) -> list:
        results: dict[int, object] = {}
        failures: dict[int, str] = {}
        waiting = dict(enumerate(self._conns))
        deadline = time.monotonic() + timeout_s
        while waiting:
            ready = multiprocessing.connection.wait(list(waiting.values()), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                for rank in waiting:
                    exitcode = self._procs[rank].exitcode
                    failures[rank] = (f"{what}: no answer within {timeout_s:g} s" if exitcode is None
                                      else f"{what}: rank process exited with code {exitcode}")
                break
            for rank, conn in list(waiting.items()):
                if conn not in ready:
                    continue
                del waiting[rank]
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    self._procs[rank].join(timeout=5)
                    failures[rank] = f"{what}: rank process died (exit code {self._procs[rank].exitcode})"
                    continue
                if status == "error":
                    failures[rank] = value
                else:
                    results[rank] = value
        if failures:
            self.close(force=True)
            raise LocalWorldError(failures, results)
        return [results[rank] for rank in range(self.world_size)]

    def close(self, *, force: bool = False) -> None:
        """Stop every rank (kill them if `force`, or if they do not stop within `STOP_GRACE_S`)."""
        if not self._procs:
            return
        self.alive = False
        if not force:
            for conn in self._conns:
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
            deadline = time.monotonic() + STOP_GRACE_S
            for proc in self._procs:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "LocalWorld":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
