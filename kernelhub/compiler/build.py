"""Compile one captured launch for one target and read what the compiler reports.

NVIDIA: Triton's PTX and cubin; `cuobjdump --dump-resource-usage` (bundled with Triton) on the
cubin gives registers per thread, the stack frame (local memory: what ptxas spilled, or arrays it
could not keep in registers) and static shared memory; Triton's metadata gives the dynamic shared
memory the launch requests. AMD: the AMDGCN assembly's own resource notes (VGPRs, scratch,
occupancy in waves per SIMD) and the LDS Triton requests.

`mma` names the tensor-core instructions the code uses: `wgmma` (Hopper's warpgroup MMA),
`tcgen05` (Blackwell's), `mma` (`mma.sync`, Ampere/Ada, or Hopper without a warpgroup form),
`mfma` (AMD), or None.

Results are cached on disk: `$KERNELHUB_COMPILE_CACHE`, else `<cache dir>/kernelhub/compile`
(`$XDG_CACHE_HOME` or `~/.cache`), one JSON file per key. The key covers what decides the binary:
the kernel's source and the sources of the functions it calls (Triton's own `cache_key`), the
signature, constants, attributes and options of the launch, the target and the Triton version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kernelhub.compiler.capture import Launch
from kernelhub.compiler.targets import Target, occupancy

CACHE_ENV = "KERNELHUB_COMPILE_CACHE"
CACHE_FORMAT = 1  # bump when a Build's fields or their meaning change


@dataclass
class Build:
    """What compiling one launch for one target gave."""

    function: str  # the @triton.jit function's name, e.g. "int8_gemm_kernel"
    ok: bool  # compiled, and within the target's limits
    error: str | None  # why not (the compiler's message, or the limit exceeded)
    shared_bytes: int | None  # per block: what the launch requests plus static shared memory
    registers: int | None  # per thread (VGPRs on AMD)
    spills: int | None  # bytes of stack / scratch per thread: 0 unless something spilled to local memory
    mma: str | None  # tensor-core instruction family, see the module docstring
    num_warps: int
    occupancy: int | None  # resident warps per SM (waves per CU on AMD)
    blocks_per_sm: int | None
    occupancy_limiter: str | None
    compile_s: float
    cached: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV, "").strip():
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "kernelhub" / "compile"


def cache_key(launch: Launch, t: Target) -> str:
    import triton

    text = json.dumps({"format": CACHE_FORMAT, "source": launch.jit_function().cache_key, **launch.to_dict(),
                       "target": t.arch, "triton": triton.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _cached(key: str) -> Build | None:
    path = cache_dir() / f"{key}.json"
    try:
        return Build(**json.loads(path.read_text()), cached=True)
    except (OSError, ValueError, TypeError):  # absent, half-written by a killed run, or of another format
        return None


def _store(key: str, build: Build) -> None:
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({k: v for k, v in build.to_dict().items() if k != "cached"}, f)
        os.replace(tmp, directory / f"{key}.json")
    except OSError:  # a cache that cannot be written costs time, never a result
        pass


def build(launch: Launch, t: Target, *, use_cache: bool = True) -> Build:
    """Compile `launch` for `t` (or read the cached result) and judge it against `t`'s limits."""
    key = cache_key(launch, t)
    if use_cache and (hit := _cached(key)) is not None:
        return hit
    import triton

    started = time.perf_counter()
    num_warps = launch.options.get("num_warps", 4)
    try:
        compiled = triton.compile(launch.source(), target=t.gpu_target(), options=dict(launch.options))
    except Exception as exc:  # the compiler refused it: that is the finding
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        result = Build(launch.name, False, f"{type(exc).__name__}: {message}"[:500], None, None, None, None,
                       num_warps, None, None, None, time.perf_counter() - started)
    else:
        result = (_nvidia(compiled, launch, t, num_warps) if t.backend == "cuda"
                  else _amd(compiled, launch, t, num_warps))
        result.compile_s = time.perf_counter() - started
    _store(key, result)
    return result


def _mma(assembly: str) -> str | None:
    for pattern, family in (("wgmma.mma_async", "wgmma"), ("tcgen05.mma", "tcgen05"), ("mma.sync", "mma"),
                            ("v_mfma", "mfma")):
        if pattern in assembly:
            return family
    return None


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """`REG`, `STACK`, `SHARED`, `LOCAL` of the one kernel in `cubin`, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {name: int(value) for name, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def _judge(result: Build, t: Target) -> Build:
    """Mark a build that a GPU of target `t` would refuse to launch."""
    if result.shared_bytes > t.shared_per_block:
        result.ok = False
        result.error = (f"needs {result.shared_bytes} B of shared memory per block, {t.name} allows "
                        f"{t.shared_per_block} B")
    elif result.blocks_per_sm == 0:
        result.ok = False
        result.error = f"one block does not fit an SM of {t.name} (limited by {result.occupancy_limiter})"
    return result


def _nvidia(compiled, launch: Launch, t: Target, num_warps: int) -> Build:
    usage = resource_usage(compiled.asm["cubin"])
    shared = compiled.metadata.shared + usage.get("SHARED", 0)
    fit = occupancy(t, num_warps=num_warps, registers=usage["REG"], shared_bytes=shared)
    result = Build(launch.name, True, None, shared, usage["REG"], usage.get("STACK", 0) + usage.get("LOCAL", 0),
                   _mma(compiled.asm["ptx"]), num_warps, fit.warps, fit.blocks, fit.limiter, 0.0)
    return _judge(result, t)


def _amd_note(assembly: str, name: str) -> int:
    found = re.search(rf"\.{name}:\s+(\d+)", assembly)
    return int(found.group(1)) if found else 0


def _amd(compiled, launch: Launch, t: Target, num_warps: int) -> Build:
    assembly = compiled.asm["amdgcn"]
    shared = compiled.metadata.shared + _amd_note(assembly, "group_segment_fixed_size")
    registers = _amd_note(assembly, "vgpr_count") + _amd_note(assembly, "agpr_count")
    spills = _amd_note(assembly, "private_segment_fixed_size")
    waves = re.search(r"; Occupancy: (\d+)", assembly)  # waves per SIMD; a CU has 4 SIMDs
    waves_per_cu = 4 * int(waves.group(1)) if waves else None
    blocks = None if waves_per_cu is None else min(waves_per_cu // num_warps, t.shared_per_sm // max(shared, 1))
    limiter = None if blocks is None else ("shared memory" if blocks < waves_per_cu // num_warps else "registers")
    result = Build(launch.name, True, None, shared, registers, spills, _mma(assembly), num_warps,
                   None if blocks is None else blocks * num_warps, blocks, limiter, 0.0)
    return _judge(result, t)
