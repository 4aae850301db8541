"""Compile every shipped Triton kernel for real GPU targets, without a GPU (`kernelhub compile`).

For each kernel (every registered family's, and the untuned ones: `loader.fixed_kernels()`),
each shape of a shape set, each dtype and each config (the DEFAULT for that shape, and sampled
configs the search space accepts for the target), in order:

1. capture (`capture.py`): the family's launcher runs on meta tensors under a stand-in driver for
   the target, so Triton binds exactly the signature, specialisation and options a real launch at
   that shape would compile; one launch may compile several kernels (split-K's epilogue, ...);
2. build (`build.py`): `triton.compile` for the target (NVIDIA's ptxas, bundled with Triton, or
   AMD's LLVM backend), then the compiler's own figures: shared memory, registers, spills,
   tensor-core instructions, occupancy; cached on disk, so a second run is fast;
3. judge: a kernel that does not compile, or needs more than the target allows, is not `ok`.

Captures and builds run in worker processes (`pool.py`), in parallel; launches that compile to
the same binary (most shapes of a set specialise alike) are built once.

`problems(records)` says what must fail a CI run: a DEFAULT (or a fixed kernel's config, or a
config given by hand) that is not ok or spills, or a sampled config the search space accepts that
the compiler refuses (the space's constraints and the compiler disagree).

`ConfigCheck` asks the same of one config of one family, in a pool it keeps: what the tuner prunes
with before it launches a config (`verdict`: a kernel that is not ok, or spills).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kernelhub import registry
from kernelhub.compiler.pool import DEFAULT_TIMEOUT_S, CompilerPool
from kernelhub.compiler.targets import DEFAULT_TARGETS, Target, target
from kernelhub.errors import KernelhubError
from kernelhub.kernels import loader
from kernelhub.space import Config

DEFAULT_SAMPLES = 2  # sampled configs per shape, besides the DEFAULT


@dataclass(frozen=True)
class Job:
    """One launch to compile: a kernel at a shape, dtype and config, for one target."""

    kernel: str  # a family's spec name, or a fixed kernel's op name
    target: Target
    shape: tuple[int, ...]
    dtype: str
    config: Config | None  # None: a fixed kernel's own
    role: str  # "default", "sampled", "given" (--config) or "fixed"
    constraint: str | None = None  # why the search space rejects this config here (None: it accepts it)

    def request(self) -> dict:
        return {"op": "capture", "kernel": self.kernel, "shape": list(self.shape), "dtype": self.dtype,
                "config": self.config, "target": self.target.arch}


def _build_request(launch: dict, t: Target, use_cache: bool) -> dict:
    """The compile worker's request to build one captured launch for `t`."""
    return {"op": "build", "launch": launch, "target": t.arch, "use_cache": use_cache}


def compilable() -> dict[str, registry.FamilySpec | registry.FixedKernel]:
    """Every kernel `kernelhub compile` can build, by name: the families whose config is a Triton
    launch's (not the collectives, whose chunk GEMM is `tp_gemm`, nor a family whose config steers
    a CPU path, `tunes_on_cpu`) and the fixed kernels."""
    kernels = {spec.name: spec for spec in loader.families() if spec.world_size is None and not spec.tunes_on_cpu}
    kernels.update({kernel.name: kernel for kernel in loader.fixed_kernels()})
    return kernels


def plan(names: Sequence[str] | None = None, targets: Sequence[str] = DEFAULT_TARGETS, *, shape_set: str = "tune",
         samples: int = DEFAULT_SAMPLES, config: Config | None = None, dtypes: Sequence[str] | None = None,
         seed: int = 0) -> list[Job]:
    """The jobs of one `kernelhub compile` run (its arguments, in the same names)."""
    kernels = compilable()
    unknown = [n for n in names or () if n not in kernels]
    if unknown:
        raise KernelhubError(f"--kernel {unknown[0]}: not a kernel that compiles; known: {', '.join(kernels)}")
    chosen = [kernels[n] for n in names] if names else list(kernels.values())
    if config is not None and (len(chosen) != 1 or isinstance(chosen[0], registry.FixedKernel)):
        raise KernelhubError("--config needs exactly one --kernel, of a tuned family")
    try:
        resolved = [target(t) for t in targets]
    except ValueError as exc:
        raise KernelhubError(f"--target: {exc}") from None
    jobs = []
    for kernel in chosen:
        kernel_dtypes = [d for d in dtypes if d in kernel.dtypes] if dtypes else list(kernel.dtypes)
        for t in resolved:
            for shape in kernel.shapes(shape_set):
                for dtype in kernel_dtypes:
                    jobs.extend(_configs(kernel, t, tuple(shape), dtype, samples, config, seed))
    if dtypes and not any(j.dtype in dtypes for j in jobs):
        raise KernelhubError(f"--dtype: none of {list(dtypes)} is a dtype of the chosen kernels")
    return jobs


def _configs(kernel, t: Target, shape: tuple, dtype: str, samples: int, given: Config | None, seed: int):
    if isinstance(kernel, registry.FixedKernel):
        yield Job(kernel.name, t, shape, dtype, None, "fixed")
        return
    space = kernel.space
    if given is not None:
        config = space.validate(given, source="--config")
        yield Job(kernel.name, t, shape, dtype, config, "given", space.infeasibility(config, shape, t.shared_per_block))
        return
    default = kernel.default_config(shape, dtype)
    yield Job(kernel.name, t, shape, dtype, default, "default", space.infeasibility(default, shape, t.shared_per_block))
    sampled = [c for c in space.sample(samples + 1, shape, t.shared_per_block, seed=seed) if c != default]
    for config in sampled[:samples]:
        yield Job(kernel.name, t, shape, dtype, config, "sampled")


def compile_jobs(jobs: Sequence[Job], *, workers: int | None = None, use_cache: bool = True,
                 progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Capture and build every job (in parallel, each distinct binary once); one record per
    (job, compiled kernel), see `record` for its fields."""
    with CompilerPool(workers) as pool:
        progress(f"capturing {len(jobs)} launches")
        captured = pool.run([job.request() for job in jobs])
        builds: dict[str, int] = {}  # (launch, target) as text -> index among the build requests
        requests = []
        for job, reply in zip(jobs, captured):
            for launch in reply.get("launches", []):
                key = json.dumps([launch, job.target.arch], sort_keys=True)
                if key not in builds:
                    builds[key] = len(requests)
                    requests.append(_build_request(launch, job.target, use_cache))
        progress(f"building {len(requests)} distinct kernels on {pool.size} processes")
        built = pool.run(requests, progress=lambda done, total: progress(f"built {done}/{total}")
                         if done % 10 == 0 or done == total else None)
    kernels = compilable()
    records = []
    for job, reply in zip(jobs, captured):
        kernel = kernels[job.kernel]
        if "error" in reply:
            records.append(record(job, kernel, None, {"ok": False, "error": f"capture: {reply['error']}"}))
            continue
        for launch in reply["launches"]:
            answer = built[builds[json.dumps([launch, job.target.arch], sort_keys=True)]]
            result = answer.get("build") or {"ok": False, "error": f"build: {answer.get('error')}"}
            records.append(record(job, kernel, launch, result))
    return records


_BUILD_FIELDS = ("ok", "error", "shared_bytes", "registers", "spills", "mma", "occupancy", "blocks_per_sm",
                 "occupancy_limiter", "num_warps", "compile_s", "cached")


def record(job: Job, kernel, launch: dict | None, build: dict) -> dict:
    """One JSON record: the job (kernel, target, shape, dtype, config, role, constraint), the
    compiled function, and the build's figures (`build.Build`)."""
    config = job.config if job.config is not None else kernel.config(job.shape)
    function = None if launch is None else launch["function"].rsplit(":", 1)[-1]
    return {"kernel": job.kernel, "function": function, "target": job.target.name, "arch": job.target.arch,
            "shape": kernel.format_shape(job.shape), "dtype": job.dtype, "config": config, "role": job.role,
            "constraint": job.constraint, **{name: build.get(name) for name in _BUILD_FIELDS}}


def problems(records: Iterable[dict]) -> list[tuple[dict, str]]:
    """The records that must fail a CI run, each with why (see the module docstring)."""
    found = []
    for r in records:
        must_be_clean = r["role"] in ("default", "fixed", "given")
        if not r["ok"]:
            if must_be_clean:
                found.append((r, f"{r['role']} config: {r['error']}"))
            elif r["constraint"] is None:
                found.append((r, f"the search space accepts this config, the compiler does not: {r['error']}"))
        elif must_be_clean and r["spills"]:
            found.append((r, f"{r['role']} config spills {r['spills']} bytes per thread to local memory"))
    return found


# -- one config, before the tuner launches it ------------------------------------------------------

class CompileCheckError(KernelhubError):
    """The compiler's verdict on a config could not be had (a compile worker died or gave no answer,
    or the launch could not be captured): a fact about the check, not about the config."""


def verdict(builds: Iterable[dict]) -> str | None:
    """Why a GPU of the target should never run a launch whose kernels built as `builds` (`Build`
    dicts): a kernel that does not compile or exceeds the target's limits, or one that spills
    registers to local memory (every spilled value is a round trip to DRAM); None if all are clean."""
    builds = list(builds)
    for b in builds:
        if not b["ok"]:
            return f"compiler: {b['function']}: {b['error']}"
    for b in builds:
        if b["spills"]:
            return (f"compiler: {b['function']} spills {b['spills']} B per thread to local memory "
                    f"({b['registers']} registers)")
    return None


class ConfigCheck:
    """The compiler's verdict on one config of a tuned family for one target, before it is launched.

    `check(spec, shape, dtype, config)` captures the family's launch at that shape, dtype and config
    for `target`, builds every kernel it compiles (each cached on disk, see `build.py`) and returns
    `verdict`'s reason, "compiler: ..." (None when every kernel is clean, or the launch compiles no
    Triton kernel). It raises CompileCheckError when it cannot tell. The family must be registered
    by name (built in, or through KERNELHUB_FAMILIES): the compile workers look it up themselves.
    Holds a `CompilerPool` of `workers` processes (started on first use) until `close`; a context
    manager. `kernelhub tune` prunes with it (`kernelhub.tuning.tuner`).
    """

    def __init__(self, target_name: str | Target, *, workers: int = 1, timeout: float = DEFAULT_TIMEOUT_S,
                 use_cache: bool = True):
        self.target = target_name if isinstance(target_name, Target) else target(target_name)
        self.use_cache = use_cache
        self._pool = CompilerPool(workers, timeout=timeout)

    def __call__(self, spec: registry.FamilySpec, shape: Sequence[int], dtype: str, config: Config) -> str | None:
        job = Job(spec.name, self.target, tuple(shape), dtype, dict(config), "given")
        (captured,) = self._pool.run([job.request()])
        if "error" in captured:
            raise CompileCheckError(f"capture: {captured['error']}")
        answers = self._pool.run([_build_request(launch, self.target, self.use_cache)
                                  for launch in captured["launches"]])
        failed = next((a for a in answers if "build" not in a), None)
        if failed is not None:
            raise CompileCheckError(f"build: {failed.get('error')}")
        return verdict(a["build"] for a in answers)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> ConfigCheck:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
