"""A compile worker (`kernelhub.subprocesses`): answers requests from `kernelhub.compiler.pool` on
its socket, one at a time, until the pool closes it.

Requests:
    {"op": "capture", "kernel": NAME, "shape": [...], "dtype": D, "config": {...} | null, "target": T}
        -> {"launches": [Launch.to_dict(), ...]}: what that launch would compile (`capture`)
    {"op": "build", "launch": {...}, "target": T, "use_cache": bool}
        -> {"build": Build.to_dict()}
Any failure of a request -> {"error": "Type: message"}; the worker goes on.

It must run Triton's real JIT, so the pool starts it with TRITON_INTERPRET=0; it checks.
"""

from __future__ import annotations

import os
import signal
import sys

from kernelhub.subprocesses import worker_connection


def _launch_of(request: dict):
    """The zero-argument call that runs `request`'s kernel on meta inputs."""
    from kernelhub.kernels import loader

    name, shape, dtype, config = request["kernel"], tuple(request["shape"]), request["dtype"], request["config"]
    fixed = {k.name: k for k in loader.fixed_kernels()}
    if name in fixed:
        kernel = fixed[name]
        inputs = kernel.make_inputs(shape, dtype, "meta", 0)
        return lambda: kernel.launch(inputs)
    spec = loader.get_family(name)
    inputs = spec.make_inputs(shape, dtype, "meta", 0)
    out = spec.new_output(inputs)
    return lambda: spec.launch(inputs, config, out)


def handle(request: dict) -> dict:
    from kernelhub.compiler.build import build
    from kernelhub.compiler.capture import Launch, capture
    from kernelhub.compiler.targets import target

    t = target(request["target"])
    if request["op"] == "capture":
        return {"launches": [launch.to_dict() for launch in capture(t, _launch_of(request))]}
    if request["op"] == "build":
        return {"build": build(Launch.from_dict(request["launch"]), t, use_cache=request["use_cache"]).to_dict()}
    raise ValueError(f"unknown request {request['op']!r}")


def main() -> None:
    conn = worker_connection(sys.argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the pool's owner, which then stops this worker
    if os.environ.get("TRITON_INTERPRET") != "0":
        conn.send({"error": "kernelhub.compiler.worker needs TRITON_INTERPRET=0 (it compiles for real GPUs)"})
        return
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the pool is gone
            return
        try:
            reply = handle(request)
        except Exception as exc:  # one bad request is its own answer, not the worker's end
            reply = {"error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1]}"[:500]}
        conn.send(reply)


if __name__ == "__main__":
    main()
