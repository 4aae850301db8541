"""The search spaces agree with the compiler, and the DEFAULTs compile clean (`kernelhub.compiler`).

For every family with Triton kernels of its own, configs its space accepts (each DEFAULT at the
shapes that choose it, and a deterministic sample) are compiled for sm_80 and sm_90 as a real
launch would compile them, and:

- every config compiles within the target's limits (shared memory per block, one block per SM);
- the shared-memory estimate the constraints use (kernels/common/shared_memory.py's model) is
  never below the compiler's figure, and at most `SharedMemory.margin` above the largest figure
  over sm_80 and sm_90 and the dtypes at which its two terms peak (`peak_dtypes`);
- every DEFAULT, and the fixed kernels' configs, compile without spills in every dtype, on tensor
  cores where there is a dot and the operands are 16-bit or int8;
- the GEMM-like loops are software-pipelined (asynchronous copies into num_stages or
  num_stages - 1 shared-memory buffers).

Compiling takes about a second per kernel: the builds run once per module, in parallel, and are
cached on disk (KERNELHUB_COMPILE_CACHE if set, else pytest's cache directory), so a rerun takes
seconds. No GPU is needed; the interpreter in this process is not used.
"""

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from kernelhub import registry
from kernelhub.compiler import Job, compilable, compile_jobs
from kernelhub.compiler.targets import target
from kernelhub.kernels.common.shared_memory import peak_dtypes
from kernelhub.kernels.int8_gemm import space as int8_space
from kernelhub.kernels.lowrank_keys import gram_space
from kernelhub.kernels.tp_overlap import gemm_space

TARGETS = ("sm_80", "sm_90")
SAMPLES = 3  # sampled configs per family, besides the DEFAULTs

# Shapes of each family (from its tune set, or the real shapes that choose its other DEFAULTs).
SHAPES = {
    "int8_gemm": [(16, 4096, 4096), (1024, 4096, 4096)],  # small-M and large-M DEFAULTs
    "landmark_topk": [(1, 32, 8, 1024, 128, 256), (1, 32, 8, 4096, 128, 256)],  # one pass; split C
    "lowrank_gram": [(1, 8, 4096, 128), (1, 8, 32768, 128)],  # short and long (split S)
    "reconstruct_keys": [(1, 8192, 8, 64, 128, 160), (1, 8192, 8, 2048, 128, 160)],
    "sparse_gather": [(1, 8, 4096, 8, 128, 256)],
    "tp_gemm": [(64, 1280, 8192), (512, 1280, 8192)],
    "quantize_int8": [(16, 4096)],
    "rmsnorm_quant": [(16, 4096, 1), (2048, 8192, 0)],
    "lowrank_project": [(1, 8, 8192, 128, 160)],
}

NO_SHARED_MEMORY = {"sparse_gather"}
NO_DOT = {"sparse_gather", "quantize_int8", "rmsnorm_quant"}


def _sampled(spec, shape):
    """Configs the space accepts for both targets (drawn at sm_80's smaller limit), compiled for
    both, and one that only sm_90's larger limit allows, compiled for sm_90."""
    both = spec.space.sample(SAMPLES - 1, shape, target("sm_80").shared_per_block, seed=11)
    only_sm90 = [c for c in spec.space.sample(20, shape, target("sm_90").shared_per_block, seed=12)
                 if spec.space.infeasibility(c, shape, target("sm_80").shared_per_block)][:1]
    return [(c, TARGETS) for c in both] + [(c, ("sm_90",)) for c in only_sm90]


def _jobs() -> list[Job]:
    jobs = []
    for name, kernel in compilable().items():
        for shape in SHAPES[name]:
            for t in map(target, TARGETS):
                for dtype in kernel.dtypes:
                    if isinstance(kernel, registry.FixedKernel):
                        jobs.append(Job(name, t, shape, dtype, None, "fixed"))
                    else:
                        config = kernel.default_config(shape, dtype)
                        reason = kernel.space.infeasibility(config, shape, t.shared_per_block)
                        jobs.append(Job(name, t, shape, dtype, config, "default", reason))
        if isinstance(kernel, registry.FixedKernel):
            continue
        shape = SHAPES[name][-1]
        for config, targets in _sampled(kernel, shape):
            jobs.extend(Job(name, target(t), shape, dtype, config, "sampled")
                        for t in targets for dtype in peak_dtypes(kernel.dtypes))
    return jobs


@pytest.fixture(scope="module")
def records(request, tmp_path_factory):
    cache = os.environ.get("KERNELHUB_COMPILE_CACHE")
    if not cache:
        pytest_cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
        cache = pytest_cache.mkdir("kernelhub-compile") if pytest_cache else tmp_path_factory.mktemp("compile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERNELHUB_COMPILE_CACHE", str(cache))  # read by the compile workers
        return compile_jobs(_jobs())


def _where(r) -> str:
    return f"{r['kernel']} {r['function']} {r['target']} {r['shape']} {r['dtype']} {r['role']} {r['config']}"


def test_every_family_is_covered():
    kernels = compilable()
    assert set(kernels) == set(SHAPES)
    unestimated = {name for name, kernel in kernels.items() if kernel.shared_memory is None}
    assert unestimated == NO_SHARED_MEMORY | {"quantize_int8"}  # a new family states its estimate


def test_accepted_configs_compile_within_the_targets_limits(records):
    assert records
    failed = [f"{_where(r)}: {r['error']}" for r in records if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert all(r["constraint"] is None for r in records), "a DEFAULT the space rejects"


def test_defaults_and_fixed_configs_do_not_spill(records):
    spilled = [f"{_where(r)}: {r['registers']} registers, {r['spills']} B of stack per thread"
               for r in records if r["role"] in ("default", "fixed") and r["spills"]]
    assert not spilled, "\n".join(spilled)


def test_defaults_use_tensor_cores_for_16_bit_and_int8_operands(records):
    scalar = [_where(r) for r in records if r["role"] in ("default", "fixed") and r["kernel"] not in NO_DOT
              and r["function"] != "int8_dequantize_kernel"  # split-K's elementwise epilogue
              and (r["dtype"] != "float32" or r["kernel"] == "int8_gemm") and r["mma"] is None]
    assert not scalar, "\n".join(scalar)


def _figures(records):
    """{(kernel, shape, config): {(dtype, arch): shared bytes}}, each the largest kernel of its
    launch (split launches compile two): what the device must grant the launch."""
    figures = defaultdict(dict)
    for r in records:
        key, where = (r["kernel"], r["shape"], json.dumps(r["config"], sort_keys=True)), (r["dtype"], r["arch"])
        figures[key][where] = max(figures[key].get(where, 0), r["shared_bytes"])
    return figures


def test_the_shared_memory_estimate_agrees_with_the_compiler(records):
    kernels = compilable()
    below, too_far, measured = [], [], 0
    for (name, shape_text, config_text), figures in _figures(records).items():
        if name in NO_SHARED_MEMORY:
            assert set(figures.values()) == {0}, (name, shape_text, figures)
            continue
        kernel = kernels[name]
        if kernel.shared_memory is None:
            continue
        config = json.loads(config_text)
        need = kernel.shared_memory(config, kernel.parse_shape(shape_text))
        what = f"{name} {shape_text} {config}: estimate {need.bytes} B, compiler {figures}"
        if max(figures.values()) > need.bytes:
            below.append(what)
        if {d for d, _ in figures} >= set(peak_dtypes(kernel.dtypes)):  # both terms of the estimate measured
            measured += 1
            if need.bytes - max(figures.values()) > need.margin:
                too_far.append(f"{what}, margin {need.margin} B")
    assert not below, "the estimate is below what the compiler asks for:\n" + "\n".join(below)
    assert not too_far, "the estimate is further above the compiler's figure than its margin:\n" + "\n".join(too_far)
    estimated = sum(kernel.shared_memory is not None for kernel in kernels.values())
    assert measured >= SAMPLES * (estimated - 1)  # at least every family's sample


# -- software pipelining, read from the compiler's TTGIR --------------------------------------------

_PIPELINE_PROBE = r"""
import json, re, sys
from kernelhub.compiler.capture import capture
from kernelhub.compiler.targets import target
from kernelhub.compiler.worker import _launch_of
import triton

found = {}
for kernel, shape, dtype, config, arch in json.loads(sys.argv[1]):
    t = target(arch)
    for launch in capture(t, _launch_of({"kernel": kernel, "shape": shape, "dtype": dtype, "config": config})):
        ttgir = triton.compile(launch.source(), target=t.gpu_target(), options=dict(launch.options)).asm["ttgir"]
        found[f"{kernel} {arch}"] = {
            "buffers": sorted({int(m) for m in re.findall(r"ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x", ttgir)}),
            "async_copies": len(re.findall(r"ttg\.async_copy_global_to_local", ttgir)),
        }
print(json.dumps(found))
"""


def test_gemm_loops_are_software_pipelined():
    """num_stages buffers of every operand tile where sm_90 uses wgmma, num_stages - 1 on sm_80
    (mma.sync), filled by asynchronous copies. The Gram kernel once was not (its `% HD` wrap-around
    hid the columns' contiguity): one buffer per tile, scalar loads."""
    cases = [("int8_gemm", (1024, 4096, 4096), "int32", int8_space.DEFAULT_LARGE_M),
             ("lowrank_gram", (1, 8, 32768, 128), "bfloat16", gram_space.DEFAULT_LONG),
             ("tp_gemm", (512, 1280, 8192), "bfloat16", gemm_space.DEFAULT_LARGE_M)]
    request = [[k, list(s), d, c, arch] for k, s, d, c in cases for arch in TARGETS]
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", _PIPELINE_PROBE, json.dumps(request)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for kernel, _, _, config in cases:
        stages = config["num_stages"]
        assert found[f"{kernel} sm_90"]["buffers"] == [stages], found
        assert found[f"{kernel} sm_80"]["buffers"] == [stages - 1], found
        assert all(found[f"{kernel} {arch}"]["async_copies"] > 0 for arch in TARGETS), found
