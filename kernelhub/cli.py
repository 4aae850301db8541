"""The `kernelhub` command line: gpus, check, tune, show, export, import.

Errors are one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kernelhub.errors import DeviceMismatchError, KernelhubError

CHECK_SAMPLES = 3  # sampled configs per shape, on top of every DEFAULT


def _families(names: Sequence[str] | None):
    from kernelhub.registry import families, get_family

    return [get_family(n) for n in names] if names else families()


def _open_store(url: str | None, *, create: bool = True):
    from kernelhub.db import ConfigStore, default_url

    return ConfigStore(url or default_url(), create=create)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
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
    import torch

    from kernelhub.checking import check_config
    from kernelhub.device import current_device

    device = current_device()
    torch_device = torch.device("cuda" if device.is_gpu else "cpu")
    where = "on the GPU" if device.is_gpu else "in the Triton interpreter (no GPU)"
    if not device.is_gpu:
        from kernelhub.kernels import interpreter_problem

        problem = interpreter_problem()
        if problem:
            raise KernelhubError(problem)
    print(f"kernelhub check {where}: {device.describe()}")
    failures = 0
    for spec in _families(args.kernel):
        runs = family_failures = 0
        for shape in spec.shapes("smoke"):
            sampled = spec.space.sample(args.configs, shape, device.shared_memory_bytes, seed=args.seed)
            configs = list(spec.defaults) + [c for c in sampled if c not in spec.defaults]
            for dtype in spec.dtypes:
                for i, config in enumerate(configs):
                    outcome = check_config(spec, shape, dtype, config, device=torch_device, seed=args.seed + i)
                    runs += 1
                    if not outcome.ok:
                        family_failures += 1
                        print(f"  FAIL {spec.name} {spec.format_shape(shape)} {dtype} {config}: {outcome.problem}")
        print(f"{spec.name}: {runs} runs against the reference, "
              f"{f'{family_failures} mismatches' if family_failures else 'all match'}")
        failures += family_failures
    return 1 if failures else 0


# -- tune --------------------------------------------------------------------------------------

def cmd_tune(args) -> int:
    from kernelhub import configs
    from kernelhub.db import default_url
    from kernelhub.device import current_device
    from kernelhub.tuning.tuner import Tuner, study_storage

    specs = _families(args.kernel)
    for spec in specs:
        spec.shapes(args.shapes)  # an unknown shape set is an error before anything starts
    for dtype in args.dtype or ():
        if not any(dtype in spec.dtypes for spec in specs):
            raise KernelhubError(f"--dtype {dtype}: none of {', '.join(s.name for s in specs)} has it "
                                 f"(they have {', '.join(sorted({d for s in specs for d in s.dtypes}))})")
    detected = current_device()
    gpu = (args.gpu or detected.key).lower()
    if gpu != detected.key:
        raise DeviceMismatchError(f"--gpu {gpu} does not match this machine's device, {detected.describe()}; "
                                  "nothing was tuned or written")
    if not detected.is_gpu:
        raise DeviceMismatchError(f"no GPU on this machine ({detected.describe()}): tuning times real kernels, "
                                  "and Triton interpreter timings are never recorded")
    url = args.db or default_url()
    with _open_store(url) as store:
        tuner = Tuner(store, study_storage(url), detected, seed=args.seed)
        results = []
        for spec in specs:
            # --dtype applies to the families that have it; one that no selected family has is an error.
            dtypes = [d for d in args.dtype if d in spec.dtypes] if args.dtype else spec.dtypes
            for shape in spec.shapes(args.shapes):
                for dtype in dtypes:
                    results.append(tuner.tune(spec, shape, dtype, n_trials=args.trials, timeout=args.timeout))
    configs.clear_cache()
    rows = [(r.family, r.bucket, r.dtype, r.trials, f"{r.best.median_ms:.4g}" if r.best else "-",
             f"{r.speedup:.2f}x" if r.speedup else "-") for r in results]
    print(_table(("kernel", "bucket", "dtype", "trials", "best ms", "vs default"), rows))
    print(f"stored in {url}")
    return 0


# -- show --------------------------------------------------------------------------------------

def _missing_database(url: str | None) -> str | None:
    """A message if `url` is a SQLite file that does not exist yet (reading never creates one)."""
    from kernelhub.db import default_url
    from kernelhub.db.store import sqlite_path

    url = url or default_url()
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return f"no config database yet at {path} (`kernelhub tune` or `kernelhub import` creates it)"
    return None


def _status(row, current) -> str:
    """'ok', or 'stale: <why>' when the runtime would not use this row on the current device."""
    from kernelhub.configs import stale_reason
    from kernelhub.registry import get_family

    try:
        spec = get_family(row.family)
    except KernelhubError:
        return "stale: unknown kernel"
    if row.gpu_key != current.key:  # another GPU's row: only the kernel version can be judged here
        return "stale: kernel changed" if row.kernel_version != spec.kernel_version else "ok"
    reason = stale_reason(row, spec, current)
    return f"stale: {reason}" if reason else "ok"


def cmd_show(args) -> int:
    from kernelhub.device import current_device

    missing = _missing_database(args.db)
    if missing:
        print(missing)
        return 0
    current = current_device()
    with _open_store(args.db, create=False) as store:
        rows = store.best_configs(gpu_key=args.gpu, family=args.kernel)
    if not rows:
        print("no tuned configs stored" + (f" for {args.gpu}" if args.gpu else "") + f" in {store.url}")
        return 0
    table = []
    for r in rows:
        speedup = f"{r.default_median_ms / r.median_ms:.2f}x" if r.default_median_ms else "-"
        throughput = f"{r.throughput:.3g} {r.throughput_unit}" if r.throughput else "-"
        config = " ".join(f"{k}={v}" for k, v in r.config.items())
        table.append((r.gpu_key, r.family, r.bucket, r.dtype, config, f"{r.median_ms:.4g}", throughput,
                      speedup, r.trials, _status(r, current)))
    print(_table(("gpu", "kernel", "shape bucket", "dtype", "config", "ms", "throughput", "vs default",
                  "trials", "status"), table))
    return 0


# -- export / import ---------------------------------------------------------------------------

def cmd_export(args) -> int:
    from kernelhub.db import export_configs

    with _open_store(args.db, create=False) as store:
        doc = export_configs(store, gpu_key=args.gpu)
    text = json.dumps(doc, indent=2, sort_keys=True)
    if args.output in (None, "-"):
        print(text)
    else:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        print(f"exported {len(doc['entries'])} configs to {args.output}", file=sys.stderr)
    return 0


def cmd_import(args) -> int:
    from kernelhub import configs
    from kernelhub.db import import_configs
    from kernelhub.db.exchange import load_export_file

    doc = load_export_file(args.file)
    with _open_store(args.db) as store:
        count = import_configs(store, doc)
        url = store.url
    configs.clear_cache()
    print(f"imported {count} configs into {url}")
    return 0


# -- entry point -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelhub", description="Triton kernels for LLM inference, tuned per GPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    db_help = "config database (SQLAlchemy URL; default: KERNELHUB_DB or a SQLite file in the user cache)"

    sub.add_parser("gpus", help="print the device identity and its key").set_defaults(func=cmd_gpus)

    p = sub.add_parser("check", help="every family's Triton kernels against their references")
    p.add_argument("--kernel", action="append", help="family name (repeatable; default: all)")
    p.add_argument("--configs", type=int, default=CHECK_SAMPLES, help="sampled configs per shape besides the DEFAULTs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("tune", help="find the fastest correct config per shape and store it")
    p.add_argument("--gpu", help="GPU key to tune for; must be this machine's (default: detected)")
    p.add_argument("--kernel", action="append", help="family name (repeatable; default: all)")
    p.add_argument("--shapes", default="tune", help="shape set: smoke, tune or bench (default: tune)")
    p.add_argument("--dtype", action="append",
                   help="dtype (repeatable; each family tunes those it has; default: all of each family's)")
    p.add_argument("--trials", type=int, default=50, help="trials per study, counting earlier runs (default 50)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per study")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("show", help="table of stored configs")
    p.add_argument("--gpu", help="only this GPU key")
    p.add_argument("--kernel", help="only this family")
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("export", help="write stored configs as versioned JSON")
    p.add_argument("--gpu", help="only this GPU key")
    p.add_argument("-o", "--output", help="file (default: stdout)")
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="read configs exported by `kernelhub export` (validated, all or nothing)")
    p.add_argument("file")
    p.add_argument("--db", help=db_help)
    p.set_defaults(func=cmd_import)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KernelhubError as exc:
        print(f"kernelhub {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kernelhub {args.command}: interrupted" + ("; run it again to resume" if args.command == "tune" else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
