"""Write docs/compile.md: what the compiler makes of every shipped Triton kernel, without a GPU.

Run from the repository root (a few minutes cold; builds are cached, see kernelhub/compiler/build.py):

    python docs/compile_report.py [--compare-with PYTHON] [-o docs/compile.md]

It runs the compiler API as `kernelhub compile` does (`kernelhub.compiler.plan` and `compile_jobs`):
every kernel at its tune shapes in every dtype, the DEFAULTs (and the fixed kernels' configs) for
sm_80 and sm_90 with SAMPLES sampled configs per shape besides, and the DEFAULTs alone for the
other targets (sm_86, sm_89, sm_100, gfx942). The page tabulates, per kernel, target and dtype,
the DEFAULTs' shared memory (with the constraints' estimate), registers, spills, tensor-core
instructions and occupancy; holds the shared-memory estimate against the compiler on every
compiled config; and, with `--compare-with`, sets the figures of another Triton beside these:
PYTHON is an interpreter whose Triton is another version (the GPU machines' 3.6), in which this
script runs itself with `--json` and the same plan for sm_80 and sm_90.

The section "What the compiler showed and what changed" is `FINDINGS` below: what issue 11's work
found and changed, with figures measured while doing it (the "before" states are no longer in
the code, so they cannot be regenerated; the "after" figures are in the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import markdown_table  # noqa: E402  (benchmarks/harness.py: one formatter for every results page)

MAIN_TARGETS = ("sm_80", "sm_90")
OTHER_TARGETS = ("sm_86", "sm_89", "sm_100", "gfx942")
SAMPLES = 2  # sampled configs per shape on the main targets, besides the DEFAULTs
COMMAND = "python docs/compile_report.py"


def compile_records(targets, samples: int) -> list[dict]:
    from kernelhub.compiler import compile_jobs, plan

    return compile_jobs(plan(None, targets, shape_set="tune", samples=samples),
                        progress=lambda line: print(line, file=sys.stderr))


def other_triton_records(python: str) -> tuple[str, list[dict]]:
    """The main targets' DEFAULTs compiled by another interpreter's Triton: (its version, records)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        subprocess.run([python, __file__, "--json", str(out), "--samples", "0"], check=True, cwd=ROOT)
        doc = json.loads(out.read_text())
    return doc["triton_version"], doc["records"]


# -- tables --------------------------------------------------------------------------------------

def _config_text(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def _kib(value) -> str:
    return "-" if value is None else f"{value / 1024:.1f}"


def _estimate(r) -> int | None:
    from kernelhub.compiler import compilable

    kernel = compilable()[r["kernel"]]
    if kernel.shared_memory is None:
        return None
    return kernel.shared_memory(r["config"], kernel.parse_shape(r["shape"])).bytes


def _occupancy(r) -> str:
    return "-" if r["occupancy"] is None else f"{r['occupancy']} ({r['occupancy_limiter']})"


def default_rows(records) -> dict[str, list[dict]]:
    """Per kernel, one row per distinct (function, target, dtype, config, figures): shapes that
    compile alike share a row."""
    groups: dict[str, dict] = {}
    for r in records:
        if r["role"] not in ("default", "fixed"):
            continue
        figures = [r[k] for k in ("kernel", "function", "target", "dtype", "ok", "error", "shared_bytes", "registers",
                                  "spills", "mma", "occupancy", "occupancy_limiter", "constraint")] + [_estimate(r)]
        key = json.dumps([figures, r["config"]], sort_keys=True)
        groups.setdefault(key, {"record": r, "estimate": figures[-1], "shapes": 0})["shapes"] += 1
    by_kernel = defaultdict(list)
    for group in groups.values():
        r = group["record"]
        result = "ok" if r["ok"] else f"FAIL: {r['error']}"
        if r["constraint"]:
            result += f"; the constraints reject it here ({r['constraint']})"
        by_kernel[r["kernel"]].append({
            "function": r["function"] or "-", "target": r["target"], "dtype": r["dtype"],
            "config": _config_text(r["config"]), "shapes": group["shapes"], "smem KiB": _kib(r["shared_bytes"]),
            "estimate KiB": _kib(group["estimate"]), "regs": r["registers"], "spills B": r["spills"],
            "mma": r["mma"] or "-", "warps/SM (limit)": _occupancy(r), "result": result})
    return by_kernel


DEFAULT_COLUMNS = ("function", "target", "dtype", "config", "shapes", "smem KiB", "estimate KiB", "regs",
                   "spills B", "mma", "warps/SM (limit)", "result")


def version_rows(records, other_version, other_records) -> list[dict]:
    """The main targets' DEFAULTs under both Triton versions, one row per distinct kernel."""
    def keyed(recs):
        out = {}
        for r in recs:
            if r["role"] in ("default", "fixed") and r["arch"] in MAIN_TARGETS:
                out.setdefault((r["kernel"], r["function"], r["target"], r["dtype"],
                                json.dumps(r["config"], sort_keys=True)), r)
        return out

    ours, theirs = keyed(records), keyed(other_records)
    rows = []
    for key in sorted(ours.keys() & theirs.keys()):
        a, b = ours[key], theirs[key]
        both = lambda field: f"{a[field]} / {b[field]}"  # noqa: E731
        rows.append({"kernel": key[0], "function": key[1], "target": key[2], "dtype": key[3],
                     "config": _config_text(json.loads(key[4])), "regs": both("registers"),
                     "spills B": both("spills"), "smem KiB": f"{_kib(a['shared_bytes'])} / {_kib(b['shared_bytes'])}",
                     "mma": f"{a['mma'] or '-'} / {b['mma'] or '-'}",
                     "ok": f"{'ok' if a['ok'] else 'FAIL'} / {'ok' if b['ok'] else 'FAIL'}"})
    return rows


def estimate_rows(records) -> list[dict]:
    """Per kernel, the constraints' shared-memory estimate against the compiler over every compiled
    (config, shape): never below it, and how far above the largest figure of the dtypes at which
    the estimate peaks (kernels/common/shared_memory.py's `peak_dtypes`) on sm_80 and sm_90."""
    from kernelhub.compiler import compilable
    from kernelhub.kernels.common.shared_memory import peak_dtypes

    figures = defaultdict(dict)
    for r in records:
        if r["arch"] in MAIN_TARGETS and r["shared_bytes"] is not None:
            key, where = (r["kernel"], r["shape"], json.dumps(r["config"], sort_keys=True)), (r["dtype"], r["arch"])
            figures[key][where] = max(figures[key].get(where, 0), r["shared_bytes"])
    stats = defaultdict(lambda: {"configs": 0, "below": 0, "judged": 0, "within margin": 0, "over": []})
    for (name, shape, config), by in figures.items():
        kernel = compilable()[name]
        if kernel.shared_memory is None:
            continue
        need = kernel.shared_memory(json.loads(config), kernel.parse_shape(shape))
        s = stats[name]
        s["configs"] += 1
        s["below"] += max(by.values()) > need.bytes
        if {d for d, _ in by} >= set(peak_dtypes(kernel.dtypes)):
            s["judged"] += 1
            s["within margin"] += need.bytes - max(by.values()) <= need.margin
            s["over"].append((need.bytes - max(by.values())) / need.bytes)
    return [{"kernel": name, "(config, shape)s": s["configs"], "estimate below compiler": s["below"],
             "judged on both peak dtypes": s["judged"], "within margin": s["within margin"],
             "median over-estimate": f"{100 * sorted(s['over'])[len(s['over']) // 2]:.0f}%" if s["over"] else "-",
             "largest over-estimate": f"{100 * max(s['over']):.0f}%" if s["over"] else "-"}
            for name, s in sorted(stats.items())]


# -- the page ------------------------------------------------------------------------------------

FINDINGS = """\
## What the compiler showed and what changed

Figures of Triton 3.9.0 unless marked; "before" states are gone from the code and were measured
while this work was done (issue 11, parts 2 and 3).

### The int8 GEMM's main loop is software-pipelined

The issue reported one stage of A and B in shared memory (16 KiB at 128 x 128 x 64, 3 stages,
sm_90). The TTGIR (`compiled.asm["ttgir"]`) of the shipped loop, and of a tutorial-form rewrite
(pointers advanced by BLOCK_K * stride, loop from 0), says otherwise, on Triton 3.9 and 3.6 alike:

| loop | target | operand buffers (`ttg.local_alloc`) | async copies | shared memory |
|---|---|---|---|---|
| shipped, K = 4096 | sm_90 | 3 x 128x64 i8 + 3 x 64x128 i8 = 48 KiB | 6 (`cp.async`, 16 B) | 66560 B: the epilogue's 64 KiB + 1 KiB static |
| shipped, K = 4096 | sm_80 | 2 x 128x64 i8 + 2 x 64x128 i8 = 32 KiB | 6 | 32768 B |
| tutorial form, K = 4096 | sm_90 | the same 3 + 3 | 6 | 66560 B |
| shipped or tutorial, K = 4097 | sm_90 | 1 x 128x64 + 1 x 64x128 (not pipelined) | 0 (scalar `ld.global` x 64) | 66560 B |

So the loop is pipelined as intended: sm_90's wgmma reads its operands from shared memory and
keeps num_stages copies; sm_80's mma.sync loads a copy into registers first and keeps
num_stages - 1 (num_stages 2, 3, 4 give 1, 2, 3 copies). The 64 KiB is the epilogue: the
128 x 128 int32 accumulator changes layout through shared memory before the store (8 warps; 32
KiB with 4), in the pipeline's buffers, which is why the shared-memory figure hid the stages.
Two limits remain, both the compiler's: a K whose rows are not 4-byte aligned (K % 4 != 0) gives
int8 loads no vector width, so no `cp.async` and one copy (no LLM layer has such a K); and wgmma
with an int32 accumulator stays synchronous (`warp_group_dot_wait {pendings = 0}`: Triton only
overlaps consecutive wgmmas for float32 accumulators; the bfloat16 chunk GEMM gets `pendings = 1`).
The kernel was left as it is. tests/test_compile_agreement.py reads the TTGIR to hold it so.

### The Gram kernel was not pipelined, and its loads were scalar

`gram_kernel` wrapped columns past HD around with `offs % HD`, a runtime modulus: the compiler
could no longer see that a tile's columns are contiguous in k, so its loads were scalar
(`ld.global.b16` x 32 per thread for the 64 x 32 tiles) and nothing was pipelined: one copy of
each tile in shared memory, no asynchronous copies. Masking those columns instead:

| DEFAULT (bfloat16) | target | before: buffers, loads, regs | after: buffers, loads, regs |
|---|---|---|---|
| 128 x 128, BLOCK_S 32, 3 stages, 8 warps | sm_90 | 1 + 1, scalar, 219 | 3 + 3, `cp.async` 16 B, 162 |
| same | sm_80 | 1 + 1, scalar, 230 | 2 + 2, `cp.async` 16 B, 200 |

(Shared memory stays 66560 / 65536 B: the epilogue's conversion of the 128 x 128 float32 tile
dominates both.)

### Spills of the DEFAULTs, each fixed

float32 operands multiply on FMA units, whose dot keeps operand fragments in registers; the
16-bit tilings spilled there. float32 now has DEFAULTs of its own (in each family's `DEFAULTS`,
feasible on the smallest GPU, checked against the reference in the interpreter); the 16-bit
DEFAULTs keep their tensor-core tiles.

| kernel | target, dtype | before: config, regs, spills | after: config, regs, spills |
|---|---|---|---|
| lowrank_gram | sm_80 float32 | 128 x 128, BLOCK_S 32, 8 warps: 255, 176 B (312 B once pipelined) | BLOCK_S 16: 192, 0 |
| reconstruct_keys | sm_80 float32 | BLOCK_N 64, BLOCK_R 32, 4 warps: 255, 392 B | BLOCK_R 16, 8 warps: 116, 0 |
| lowrank_project (fixed) | sm_80 float32 | BLOCK_C 64: 255, 512 B | BLOCK_C 32 (every dtype): 210, 0 |
| landmark_topk stats pass | sm_90 float32 | BLOCK_C 64, 4 warps: 255, 152 B | 8 warps: 42, 0 |
| landmark_topk scores pass (SPLIT_C 1) | sm_90 float32 | 4 warps: 255, 184 B | 8 warps: 150, 0 |
| tp_gemm (no spill, no headroom) | sm_80 float32 | 128 x 128 x 32: 255, 0 | BLOCK_K 16: 228, 0 |

### The shared-memory estimates against the compiler

Before, each family estimated its pipeline buffers alone (tp_gemm with 2-byte operands whatever
the dtype). Against the compiler (10 sampled configs per family and shape, sm_80 and sm_90):

| kernel | compiled | estimate below the compiler | worst case |
|---|---|---|---|
| int8_gemm | 275 | 20 | the large-M DEFAULT on sm_90: 66560 B against an estimate of 49152 (the epilogue's 64 KiB uncounted) |
| tp_gemm | 66 | 30, 1 refused | float32 64 x 128 x 64, 5 stages, sm_90: 197632 B against 122880; a float32 config the space accepted needed 295936 B of sm_90's 232448 |
| landmark_topk | 123 | 4 | 1 KiB (sm_90's static shared memory uncounted) |
| lowrank_gram | 66 | 2 | 1 KiB |
| reconstruct_keys | 66 | 3 | 1 KiB |

Now every family's constraint uses one model, kernels/common/shared_memory.py:
need = max(num_stages x stage + resident, epilogue) + 1 KiB, counted in the widest dtype the
family has (tp_gemm: float32 operands), the epilogue min(rows, 16 x num_warps) x cols x 4 B (2 B
where the tile is cast to a 16-bit output first). It is exact where sm_90 uses wgmma and one
stage over where the target keeps num_stages - 1 copies. Stated margin, tested on every family
(tests/test_compile_agreement.py): never below the compiler on sm_80 or sm_90, and above the
largest figure over the two targets and the dtypes at which the estimate peaks by at most one
stage + the reduction-scratch allowance + 1 KiB where the stages decide the estimate, three
quarters of the epilogue + 1 KiB where the epilogue does (mma.sync converts as little as a
quarter of what wgmma does). The table "Estimates against the compiler" above holds it over
every config this page compiled; 30 more sampled configs per family (three seeds, Triton 3.9 and
3.6) held it too while the model was fitted.

### Triton 3.6

The float32 spills above are Triton 3.9's: 3.9's mma.sync and FMA loops load the next step's
operand fragments into registers a step ahead (the int8 large-M DEFAULT: 240 registers on sm_80
against 3.6's 127). With Triton 3.6.0 (the GPU machines') the old float32 DEFAULT configs do not
spill (the Gram's, in the pipelined kernel, 198 / 217 registers on sm_80 / sm_90; reconstruct 178 /
188; the landmark passes 56); what 3.6 refused was the projection's old tiling on sm_90 in
float32 (BLOCK_C 64: 128 registers and 8 B of stack, so `kernelhub compile --target sm_90
--configs 0` failed), fixed by the same BLOCK_C 32 (166 registers, no stack). Now `kernelhub
compile --configs 0` (and `--configs 2`) passes with both versions on sm_80 and sm_90, and
tests/test_compile_agreement.py passes under both; the table above sets the versions' figures
side by side.

### Other kernels, reviewed the same way

Every GEMM-like loop (int8_gemm, tp_gemm, reconstruct_keys, lowrank_project, and now
lowrank_gram) fills its operand tiles with 16-byte `cp.async` copies, num_stages (sm_90, wgmma)
or num_stages - 1 (mma.sync) copies deep, and uses tensor cores for 16-bit and int8 operands
(`mma.sync` on sm_80, `wgmma` on sm_90 where BLOCK_M >= 64; landmark_topk's 16-row query group
is below wgmma's 64 rows and uses mma.sync on sm_90). sparse_gather loads and stores 16 B per
thread (`ld.global.v4`, `st.global.v4`) and needs no shared memory; quantize_int8 loads 16 B per
thread and stores its int8 row 8 B at a time.

### No fused multiply-add contraction, on every launch

Every launch passes `LAUNCH_OPTIONS` (kernels/common/triton_helpers.py): `enable_fp_fusion=False`.
Before, only int8_gemm and rmsnorm_quant did (their bit-exactness needs it); the others took
Triton's default, which 3.9 warns will change in 3.10, printing that warning in the main job. Of
the DEFAULTs only reconstruct_keys compiles differently (its RoPE's multiply-add pairs stay two
roundings): 214 instead of 220 to 222 registers for 16-bit keys on sm_80 / sm_90, 118 instead of
116 for float32, no spills either way; every other kernel's registers, spills and shared memory
are unchanged (a `kernelhub compile --configs 0 --json` of both commits, compared record by record).

Left alone: the Gram kernel's mirrored store is scalar (a branch that stores off-diagonal tiles
with a row-constant mask vectorises it but costs 40 registers); sampled configs at the register
constraints' edge (128 accumulator registers per thread) spill on mma.sync targets, and the
tuner times them like any other; on gfx942 the DEFAULTs compile within 16 to 32 KiB of LDS, but
the estimate, fitted to NVIDIA's pipelines, exceeds its 64 KiB for most of them (see the
other-targets table): an AMD model would need AMD figures of its own.
"""


def page(records, other_version=None, other_records=None) -> str:
    import triton

    from kernelhub.compiler import compilable

    command = COMMAND + (" --compare-with PYTHON" if other_records is not None else "")
    versions = f"Triton {triton.__version__}" + (f" (and {other_version} for the comparison)" if other_version else "")
    lines = [
        "# What the compiler makes of the kernels",
        "",
        f"Generated by `{command}` on {platform.machine()} with {versions}"
        + (f"; PYTHON: an interpreter with Triton {other_version} and kernelhub installed." if other_version else "."),
        "",
        "**No GPU ran anything.** Every figure is the compiler's static account of a kernel built for a",
        "real target on a CPU machine (`kernelhub compile`): Triton's launch metadata and `cuobjdump",
        "--dump-resource-usage` on the cubin (AMD: the AMDGCN assembly's notes). They say what a GPU would",
        "be asked for (registers, spills to local memory, shared memory per block, which tensor-core",
        "instructions, how many warps fit an SM), not how fast anything runs.",
        "",
        "Columns: smem KiB, the shared memory per block the launch requests (dynamic + static);",
        "estimate KiB, what the family's constraints estimate for the config (kernels/common/shared_memory.py),",
        "counted in the family's widest dtype, so the 16-bit rows sit further below it;",
        "regs, registers per thread; spills B, local-memory stack per thread (0: nothing spilled);",
        "mma: `wgmma` (Hopper's warpgroup MMA), `tcgen05` (Blackwell's), `mma` (`mma.sync`), `mfma` (AMD),",
        "`-` none (FMA units, or no dot); warps/SM, resident warps per SM and what limits them;",
        "shapes, how many of the kernel's tune shapes compile to these figures.",
        "",
    ]
    names = list(compilable())
    rows = default_rows(records)
    lines += [f"## DEFAULTs on {' and '.join(MAIN_TARGETS)}", ""]
    for name in names:
        main = [r for r in rows.get(name, []) if r["target"] in MAIN_TARGETS]
        if main:
            lines += [f"### {name}", "", markdown_table(main, DEFAULT_COLUMNS), ""]
    other = [dict(r, kernel=name) for name in names for r in rows.get(name, []) if r["target"] in OTHER_TARGETS]
    if other:
        lines += [f"## DEFAULTs on {', '.join(OTHER_TARGETS)}", "",
                  "The same DEFAULTs for the other targets kernelhub knows (kernelhub/compiler/targets.py). gfx942",
                  "(MI300X) has 64 KiB of LDS per workgroup: where the constraints' estimate, counted for NVIDIA's",
                  "pipelines, exceeds it the row says so.", "",
                  markdown_table(other, ("kernel",) + DEFAULT_COLUMNS), ""]
    lines += ["## Estimates against the compiler", "",
              f"Every (config, shape) compiled for {' and '.join(MAIN_TARGETS)} above and the {SAMPLES} sampled configs per",
              "shape: how often the constraints' shared-memory estimate is below the compiler's figure (it must never",
              "be), and by how much (a share of the estimate) it exceeds the largest figure where both of the dtypes",
              "at which it peaks were compiled (`peak_dtypes`), against the stated margin",
              "(both in kernels/common/shared_memory.py).", "",
              markdown_table(estimate_rows(records),
                             ("kernel", "(config, shape)s", "estimate below compiler", "judged on both peak dtypes",
                              "within margin", "median over-estimate", "largest over-estimate")), ""]
    if other_records is not None:
        lines += [f"## Triton {triton.__version__} / {other_version}", "",
                  f"The DEFAULTs on {' and '.join(MAIN_TARGETS)} under both versions (figures: {triton.__version__} / "
                  f"{other_version}).", "",
                  markdown_table(version_rows(records, other_version, other_records),
                                 ("kernel", "function", "target", "dtype", "config", "smem KiB", "regs", "spills B",
                                  "mma", "ok")), ""]
    lines += [FINDINGS]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=str(ROOT / "docs" / "compile.md"))
    parser.add_argument("--compare-with", metavar="PYTHON", help="an interpreter whose Triton is another version")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="sampled configs per shape on sm_80, sm_90")
    parser.add_argument("--json", metavar="FILE", help="write the main targets' records as JSON instead of the page")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    import triton

    records = compile_records(MAIN_TARGETS, args.samples)
    if args.json:
        Path(args.json).write_text(json.dumps({"triton_version": triton.__version__, "records": records}))
        return 0
    records += compile_records(OTHER_TARGETS, 0)
    other_version, other_records = other_triton_records(args.compare_with) if args.compare_with else (None, None)
    Path(args.output).write_text(page(records, other_version, other_records) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
