"""Worker processes that die with their parent: what the tuner's trial workers and the compile
workers share.

A worker is a fresh interpreter (`python -m <module> FD PARENT_PID ...`), never a fork: safe with
CUDA, and it never re-runs the caller's script as multiprocessing's spawn would. It talks to its
parent over a socket pair (`multiprocessing.connection`), imports what the parent can (the same
`sys.path`), and on Linux is killed by the kernel when the parent dies (PR_SET_PDEATHSIG), so
`kill -9` of the parent leaves no worker behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from multiprocessing.connection import Connection, Pipe


def start_worker(module: str, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Connection]:
    """Start `python -m module FD PARENT_PID *args`; returns the process and our end of its socket."""
    ours, theirs = Pipe()  # a socket pair: both ends can send
    environment = dict(os.environ if env is None else env, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    command = [sys.executable, "-m", module, str(theirs.fileno()), str(os.getpid()), *args]
    process = subprocess.Popen(command, env=environment, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
    theirs.close()  # only the worker holds that end now, so its death reads as end-of-file here
    return process, ours


def exit_description(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def die_with(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux); elsewhere the socket's EOF ends it."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(0)


def worker_connection(argv: list[str]) -> Connection:
    """In a worker: its socket (argv[1]), after arranging to die with its parent (argv[2])."""
    die_with(int(argv[2]))
    return Connection(int(argv[1]))
