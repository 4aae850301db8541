"""The `kernelhub` command line: gpus, check, compile, tune, show, prune, export, import, report, sweep,
replay. Each command parses, reads through to the module that does the work, and prints.

Errors are one line on stderr and a non-zero exit code, never a traceback: a bad argument is
argparse's usage error (exit 2), checked by the argument's type; a problem kernelhub knows is its
message (exit 1); anything else is named as a kernelhub bug (exit 1). Output into a closed pipe
(`kernelhub show | head -1`) ends the command quietly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence

from kernelhub.errors import DeviceMismatchError, KernelhubError

CHECK_SAMPLES = 3  # sampled configs per shape, on top of every DEFAULT
MAX_SEED = 2**32 - 1  # numpy's (and so Optuna's samplers') largest seed


def _families(names: Sequence[str] | None):
    from kernelhub.kernels.loader import families, get_family

    return [get_family(n) for n in names] if names else families()


def _db_url(db: str | None) -> str:
    """The database `--db` names (a URL or a SQLite file path), else KERNELHUB_DB's or the default."""
    from kernelhub.db.store import database_url

    return database_url(db or None)


def _open_store(url: str | None, *, create: bool = True):
    from kernelhub.db import ConfigStore

    return ConfigStore(_db_url(url), create=create)


def _this_machine(gpu: str | None, nothing_done: str):
    """This machine's identity, after checking that `--gpu` (when given) names it; DeviceMismatchError
    saying `nothing_done` otherwise."""
    from kernelhub.device import current_device

    detected = current_device()
    if gpu is not None and gpu.lower() != detected.key:
        raise DeviceMismatchError(f"--gpu {gpu} does not match this machine's device, {detected.describe()}; "
                                  f"{nothing_done}")
    return detected


def _missing_database(url: str | None) -> str | None:
    """A message if `url` is a SQLite file that does not exist yet (reading never creates one)."""
    from kernelhub.db.store import sqlite_path

    path = sqlite_path(_db_url(url))
    if path is not None and not path.exists():
        return f"no config database yet at {path} (`kernelhub tune` or `kernelhub import` creates it)"
    return None


def _existing_store(url: str | None):
    """The database to read, opened without creating it; None (after saying so) if it does not exist yet."""
    missing = _missing_database(url)
    if missing:
        print(missing)
        return None
    return _open_store(url, create=False)


def _printable(value: object) -> str:
    """A table cell: None as `?`, text with control characters escaped (it came from a database)."""
    text = "?" if value is None else str(value)
    return text if text.isprintable() else ascii(text)[1:-1]


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[_printable(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- gpus --------------------------------------------------------------------------------------

def cmd_gpus(args) -> int:
    import torch

    from kernelhub.device import current_device

    indices = range(torch.cuda.device_count()) if torch.cuda.is_available() else [None]
    for index in indices:
        identity = current_device(index)
        print(f"device {index if index is not None else '-'}: key {identity.key}")
        for field, value in identity.to_dict().items():
            print(f"  {field:20s} {value}")
    return 0


# -- check -------------------------------------------------------------------------------------

def cmd_check(args) -> int:
    from kernelhub.device import current_device
    from kernelhub.tuning.collective import check_families

    device = current_device()
    if not device.is_gpu:
        from kernelhub.backend import interpreter_problem

        problem = interpreter_problem()
        if problem:
            raise KernelhubError(problem)
    where = "on the GPU" if device.is_gpu else "in the Triton interpreter (no GPU)"
    print(f"kernelhub check {where}: {device.describe()}")
    failures = check_families(_families(args.kernel), device, samples=args.configs, seed=args.seed, report=print)
    return 1 if failures else 0


# -- tune --------------------------------------------------------------------------------------

def _cpu_tunable(specs, device, *, named: bool):
    """The families a CPU machine can tune for real (their CPU path is what the config controls)."""
    cpu_specs = [s for s in specs if s.tunes_on_cpu]
    others = [s.name for s in specs if not s.tunes_on_cpu]
    if named and others:
        raise DeviceMismatchError(f"no GPU on this machine ({device.describe()}): {', '.join(others)} run "
                                  "in the Triton interpreter here, whose timings are never recorded; "
                                  f"on a CPU only {', '.join(s.name for s in _families(None) if s.tunes_on_cpu)} "
                                  "can be tuned")
    if others:
        print(f"no GPU: tuning only the families with a real CPU path ({', '.join(s.name for s in cpu_specs)}); "
              f"{', '.join(others)} need a GPU")
    return cpu_specs


def _trial_runner(torch_device, trial_timeout: float):
    """How `tune` and `sweep` run trials: each in a worker process, so a config that crashes or hangs
    fails alone and the run goes on; collective families on local ranks."""
    from kernelhub.tuning.collective import LocalWorldRunner
    from kernelhub.tuning.isolation import IsolatedRunner

    return LocalWorldRunner(torch_device, IsolatedRunner(torch_device, trial_timeout=trial_timeout),
                            trial_timeout_s=trial_timeout)


def _compile_check(device, trial_timeout: float, wanted: bool):
    """What `tune` prunes with before a launch: the compiler for this GPU's target (`kernelhub.compiler`,
    in one compile process beside the trial worker), unless --no-compile-check; None without a target."""
    from kernelhub.tuning.tuner import compile_check_for

    if not wanted:
        return None
    check = compile_check_for(device, timeout=trial_timeout)
    if check is not None:
        print(f"compile check: every config is compiled for {check.target.arch} before it is launched; one that "
              "does not compile, exceeds its limits or spills registers is pruned (--no-compile-check: off)")
    elif device.is_gpu:
        print(f"no compile check: kernelhub.compiler has no target for {device.describe()}")
    return check


def _tune_shapes(spec, shape_set: str, world_size: int | None):
    """The shape set, with W replaced by `world_size` for collective families (duplicates dropped)."""
    shapes = spec.shapes(shape_set)
    if spec.world_size is None or world_size is None:
        return shapes
    return list(dict.fromkeys((world_size, *shape[1:]) for shape in shapes))


def cmd_tune(args) -> int:
    from kernelhub import configs
    from kernelhub.tuning.collective import cannot_run_here
    from kernelhub.tuning.tuner import Tuner, study_storage

    specs = _families(args.kernel)
    for spec in specs:
        spec.shapes(args.shapes)  # an unknown shape set is an error before anything starts
    for dtype in args.dtype or ():
        if not any(dtype in spec.dtypes for spec in specs):
            raise KernelhubError(f"--dtype {dtype}: none of {', '.join(s.name for s in specs)} has it "
                                 f"(they have {', '.join(sorted({d for s in specs for d in s.dtypes}))})")
    detected = _this_machine(args.gpu, "nothing was tuned or written")
    if not detected.is_gpu:
        specs = _cpu_tunable(specs, detected, named=bool(args.kernel))
    torch_device = detected.torch_device
    url = _db_url(args.db)
    with _open_store(url) as store:
        runner = _trial_runner(torch_device, args.trial_timeout)
        compile_check = None
        results = []
        try:
            compile_check = _compile_check(detected, args.trial_timeout, not args.no_compile_check)
            tuner = Tuner(store, study_storage(url), detected, seed=args.seed, runner=runner,
                          compile_check=compile_check)
            for spec in specs:
                # --dtype applies to the families that have it; one that no selected family has is an error.
                dtypes = [d for d in args.dtype if d in spec.dtypes] if args.dtype else spec.dtypes
                for shape in _tune_shapes(spec, args.shapes, args.world_size):
                    skip = cannot_run_here(spec, shape, torch_device)
                    if skip:
                        print(f"skip {spec.name} {spec.format_shape(shape)}: {skip}")
                        continue
                    for dtype in dtypes:
                        results.append(tuner.tune(spec, shape, dtype, n_trials=args.trials, timeout=args.timeout))
        finally:
            runner.close()
            if compile_check is not None:
                compile_check.close()
    configs.clear_cache()
    rows = [(r.family, r.bucket, r.dtype, r.trials, f"{r.best.median_ms:.4g}" if r.best else "-",
             f"{r.speedup:.2f}x" if r.speedup else "-") for r in results]
    print(_table(("kernel", "bucket", "dtype", "trials", "best ms", "vs default"), rows))
    print(f"stored in {store.where}")
    return 0


# -- show --------------------------------------------------------------------------------------

def cmd_show(args) -> int:
    """The user's database rows, then the shipped rows (`kernelhub.db.shipped`), each with its source
    and whether this machine would use it."""
    from kernelhub.configs import row_status
    from kernelhub.db.shipped import read_shipped, shipped_keys
    from kernelhub.device import current_device
    from kernelhub.kernels.loader import get_family

    if args.kernel:
        get_family(args.kernel)  # an unknown name is an error, not "nothing stored"
    current = current_device()
    listed = []  # (source, row, status)
    store = _existing_store(args.db)
    if store is not None:
        with store:
            listed += [("database", r, row_status(r, current, get_family))
                       for r in store.best_configs(gpu_key=args.gpu, family=args.kernel, include_invalid=True)]
    problems: list[str] = []
    for key in [args.gpu.lower()] if args.gpu else shipped_keys():
        listed += [("shipped", r, row_status(r, current, get_family))
                   for r in read_shipped(key, get_family, family=args.kernel, problems=problems)]
    for problem in problems:
        print(f"kernelhub show: {problem}", file=sys.stderr)
    if not listed:
        where = f" in {store.where}" if store is not None else ""
        print("no tuned configs stored" + (f" for {args.gpu}" if args.gpu else "") + where + " and none shipped")
        return 0
    used = {_row_key(r) for source, r, status in listed if source == "database" and status == "ok"}
    table = []
    for source, r, status in listed:
        if source == "shipped" and status == "ok" and _row_key(r) in used:
            status = "ok, the database's row is used"
        if r.invalid:  # its values cannot be trusted: the reason is all there is to show
            table.append((r.gpu_key, r.family, r.bucket, r.dtype, "-", "-", "-", "-", "-", source, status))
            continue
        speedup = f"{r.default_median_ms / r.median_ms:.2f}x" if r.default_median_ms else "-"
        throughput = f"{r.throughput:.3g} {r.throughput_unit}" if r.throughput else "-"
        config = " ".join(f"{k}={v}" for k, v in r.config.items())
        table.append((r.gpu_key, r.family, r.bucket, r.dtype, config, f"{r.median_ms:.4g}", throughput,
                      speedup, r.trials, source, status))
    print(_table(("gpu", "kernel", "shape bucket", "dtype", "config", "ms", "throughput", "vs default",
                  "trials", "source", "status"), table))
    return 0


def _row_key(row) -> tuple:
    return row.gpu_key, row.family, row.bucket, row.dtype, row.kernel_version


# -- prune -------------------------------------------------------------------------------------

def _confirm(question: str) -> bool:
    """Ask on stdin: only y or yes (any case) is a yes; no answer at all (end of input) is a no."""
    try:
        answer = input(question)
    except EOFError:
        print()
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_prune(args) -> int:
    """Delete the rows the runtime never uses: stale ones, and invalid ones (no kernelhub can use a row
    whose values break their columns' rules, whatever its family). Rows of families this install does
    not know are kept: their module may only be missing from KERNELHUB_FAMILIES in this shell, and
    what cannot be judged is never deleted."""
    from kernelhub.configs import UNKNOWN_KERNEL, row_status
    from kernelhub.device import current_device
    from kernelhub.kernels.loader import get_family

    if args.kernel:
        get_family(args.kernel)  # an unknown name is an error, not "nothing stale"
    current = current_device()
    store = _existing_store(args.db)
    if store is None:
        return 0
    with store:
        rows = store.best_configs(gpu_key=args.gpu, family=args.kernel, include_invalid=True)
        statuses = [(r, row_status(r, current, get_family)) for r in rows]
        stale = [(r, status) for r, status in statuses if status not in ("ok", UNKNOWN_KERNEL)]
        unknown = sum(status == UNKNOWN_KERNEL for _, status in statuses)
        if unknown:
            print(f"keeping {unknown} rows of kernels this install does not know (see KERNELHUB_FAMILIES)")
        if not stale:
            print(f"no stale or invalid rows in {store.where}")
            return 0
        print(_table(("gpu", "kernel", "shape bucket", "dtype", "status"),
                     [(r.gpu_key, r.family, r.bucket, r.dtype, status) for r, status in stale]))
        if not args.yes and not _confirm(f"remove these {len(stale)} rows from {store.where}? [y/N] "):
            print("nothing removed")
            return 0
        removed = store.delete_best(row for row, _ in stale)
    changed = len(stale) - removed
    print(f"removed {removed} stale or invalid rows"
          + (f"; {changed} changed since listed and were kept" if changed else ""))
    return 0


# -- export / import ---------------------------------------------------------------------------

def cmd_export(args) -> int:
    """All stored configs (or one GPU's); with --ship, one GPU's current ones as its shipped file."""
    from kernelhub.db import export_configs, write_export_file
    from kernelhub.db.exchange import format_export
    from kernelhub.db.store import database_files
    from kernelhub.kernels.loader import get_family

    url = _db_url(args.db)
    skipped: list[str] = []
    with _open_store(url, create=False) as store:
        gpu = _ship_key(store, args.gpu) if args.ship else args.gpu
        doc = export_configs(store, get_family=get_family, gpu_key=gpu, skipped=skipped)
    output = args.output
    if args.ship:
        doc, stale = _current_entries(doc, get_family)
        if stale:
            print(f"kernelhub export: left out {stale} rows of older kernel versions (never used: stale)",
                  file=sys.stderr)
        output = output or _shipped_output(gpu)
    if output in (None, "-"):
        sys.stdout.write(format_export(doc))
    else:
        write_export_file(doc, output, force=args.force, protected=database_files(url))
        what = f"shipped configs of {gpu}" if args.ship else "configs"
        print(f"exported {len(doc['entries'])} {what} to {output}", file=sys.stderr)
    if skipped:
        print(f"kernelhub export: skipped {len(skipped)} rows that an import would refuse (`kernelhub show` marks "
              f"them; first: {skipped[0]})", file=sys.stderr)
    return 0


def _ship_key(store, gpu: str | None) -> str:
    """The GPU key `export --ship` writes: `--gpu`'s, else the only one the database holds."""
    if gpu is not None:
        return gpu.lower()
    keys = sorted({row.gpu_key for row in store.best_configs()})
    if len(keys) != 1:
        raise KernelhubError(f"--ship writes one GPU's configs and {store.where} holds "
                             f"{'none' if not keys else ', '.join(keys)}: name one with --gpu")
    return keys[0]


def _current_entries(doc: dict, get_family) -> tuple[dict, int]:
    """`doc` with only the entries of the installed kernel versions, and how many it left out."""
    current = [e for e in doc["entries"] if e["kernel_version"] == get_family(e["family"]).kernel_version]
    return {**doc, "entries": current}, len(doc["entries"]) - len(current)


def _shipped_output(gpu: str) -> str:
    from kernelhub.db.shipped import SHIPPED_DIR_ENV, shipped_file

    path = shipped_file(gpu)
    if path is None:
        raise KernelhubError(f"--ship: {SHIPPED_DIR_ENV} is empty (shipped configs turned off): give -o FILE")
    return str(path)


def cmd_import(args) -> int:
    from kernelhub import configs
    from kernelhub.db import load_export_file, parse_export
    from kernelhub.db.store import database_where
    from kernelhub.kernels.loader import get_family

    url = _db_url(args.db)
    # The whole document is checked before the database is opened: a refused import creates nothing.
    entries = parse_export(load_export_file(args.file), into=database_where(url), get_family=get_family)
    with _open_store(url) as store:
        store.save_many(entries)
    configs.clear_cache()
    print(f"imported {len(entries)} configs into {store.where}")
    return 0


# -- report ------------------------------------------------------------------------------------

def cmd_report(args) -> int:
    from kernelhub.device import current_device
    from kernelhub.tuning.report import write_report

    store = _existing_store(args.db)
    if store is None:
        return 0
    with store:
        report = write_report(store, args.output, device=current_device(), gpu_key=args.gpu, family=args.kernel)
    if report is None:
        scope = "".join(f" {word} {value}" for word, value in (("for", args.gpu), ("of", args.kernel)) if value)
        print(f"nothing to report: no tuned configs or trials{scope} in {store.where}")
        return 0
    print(f"wrote {len(report.plots)} plots and {report.summary}"
          + (f" ({len(report.skipped)} rows or studies skipped: see the summary)" if report.skipped else ""))
    return 0


# -- compile -----------------------------------------------------------------------------------

def _compile_rows(records: list[dict]) -> list[tuple]:
    """One table row per distinct (kernel, target, dtype, role, config, result): shapes that compile
    alike share a row."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        figures = [r[k] for k in ("kernel", "function", "target", "dtype", "role", "ok", "error", "shared_bytes",
                                  "registers", "spills", "mma", "occupancy", "occupancy_limiter")]
        groups.setdefault(json.dumps([figures, r["config"]], sort_keys=True), []).append(r)
    rows = []
    for group in groups.values():
        r = group[0]
        config = " ".join(f"{k}={v}" for k, v in r["config"].items())
        shapes = r["shape"] if len(group) == 1 else f"{len(group)} shapes"
        result = "ok" if r["ok"] else f"FAIL: {r['error']}"
        rows.append((r["kernel"], r["function"] or "-", r["target"], r["dtype"], r["role"], config, shapes,
                     "-" if r["shared_bytes"] is None else f"{r['shared_bytes'] / 1024:.1f}",
                     r["registers"] if r["registers"] is not None else "-",
                     r["spills"] if r["spills"] is not None else "-", r["mma"] or "-",
                     "-" if r["occupancy"] is None else f"{r['occupancy']} ({r['occupancy_limiter']})", result))
    return rows


def cmd_compile(args) -> int:
    import time

    from kernelhub.compiler import compile_jobs, plan, problems
    from kernelhub.compiler.targets import DEFAULT_TARGETS
    from kernelhub.files import write_text

    config = None
    if args.config is not None:
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as exc:
            raise KernelhubError(f"--config: not JSON ({exc})") from None
    jobs = plan(args.kernel, args.target or DEFAULT_TARGETS, shape_set=args.shapes, samples=args.configs,
                config=config, dtypes=args.dtype, seed=args.seed)
    started = time.perf_counter()
    records = compile_jobs(jobs, workers=args.jobs, use_cache=not args.no_cache,
                           progress=lambda line: print(line, file=sys.stderr))
    print(_table(("kernel", "function", "target", "dtype", "role", "config", "shapes", "smem KiB", "regs", "spills",
                  "mma", "warps/SM", "result"), _compile_rows(records)))
    if args.json:
        import triton

        doc = {"triton_version": triton.__version__, "records": records}
        write_text(json.dumps(doc, indent=1) + "\n", args.json, force=True)
    found = problems(records)
    cached = sum(bool(r["cached"]) for r in records)
    print(f"{len(records)} kernels compiled for {', '.join(dict.fromkeys(r['target'] for r in records))} in "
          f"{time.perf_counter() - started:.1f} s ({cached} from the cache)" + (f"; wrote {args.json}" if args.json else ""))
    for r, why in found:
        print(f"kernelhub compile: {r['kernel']} {r['function'] or ''} {r['target']} {r['shape']} {r['dtype']}: {why}",
              file=sys.stderr)
    return 1 if found else 0


# -- sweep / replay ----------------------------------------------------------------------------

def cmd_sweep(args) -> int:
    from kernelhub.kernels.loader import get_family
    from kernelhub.tuning.sweep import default_output, run_sweep

    spec = get_family(args.kernel)
    spec.shapes(args.shapes)  # an unknown shape set is an error before anything starts
    dtype = args.dtype or spec.dtypes[0]
    if dtype not in spec.dtypes:
        raise KernelhubError(f"--dtype {dtype}: {spec.name} has {', '.join(spec.dtypes)}")
    detected = _this_machine(args.gpu, "nothing was swept")
    output = args.output or default_output(detected.key, spec.name, args.shapes, dtype)
    runner = _trial_runner(detected.torch_device, args.trial_timeout)
    try:
        doc = run_sweep(spec, args.shapes, dtype, detected, output, runner=runner, seed=args.seed)
    finally:
        runner.close()
    rows = []
    for entry in doc["shapes"]:
        timed = {json.dumps(c["config"]): c["median_ms"] for c in entry["configs"] if c["state"] == "complete"}
        default_ms = timed.get(json.dumps(entry["default"]))
        best = min(timed.values(), default=None)
        rows.append((entry["shape"], len(entry["configs"]), len(entry["configs"]) - len(timed),
                     f"{best:.4g}" if best else "-", f"{default_ms:.4g}" if default_ms else "-"))
    print(_table(("shape", "configs", "failed", "best ms", "DEFAULT ms"), rows))
    print(f"wrote {output}; compare samplers on it with `kernelhub replay {output}`")
    return 0


def cmd_replay(args) -> int:
    from kernelhub.tuning.replay import format_report, replay_sweep, sampler_names, version_note
    from kernelhub.tuning.sweep import load_sweep

    samplers = sampler_names(args.samplers)
    doc = load_sweep(args.sweep)
    note = version_note(doc)
    if note:
        print(f"kernelhub replay: warning: {note}", file=sys.stderr)
    report = replay_sweep(doc, samplers=samplers, seeds=args.seeds, budget=args.budget,
                          progress=lambda line: print(line, file=sys.stderr))
    print(format_report(report))
    return 0


# -- entry point -------------------------------------------------------------------------------

def _shown(text: str) -> str:
    from kernelhub.db.fields import brief  # only on the error path: parsing arguments stays quick

    return brief(text)


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from `minimum` (to `maximum`), else argparse's usage error."""
    bounds = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {_shown(text)}")
        return value

    return parse


def _seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {_shown(text)}")
    return value


def _name(text: str) -> str:
    """An argparse type: a non-empty name (a GPU key, a family, a shape set, a dtype)."""
    if not text.strip() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"expected a name, got {_shown(text)}")
    return text


def _add_trial_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trial-timeout", type=_seconds, default=120.0,
                   help="seconds one config's trial may take; then its worker process is killed and the trial "
                        "recorded as a timeout (default 120)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelhub", description="Triton kernels for LLM inference, tuned per GPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    db_help = "config database (SQLAlchemy URL; default: KERNELHUB_DB or a SQLite file in the user cache)"

    sub.add_parser("gpus", help="print the device identity and its key").set_defaults(func=cmd_gpus)

    p = sub.add_parser("check", help="every family's Triton kernels against their references")
    p.add_argument("--kernel", action="append", type=_name, help="family name (repeatable; default: all)")
    p.add_argument("--configs", type=_integer(0), default=CHECK_SAMPLES,
                   help="sampled configs per shape besides the DEFAULTs")
    p.add_argument("--seed", type=_integer(0, MAX_SEED), default=0)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("compile", help="compile every Triton kernel for real GPU targets (no GPU needed) and "
                                       "check it against the compiler: registers, spills, shared memory")
    p.add_argument("--kernel", action="append", type=_name,
                   help="a family or fixed kernel (repeatable; default: all)")
    p.add_argument("--target", action="append", type=_name,
                   help="sm_80, sm_86, sm_89, sm_90, sm_100, gfx942 or a GPU key such as h100 (repeatable; "
                        "default: sm_80 and sm_90)")
    p.add_argument("--shapes", default="tune", type=_name, help="shape set: smoke, tune or bench (default: tune)")
    p.add_argument("--configs", type=_integer(0), default=2,
                   help="sampled feasible configs per shape besides the DEFAULT (default 2)")
    p.add_argument("--config", help="exactly this config (JSON; with one --kernel), instead of the DEFAULT and samples")
    p.add_argument("--dtype", action="append", type=_name, help="only this dtype (repeatable)")
    p.add_argument("--json", help="also write every record to this JSON file")
    p.add_argument("--jobs", type=_integer(1), default=None, help="compiler processes (default: one per CPU core)")
    p.add_argument("--no-cache", action="store_true", help="compile again instead of reading earlier results")
    p.add_argument("--seed", type=_integer(0, MAX_SEED), default=0)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("tune", help="find the fastest correct config per shape and store it")
    p.add_argument("--gpu", type=_name, help="GPU key to tune for; must be this machine's (default: detected)")
    p.add_argument("--kernel", action="append", type=_name, help="family name (repeatable; default: all)")
    p.add_argument("--shapes", type=_name, default="tune", help="shape set: smoke, tune or bench (default: tune)")
    p.add_argument("--dtype", action="append", type=_name,
                   help="dtype (repeatable; each family tunes those it has; default: all of each family's)")
    p.add_argument("--trials", type=_integer(1), default=50,
                   help="distinct configs tried per study, counting earlier runs; a space with fewer is tried "
                        "whole (default 50)")
    p.add_argument("--world-size", type=_integer(1), default=None,
                   help="ranks for collective families (local processes; default: each shape's own W, 2 in "
                        "the shape sets)")
    p.add_argument("--timeout", type=_seconds, default=None, help="seconds per study")
    _add_trial_timeout(p)
    p.add_argument("--no-compile-check", action="store_true",
                   help="on a GPU, launch every config the constraints accept instead of first compiling it for "
                        "this GPU and pruning those that do not compile, exceed its limits or spill registers")
    p.add_argument("--seed", type=_integer(0, MAX_SEED), default=0)
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("show", help="table of stored configs")
    p.add_argument("--gpu", type=_name, help="only this GPU key")
    p.add_argument("--kernel", type=_name, help="only this family")
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("export", help="write stored configs as versioned JSON")
    p.add_argument("--gpu", type=_name, help="only this GPU key")
    p.add_argument("--ship", action="store_true",
                   help="write one GPU's configs of the installed kernel versions as its shipped file, read "
                        "after the user's database (default file: the package's db/shipped/<gpu>.json)")
    p.add_argument("-o", "--output", help="file (default: stdout); written whole or not at all")
    p.add_argument("--force", action="store_true",
                   help="replace the file if it exists (never one of the database's own files)")
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="read configs exported by `kernelhub export` (validated, all or nothing)")
    p.add_argument("file")
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("prune", help="delete stale rows (the ones `show` marks), after asking")
    p.add_argument("--gpu", type=_name, help="only this GPU key")
    p.add_argument("--kernel", type=_name, help="only this family")
    p.add_argument("--yes", action="store_true", help="do not ask")
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("report", help="PNG plots (tuning history, speedup, roofline) and a Markdown summary")
    p.add_argument("--gpu", type=_name, help="only this GPU key")
    p.add_argument("--kernel", type=_name, help="only this family")
    p.add_argument("-o", "--output", default="kernelhub-report", help="folder to write into (default: kernelhub-report)")
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sweep", help="measure every feasible config at each shape of a set into a JSON file")
    p.add_argument("--gpu", required=True, type=_name, help="this machine's device key (`kernelhub gpus`)")
    p.add_argument("--kernel", required=True, type=_name, help="family name")
    p.add_argument("--shapes", required=True, type=_name, help="shape set: smoke, tune or bench")
    p.add_argument("--dtype", type=_name, help="dtype (default: the family's first)")
    p.add_argument("-o", "--output", help="sweep file; an unfinished sweep in it is resumed "
                                          "(default: sweep-GPU-KERNEL-SHAPES-DTYPE.json)")
    _add_trial_timeout(p)
    p.add_argument("--seed", type=_integer(0, MAX_SEED), default=0)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("replay", help="compare samplers on a recorded sweep, no GPU needed (Markdown table)")
    p.add_argument("sweep", help="a file written by `kernelhub sweep`")
    p.add_argument("--seeds", type=_integer(1), default=5, help="seeds per sampler (default 5)")
    p.add_argument("--samplers", nargs="+", metavar="NAME",
                   help="tuner, tpe-independent, tpe-multivariate, random, grid, qmc, cmaes (default: all)")
    p.add_argument("--budget", type=_integer(1), default=50,
                   help="also report the best after this many trials (default 50, `kernelhub tune`'s default)")
    p.set_defaults(func=cmd_replay)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _stdout_is_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (the BrokenPipeError was about it, not another pipe)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll, or a stdout without a file (tests)
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # output into a closed pipe fails here, in the handler below, not at exit
        return code
    except KernelhubError as exc:
        print(f"kernelhub {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resumable = args.command in ("tune", "sweep")
        print(f"kernelhub {args.command}: interrupted" + ("; run it again to resume" if resumable else ""),
              file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        if not _stdout_is_closed():
            return _unexpected(args.command, exc)
        # The reader stopped reading (`| head`): end quietly. Python flushes stdout again at exit,
        # so point it at devnull, or that flush fails too (docs.python.org/3/library/signal.html#note-on-sigpipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001  (the last resort: still one line, never a traceback)
        return _unexpected(args.command, exc)


def _unexpected(command: str, exc: Exception) -> int:
    print(f"kernelhub {command}: error: {type(exc).__name__}: {_one_line(exc)} (unexpected: this is a kernelhub "
          "bug, please report it with the command that caused it)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
