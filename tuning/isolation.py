"""Trials in a worker process, so that a config that crashes or hangs costs one trial, not the run.

`IsolatedRunner` keeps one worker process (`python -m kernelhub.tuning.isolation`, a fresh
interpreter: safe with CUDA, and it never re-runs the caller's script as multiprocessing's spawn
would) and sends it one trial at a time over a socket pair: the family's name, shape, dtype,
config and seed. The worker looks the family up in its own registry (families from
KERNELHUB_FAMILIES too: it inherits the environment and the tuner's `sys.path`), runs `measure`
and sends the `TrialOutcome` back. The worker is reused while healthy. A worker that dies
(segfault, abort, exit) is recorded as a "crash" with its signal or exit code; one that does not
answer within `trial_timeout` seconds is killed (SIGKILL: a hung kernel does not answer SIGTERM)
and recorded as a "timeout". Either way the next trial starts a fresh worker. A worker's start-up
(imports, CUDA context) is not counted against the trial timeout.

On Linux a worker dies with the tuner (PR_SET_PDEATHSIG), so `kill -9` of `kernelhub tune` leaves
no worker behind, not even one stuck in a hung kernel.

Cost: a worker that stays healthy adds one pickled round trip per trial; a crash or timeout adds
a worker start, mostly `import torch`. Measured on the 2-core CPU VM with another job busy on one
core, on the cheapest trial there is (tests/fault_families.py's `test_faults`, FAULT=0: a check of
7 elements and four timed launches), medians of two pytest-benchmark runs:
    in process 0.039 / 0.040 ms per trial; isolated 0.11 / 0.21 ms (0.07 to 0.17 ms of overhead);
    a fresh worker's start plus that trial 1.46 / 1.52 s,
reproduced by `python -m pytest tests/test_isolation.py -k cost --benchmark-enable`. A trial on a
GPU takes milliseconds at least (and seconds when Triton compiles a new config), so the reused
worker's overhead is noise there; a worker start is paid only after a crash or a timeout.
"""

from __future__ import annotations

import faulthandler
import math
import signal
import subprocess
import sys
from multiprocessing.connection import Connection

import torch

from kernelhub.errors import KernelhubError
from kernelhub.registry import FamilySpec, Shape
from kernelhub.space import Config
from kernelhub.subprocesses import exit_description, start_worker, worker_connection
from kernelhub.tuning.trial import TrialOutcome, measure

DEFAULT_TRIAL_TIMEOUT_S = 120.0  # Triton compiles each new config on its first launch: seconds, not minutes
WORKER_START_TIMEOUT_S = 120.0  # imports and the CUDA context; longer means something is wrong with the setup


class IsolatedRunner:
    """Runs each trial in a reusable worker process on `device`, with a per-trial timeout in seconds.

    Implements the runner protocol of `kernelhub.tuning.trial` (`run`, `close`); also a context
    manager. Only families registered by name can run (built-in ones, or from KERNELHUB_FAMILIES),
    and not collective ones (they take a process group of their own).
    """

    def __init__(self, device: torch.device | str, *, trial_timeout: float = DEFAULT_TRIAL_TIMEOUT_S):
        seconds = isinstance(trial_timeout, (int, float)) and not isinstance(trial_timeout, bool)
        if not (seconds and 0 < trial_timeout < math.inf):
            raise KernelhubError(f"trial_timeout: expected a positive number of seconds, got {trial_timeout!r}")
        self.device = torch.device(device)
        self.trial_timeout = float(trial_timeout)
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._busy = False  # a trial was sent and its answer not read yet

    @property
    def worker_pid(self) -> int | None:
        """The pid of the current worker; None before the first trial and after a crash or timeout."""
        return self._process.pid if self._process is not None else None

    def run(self, spec: FamilySpec, shape: Shape, dtype: str, config: Config, seed: int) -> TrialOutcome:
        if spec.world_size is not None:
            raise KernelhubError(f"{spec.name} is a collective family: its trials run on a process group of "
                                 "their own, not in an isolated worker")
        if self._process is not None and self._process.poll() is not None:  # died while idle: not this trial's fault
            self._discard_worker()
        if self._process is None:
            self._start_worker()
        self._conn.send(("trial", spec.name, spec.kernel_version, tuple(shape), dtype, dict(config), seed))
        self._busy = True
        reply = self._receive(self.trial_timeout)
        self._busy = False
        if reply is None:
            self._discard_worker()
            return TrialOutcome("timeout", f"no result within {self.trial_timeout:g} s; worker process killed")
        if reply[0] == "died":
            self._discard_worker()
            return TrialOutcome("crash", f"worker process {reply[1]} while running this config")
        if reply[0] == "setup_error":
            raise KernelhubError(reply[1])
        _, outcome, healthy = reply
        if not healthy:  # e.g. a CUDA error that poisons the context for every later trial
            self._discard_worker()
        return outcome

    def close(self) -> None:
        """Stop the worker (safe to call twice); one still busy with a trial (Ctrl-C) is killed at once."""
        if self._process is None:
            return
        if not self._busy:
            try:
                self._conn.send(("stop",))
                self._process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):  # gone already, or stuck: killed below
                pass
        self._discard_worker()

    def __enter__(self) -> IsolatedRunner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the worker's life -----------------------------------------------------------------------

    def _start_worker(self) -> None:
        # The worker imports what the tuner can: the same sys.path (tests and plug-in families included).
        self._process, self._conn = start_worker("kernelhub.tuning.isolation", str(self.device))
        reply = self._receive(WORKER_START_TIMEOUT_S)
        if reply is None or reply[0] != "ready":
            self._discard_worker()
            why = f"no answer within {WORKER_START_TIMEOUT_S:g} s" if reply is None else reply[1]
            raise KernelhubError(f"the trial worker process could not start: {why}")

    def _receive(self, timeout: float) -> tuple | None:
        """The worker's next message, ("died", how) if it died instead, or None after `timeout` seconds.

        The worker sends ("ready",), ("outcome", TrialOutcome, healthy) or ("setup_error", text).
        """
        if not self._conn.poll(timeout):
            return None
        try:
            return self._conn.recv()
        except (EOFError, OSError):  # its end of the socket closed: the worker is gone
            return ("died", exit_description(self._process.wait()))

    def _discard_worker(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._conn.close()
        self._process = self._conn = None


# -- inside the worker -------------------------------------------------------------------------------

def _worker_main(conn: Connection, device_name: str) -> None:
    """Answer trial requests on `conn` until told to stop or the tuner goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the tuner, which then stops this worker
    faulthandler.enable()  # a segfault prints where it happened on the tuner's terminal
    device = torch.device(device_name)
    try:
        from kernelhub.kernels.loader import families

        families()  # imports every family, KERNELHUB_FAMILIES included, before the first trial's clock starts
        if device.type == "cuda":
            torch.empty(1, device=device)  # create the CUDA context now, for the same reason
    except Exception as exc:
        conn.send(("setup_error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the tuner is gone
            return
        if request[0] == "stop":
            return
        conn.send(_run_request(request[1:], device))


def _run_request(request: tuple, device: torch.device) -> tuple:
    from kernelhub.kernels.loader import get_family

    family, kernel_version, shape, dtype, config, seed = request
    try:
        spec = get_family(family)
    except KernelhubError as exc:
        return ("setup_error", f"trial worker: {exc} (register it in a module named by KERNELHUB_FAMILIES)")
    if spec.kernel_version != kernel_version:
        return ("setup_error", f"trial worker: {family} is version {spec.kernel_version} here but "
                               f"{kernel_version} in the tuner: tune the registered family, not a modified copy")
    try:
        outcome = measure(spec, shape, dtype, config, device=device, seed=seed)
    except Exception as exc:  # making inputs or the reference failed: say so, and keep serving
        outcome = TrialOutcome("error", f"{type(exc).__name__}: {exc}")
    return ("outcome", outcome, _device_usable(device))


def _device_usable(device: torch.device) -> bool:
    """False when the device cannot run anything more (a CUDA error poisons the whole context)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    _worker_main(worker_connection(sys.argv), sys.argv[3])
