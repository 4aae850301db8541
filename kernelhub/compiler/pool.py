"""Compile workers in parallel: compiling is CPU-bound, one process per core.

Each worker is `python -m kernelhub.compiler.worker` started with TRITON_INTERPRET=0 (Triton's
real JIT; the caller may well be running the interpreter), reused while healthy. A worker that
dies (the compiler crashed) or does not answer within `timeout` seconds gives that request an
error reply and is replaced; the other requests go on.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from kernelhub.subprocesses import exit_description, start_worker

WORKER_MODULE = "kernelhub.compiler.worker"
DEFAULT_TIMEOUT_S = 600.0  # one compile takes seconds; ten minutes means the compiler is stuck


class _Worker:
    def __init__(self):
        self.process, self.conn = start_worker(WORKER_MODULE, env=dict(os.environ, TRITON_INTERPRET="0"))

    def ask(self, request: dict, timeout: float) -> dict:
        """The reply to `request`; an error reply if the worker died or timed out (then it is dead)."""
        try:
            self.conn.send(request)
            if not self.conn.poll(timeout):
                self.stop()
                return {"error": f"the compiler gave no answer within {timeout:g} s; its process was killed"}
            return self.conn.recv()
        except (EOFError, OSError):
            return {"error": f"the compiler process {exit_description(self.process.wait())}"}

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.conn.close()


class CompilerPool:
    """`workers` compile processes (default: one per CPU core); a context manager."""

    def __init__(self, workers: int | None = None, *, timeout: float = DEFAULT_TIMEOUT_S):
        self.size = max(1, workers or os.cpu_count() or 1)
        self.timeout = timeout
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        for _ in range(self.size):
            self._idle.put(None)  # a slot; its worker starts on first use
        self._workers: list[_Worker] = []
        # Workers start inside these threads, which live as long as the pool: a worker's
        # PR_SET_PDEATHSIG fires when the *thread* that started it ends, not only its process.
        self._threads = ThreadPoolExecutor(self.size)

    def _ask(self, request: dict) -> dict:
        worker = self._idle.get()
        try:
            if worker is None or not worker.alive:
                worker = _Worker()
                self._workers.append(worker)
            reply = worker.ask(request, self.timeout)
            if not worker.alive:
                worker = None
            return reply
        finally:
            self._idle.put(worker)

    def run(self, requests: Sequence[dict], progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """The replies to `requests`, in their order (see `kernelhub.compiler.worker` for both)."""
        replies: list[dict] = [{}] * len(requests)
        futures = {self._threads.submit(self._ask, request): i for i, request in enumerate(requests)}
        for done, future in enumerate(as_completed(futures), start=1):
            replies[futures[future]] = future.result()
            if progress is not None:
                progress(done, len(requests))
        return replies

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers.clear()
        self._threads.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CompilerPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

