"""`kernelhub.compiler`: real GPU compilation on the CPU, what it reports, and how it fails.

The captures and builds run in compile workers (Triton's real JIT, TRITON_INTERPRET=0) while this
process runs the interpreter, as `kernelhub compile` does.
"""

import json

import pytest

from kernelhub import cli
from kernelhub.compiler import Job, compile_jobs, plan, problems
from kernelhub.compiler.build import Build, _judge
from kernelhub.compiler.pool import CompilerPool
from kernelhub.compiler.targets import ARCHITECTURES, occupancy, target
from kernelhub.errors import KernelhubError
from kernelhub.kernels.int8_gemm import space as int8_space


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One compile cache for the module: each distinct kernel is compiled once."""
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture
def cached(compile_cache, monkeypatch):
    monkeypatch.setenv("KERNELHUB_COMPILE_CACHE", str(compile_cache))


# -- targets and occupancy --------------------------------------------------------------------------

@pytest.mark.parametrize("name, arch, sms", [("h100", "sm_90", 132), ("A100", "sm_80", 108), ("l40s", "sm_89", 142),
                                             ("sm90", "sm_90", None), ("86", "sm_86", None),
                                             ("mi300x", "gfx942", 304), ("b200", "sm_100", 148)])
def test_a_target_is_an_architecture_or_a_gpu_key(name, arch, sms):
    t = target(name)
    assert t.arch == arch and t.sm_count == sms
    assert t.shared_per_block == ARCHITECTURES[arch].shared_per_block


def test_an_unknown_target_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown target 'sm_70'.*sm_80.*h100"):
        target("sm_70")


def test_occupancy_follows_the_calculators_rules():
    h100 = target("sm_90")
    # 8 warps of 96 registers: 3072 registers per warp, 21 warps by registers -> 2 blocks of 8.
    fit = occupancy(h100, num_warps=8, registers=96, shared_bytes=66560)
    assert (fit.blocks, fit.warps, fit.limiter) == (2, 16, "registers")
    # 31 KiB + the 1 KiB the driver reserves: 7 blocks in 228 KiB.
    fit = occupancy(h100, num_warps=4, registers=50, shared_bytes=31 * 1024)
    assert (fit.blocks, fit.limiter) == (7, "shared memory")
    fit = occupancy(target("sm_86"), num_warps=4, registers=32, shared_bytes=0)
    assert (fit.blocks, fit.limiter) == (12, "warps")  # 48 warps per SM on sm_86
    # Registers round up per warp in units of 256: 33 registers take 40 per thread.
    assert occupancy(h100, num_warps=1, registers=33, shared_bytes=0).blocks == 32  # the block limit
    assert occupancy(h100, num_warps=32, registers=255, shared_bytes=0).blocks == 0


def test_a_build_over_the_targets_limits_is_not_ok():
    sm86 = target("sm_86")
    over = Build("k", True, None, sm86.shared_per_block + 1, 32, 0, None, 4, 4, 1, "shared memory", 0.1)
    assert not _judge(over, sm86).ok and "allows 101376 B" in over.error
    nothing_fits = Build("k", True, None, 1024, 255, 0, None, 32, 0, 0, "registers", 0.1)
    assert not _judge(nothing_fits, sm86).ok and "does not fit an SM" in nothing_fits.error


# -- what problems fail a CI run ------------------------------------------------------------------------

def _record(role, ok=True, spills=0, constraint=None, error=None):
    return {"role": role, "ok": ok, "spills": spills, "constraint": constraint, "error": error}


@pytest.mark.parametrize("rec, fails", [
    (_record("default"), False),
    (_record("default", spills=8), True),
    (_record("default", ok=False, error="x"), True),
    (_record("fixed", spills=8), True),
    (_record("given", ok=False, error="x"), True),
    (_record("sampled", spills=8), False),  # a spilling sample is a finding, not a failure
    (_record("sampled", ok=False, error="x"), True),  # accepted by the space, refused by the compiler
    (_record("sampled", ok=False, error="x", constraint="needs 1 MB"), False),
], ids=["default-ok", "default-spills", "default-fails", "fixed-spills", "given-fails", "sampled-spills",
        "sampled-refused", "sampled-refused-by-both"])
def test_problems(rec, fails):
    assert bool(problems([rec])) == fails


# -- planning -----------------------------------------------------------------------------------------

def test_plan_covers_defaults_samples_and_fixed_kernels():
    dtypes = ["int32", "float16"]
    jobs = plan(["int8_gemm", "quantize_int8"], ["sm_80", "h100"], shape_set="smoke", samples=2, dtypes=dtypes)
    int8 = [j for j in jobs if j.kernel == "int8_gemm"]
    shapes = int8_space.SHAPE_SETS["smoke"]
    assert {j.role for j in int8} == {"default", "sampled"}
    assert len([j for j in int8 if j.role == "default"]) == 2 * len(shapes) * 2  # targets x shapes x dtypes
    for j in int8:
        if j.role == "sampled":  # feasible for that target, and never the DEFAULT again
            assert int8_space.SPACE.infeasibility(j.config, j.shape, j.target.shared_per_block) is None
            assert j.config != int8_space.default_config(j.shape, j.dtype)
    quantize = [j for j in jobs if j.kernel == "quantize_int8"]
    assert quantize and {j.role for j in quantize} == {"fixed"} and {j.dtype for j in quantize} == {"float16"}
    assert {j.target.name for j in jobs} == {"sm_80", "h100"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(names=["no_such_kernel"]), "not a kernel that compiles"),
    (dict(names=["all_gather_gemm"]), "not a kernel that compiles"),  # a collective: its GEMM is tp_gemm
    (dict(targets=["sm_70"]), "--target: unknown target"),
    (dict(config={"BLOCK_M": 16}), "exactly one --kernel"),
    (dict(names=["int8_gemm"], config={"BLOCK_M": 7}), "--config"),
    (dict(names=["int8_gemm"], dtypes=["float64"]), "--dtype"),
], ids=["unknown", "collective", "bad-target", "config-without-kernel", "bad-config", "no-such-dtype"])
def test_plan_refuses_what_cannot_compile(kwargs, message):
    with pytest.raises(KernelhubError, match=message):
        plan(**kwargs)


# -- compiling for real (in compile workers) ------------------------------------------------------------

def test_int8_defaults_compile_to_tensor_core_code_on_both_targets(cached):
    jobs = [j for j in plan(["int8_gemm"], ["sm_80", "sm_90"], shape_set="tune", samples=0, dtypes=["int32"])
            if j.shape in [(128, 4096, 4096), (1, 4096, 4096)]]
    records = compile_jobs(jobs, workers=2)
    assert len(records) == 4 and not problems(records)
    by = {(r["target"], r["shape"]): r for r in records}
    for r in records:
        assert r["ok"] and r["function"] == "int8_gemm_kernel" and r["registers"] > 0 and r["spills"] == 0
        assert 0 < r["shared_bytes"] <= target(r["target"]).shared_per_block and r["occupancy"] > 0
    assert by["sm_80", "M=128,N=4096,K=4096"]["mma"] == "mma"  # mma.sync ... s32.s8.s8.s32
    assert by["sm_90", "M=128,N=4096,K=4096"]["mma"] == "wgmma"  # wgmma.mma_async ... s32.s8.s8
    # The same binary for every M divisible by 16: one build serves several shapes.
    again = compile_jobs([j for j in plan(["int8_gemm"], ["sm_90"], samples=0, dtypes=["int32"])
                          if j.shape[0] in (128, 1024)], workers=1)
    assert {r["cached"] for r in again} == {True}


def test_a_split_k_launch_compiles_both_of_its_kernels(cached):
    config = dict(int8_space.DEFAULT_SMALL_M, SPLIT_K=4)
    job = Job("int8_gemm", target("sm_90"), (1, 4096, 4096), "bfloat16", config, "given")
    records = compile_jobs([job], workers=1)
    assert [r["function"] for r in records] == ["int8_gemm_kernel", "int8_dequantize_kernel"]
    assert all(r["ok"] for r in records)


def test_the_compile_cache_is_per_target_and_survives_a_corrupt_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELHUB_COMPILE_CACHE", str(tmp_path))
    jobs = plan(["quantize_int8"], ["sm_80", "sm_90"], shape_set="smoke", dtypes=["float32"])[:1]
    jobs += [j for j in plan(["quantize_int8"], ["sm_90"], shape_set="smoke", dtypes=["float32"])][:1]
    first = compile_jobs(jobs, workers=1)
    assert [r["cached"] for r in first] == [False, False]  # two targets, two builds
    entries = sorted(tmp_path.glob("*.json"))
    assert len(entries) == 2
    entries[0].write_text("{not json")  # a run killed mid-write, or another version's format
    second = compile_jobs(jobs, workers=1)
    assert sorted(r["cached"] for r in second) == [False, True]
    assert [r["registers"] for r in second] == [r["registers"] for r in first]


def test_a_compiler_process_that_dies_is_one_error_and_the_pool_goes_on(monkeypatch):
    """tests/fault_families.py's launches crash or hang the worker that captures them."""
    from kernelhub import registry

    monkeypatch.setenv("KERNELHUB_FAMILIES", "fault_families")  # the workers register them
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))  # and nothing stays registered here
    from fault_families import FAULTY, HANG, SEGFAULT

    def request(fault):
        return Job(FAULTY.name, target("sm_90"), (7,), "int32", {"FAULT": fault}, "given").request()

    with CompilerPool(1, timeout=5) as pool:
        crashed, hung, fine = pool.run([request(SEGFAULT), request(HANG), request(0)])
    assert crashed == {"error": "the compiler process killed by SIGSEGV"}
    assert "no answer within 5 s" in hung["error"]
    assert fine == {"launches": []}  # a launch that compiles no Triton kernel captures nothing


# -- the command ------------------------------------------------------------------------------------------

def test_compile_command_writes_a_table_and_json(cached, tmp_path, capsys):
    out = tmp_path / "compile.json"
    rc = cli.main(["compile", "--kernel", "quantize_int8", "--target", "sm_90", "--shapes", "smoke",
                   "--dtype", "bfloat16", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "quantize_int8_kernel" in printed and "sm_90" in printed and "fixed" in printed
    doc = json.loads(out.read_text())
    assert {r["kernel"] for r in doc["records"]} == {"quantize_int8"}
    for r in doc["records"]:
        for field in ("kernel", "target", "shape", "config", "ok", "error", "shared_bytes", "registers", "spills",
                      "mma", "occupancy", "compile_s"):
            assert field in r, field


@pytest.mark.parametrize("argv, message", [
    (["--target", "sm_70"], "--target: unknown target"),
    (["--config", "{not json"], "--config: not JSON"),
    (["--config", '{"BLOCK_M": 16}'], "exactly one --kernel"),
    (["--kernel", "nope"], "not a kernel that compiles"),
], ids=["target", "config-json", "config-kernel", "kernel"])
def test_compile_command_refusals_are_one_line(capsys, argv, message):
    assert cli.main(["compile", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_config_that_spills_is_reported_and_fails_the_command(cached, monkeypatch, capsys):
    """A 128x256 int32 accumulator on 4 warps is 256 registers per thread before anything else: ptxas
    spills. Compiled for real once; the command's exit code is then checked on that record."""
    config = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "SPLIT_K": 1, "num_warps": 4,
              "num_stages": 2}
    job = Job("int8_gemm", target("sm_80"), (128, 4096, 4096), "int32", config, "given",
              int8_space.SPACE.infeasibility(config, (128, 4096, 4096), target("sm_80").shared_per_block))
    (record,) = compile_jobs([job], workers=1)
    assert record["ok"] and record["spills"] > 0 and record["registers"] == 255
    assert "accumulator" in record["constraint"]  # the space's register estimate rejects it too
    import kernelhub.compiler as compiler

    monkeypatch.setattr(compiler, "compile_jobs", lambda jobs, **kwargs: [record])
    rc = cli.main(["compile", "--kernel", "int8_gemm", "--config", json.dumps(config)])
    captured = capsys.readouterr()
    assert rc == 1 and "given config spills" in captured.err and "M=128,N=4096,K=4096" in captured.err


@pytest.mark.slow
def test_every_default_compiles_within_limits_and_without_spills_on_sm80_and_sm90(capsys):
    """The CI check users run for their fleet: `kernelhub compile --configs 0` (the DEFAULTs and the
    fixed kernels' configs at every tune shape and dtype, for sm_80 and sm_90) exits 0. Under the
    older Triton the GPU machines carry, tests/run.sh runs the same for sm_90 (.ci/triton36.sh)."""
    rc = cli.main(["compile", "--configs", "0"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "sm_80" in captured.out and "sm_90" in captured.out
