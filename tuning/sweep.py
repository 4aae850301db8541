"""Exhaustive sweeps: every feasible config of a family, measured at each shape of a shape set.

The tuner samples a search space; a sweep measures all of it, once, on one device. The result is
a versioned JSON file that can be committed, and that `kernelhub replay` (tuning/replay.py) reads
to compare search strategies with no GPU: each replayed trial's time is the recorded one.

Which configs a shape's sweep holds: every config the space's constraints accept on this device,
plus every DEFAULT (a DEFAULT runs untuned on any shape, so it is always measured, as the tuner
does). A DEFAULT the constraints reject keeps the reason under "infeasible"; the tuner prunes it
unless it is that shape's own DEFAULT. Each config goes through a runner (tuning/trial.py), so it
is checked against the reference before it is timed; a config that fails is recorded with the
runner's state (`FAILURE_STATES`: mismatch, error, crash, timeout) and reason, and has no time.

File layout (`SWEEP_FORMAT`, version `SWEEP_VERSION`):

    {"format": "kernelhub-sweep", "version": 1, "kernelhub_version": "...", "created_at": "...",
     "device": {DeviceIdentity fields}, "family": "int8_gemm", "kernel_version": "...",
     "dtype": "bfloat16", "shape_set": "tune", "space": {"BLOCK_M": [16, 32, ...], ...},
     "note": "free text, e.g. how a synthetic sweep was made" (optional),
     "shapes": [{"shape": "M=16,N=4096,K=4096", "default": {...config...},
                 "configs": [{"config": {...}, "state": "complete", "median_ms": .., "p20_ms": .., "p80_ms": ..},
                             {"config": {...}, "state": "mismatch", "reason": "..."}, ...]}]}

A sweep is written after every shape, so an interrupted sweep keeps the shapes it finished, and
running the same sweep again into the same file measures only the shapes still missing. Sweeps
are not written to the config database: `kernelhub tune` stores best configs; a sweep is a
measurement for studying the search.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import kernelhub
from kernelhub.device import DeviceIdentity
from kernelhub.errors import KernelhubError
from kernelhub.registry import FamilySpec, Shape
from kernelhub.space import Config, SearchSpace
from kernelhub.tuning.trial import FAILURE_STATES, InProcessRunner, TrialRunner

SWEEP_FORMAT = "kernelhub-sweep"
SWEEP_VERSION = 1
STATES = ("complete", *FAILURE_STATES)
PROGRESS_EVERY = 100  # configs between progress lines


def default_output(device_key: str, family: str, shape_set: str, dtype: str) -> Path:
    return Path(f"sweep-{device_key}-{family}-{shape_set}-{dtype}.json")


def check_sweepable(spec: FamilySpec, device: DeviceIdentity) -> None:
    """The tuner's rule (`Tuner.check_tunable`): without a GPU, only `tunes_on_cpu` families."""
    from kernelhub.tuning.tuner import Tuner

    Tuner(store=None, storage=None, device=device).check_tunable(spec)


def configs_to_sweep(spec: FamilySpec, shape: Shape, dtype: str, smem_bytes: int) -> list[tuple[Config, str | None]]:
    """Every feasible config in the space's order, then each DEFAULT not among them with the reason it is infeasible."""
    feasible = spec.space.feasible(shape, smem_bytes)
    defaults = [spec.default_config(shape, dtype), *spec.defaults]
    extra = [dict(d) for i, d in enumerate(defaults) if d not in feasible and d not in defaults[:i]]
    return [(c, None) for c in feasible] + [(d, spec.space.infeasibility(d, shape, smem_bytes)) for d in extra]


def sweep_shape(spec: FamilySpec, shape: Shape, dtype: str, device: DeviceIdentity, runner: TrialRunner, *,
                seed: int = 0, progress: Callable[[str], None] = print) -> dict:
    """Measure every config of `configs_to_sweep` at `shape`; the file's entry for that shape."""
    shape_text = spec.format_shape(shape)
    todo = configs_to_sweep(spec, shape, dtype, device.shared_memory_bytes)
    entries, started = [], time.monotonic()
    for index, (config, infeasible) in enumerate(todo, 1):
        trial_seed = zlib.crc32(f"{seed}/{spec.name}/{shape_text}/{dtype}/{index}".encode())  # fresh inputs each
        outcome = runner.run(spec, shape, dtype, config, trial_seed)
        entry: dict = {"config": config, "state": outcome.state}
        if outcome.state == "complete":
            entry.update(median_ms=outcome.timing.median_ms, p20_ms=outcome.timing.p20_ms,
                         p80_ms=outcome.timing.p80_ms)
        else:
            entry["reason"] = outcome.reason
        if infeasible:
            entry["infeasible"] = infeasible
        entries.append(entry)
        if index % PROGRESS_EVERY == 0 or index == len(todo):
            progress(f"[{device.key} {spec.name} {shape_text} {dtype}] {index}/{len(todo)} configs "
                     f"[{time.monotonic() - started:.0f}s]")
    return {"shape": shape_text, "default": spec.default_config(shape, dtype), "configs": entries}


def run_sweep(spec: FamilySpec, shape_set: str, dtype: str, device: DeviceIdentity, output: str | os.PathLike, *,
              runner: TrialRunner | None = None, seed: int = 0, note: str | None = None,
              progress: Callable[[str], None] = print) -> dict:
    """Sweep `spec` at every shape of `shape_set` into the file `output`; returns the document.

    The file is rewritten (atomically) after each shape. If `output` already holds this same
    sweep (family, kernel version, device key, dtype, shape set), its shapes are kept and only the
    missing ones are measured; a file holding anything else is refused, never overwritten.
    """
    check_sweepable(spec, device)
    shapes = spec.shapes(shape_set)
    if dtype not in spec.dtypes:
        raise KernelhubError(f"dtype {dtype!r} is not one of {spec.name}'s: {', '.join(spec.dtypes)}")
    output = Path(output)
    doc = {
        "format": SWEEP_FORMAT, "version": SWEEP_VERSION, "kernelhub_version": kernelhub.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(), "device": device.to_dict(), "family": spec.name,
        "kernel_version": spec.kernel_version, "dtype": dtype, "shape_set": shape_set,
        "space": {name: list(choices) for name, choices in spec.space.params.items()},
        **({"note": note} if note else {}), "shapes": [],
    }
    if output.exists():
        doc["shapes"] = _resumable_shapes(output, doc)
    done = {entry["shape"] for entry in doc["shapes"]}
    own_runner = runner is None
    runner = runner or InProcessRunner(device.torch_device)
    try:
        for shape in shapes:
            if spec.format_shape(shape) in done:
                progress(f"[{device.key} {spec.name} {spec.format_shape(shape)} {dtype}] already in {output}")
                continue
            doc["shapes"].append(sweep_shape(spec, shape, dtype, device, runner, seed=seed, progress=progress))
            write_sweep(output, doc)
    finally:
        if own_runner:
            runner.close()
    return doc


def _resumable_shapes(output: Path, new: dict) -> list[dict]:
    """The finished shapes of the sweep already in `output`, if it is the same sweep as `new`."""
    old = load_sweep(output)
    same = ("family", "kernel_version", "dtype", "shape_set", "space")
    differ = [k for k in same if old[k] != new[k]]
    if old["device"].get("key") != new["device"]["key"]:
        differ.insert(0, "device")
    if differ:
        raise KernelhubError(f"{output} already holds another sweep (its {', '.join(differ)} differ); "
                             "nothing was overwritten: pass another -o or move that file")
    return old["shapes"]


def write_sweep(path: str | os.PathLike, doc: dict) -> None:
    """Write `doc` atomically (a reader sees the old file or the new one), one config per line."""
    path = Path(path)
    head = {k: v for k, v in doc.items() if k != "shapes"}
    lines = [json.dumps(head, indent=1)[:-2] + ',\n "shapes": [']
    for i, shape in enumerate(doc["shapes"]):
        entries = ",\n".join("   " + json.dumps(e) for e in shape["configs"])
        tail = "," if i + 1 < len(doc["shapes"]) else ""
        lines.append(f'  {{"shape": {json.dumps(shape["shape"])}, "default": {json.dumps(shape["default"])}, '
                     f'"configs": [\n{entries}\n  ]}}{tail}')
    lines.append(" ]\n}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines), encoding="utf-8")
    os.replace(partial, path)


# -- reading ---------------------------------------------------------------------------------

class SweepFileError(KernelhubError):
    """A sweep file that cannot be read, or is not a valid sweep; the message says where."""


def load_sweep(path: str | os.PathLike) -> dict:
    """Read and validate a sweep file; SweepFileError naming the file and the first bad field."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SweepFileError(f"cannot read sweep file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SweepFileError(f"sweep file {path} is not valid JSON ({exc})") from None
    try:
        validate_sweep(doc)
    except ValueError as exc:
        raise SweepFileError(f"sweep file {path}: {exc}") from None
    return doc


def validate_sweep(doc) -> None:
    """Raise ValueError naming the first thing that makes `doc` not a sweep this kernelhub reads."""
    if not isinstance(doc, dict) or doc.get("format") != SWEEP_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"not a {SWEEP_FORMAT} document (format is {found!r})")
    version = doc.get("version")
    if version != SWEEP_VERSION:
        newer = isinstance(version, int) and version > SWEEP_VERSION
        raise ValueError(f"sweep format version {version!r}, this kernelhub reads {SWEEP_VERSION}"
                         + ("; upgrade kernelhub" if newer else ""))
    for name, kind in (("family", str), ("kernel_version", str), ("dtype", str), ("shape_set", str),
                       ("device", dict), ("space", dict), ("shapes", list)):
        if not isinstance(doc.get(name), kind):
            raise ValueError(f"field {name!r} is missing or not a {kind.__name__}")
    if not isinstance(doc["device"].get("key"), str):
        raise ValueError("field 'device' has no 'key' string")
    space = _space_of(doc["space"])
    if not doc["shapes"]:
        raise ValueError("field 'shapes' is empty")
    seen_shapes = set()
    for i, entry in enumerate(doc["shapes"]):
        where = f"shapes[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), str):
            raise ValueError(f"{where}: expected an object with a 'shape' string")
        if entry["shape"] in seen_shapes:
            raise ValueError(f"{where}: shape {entry['shape']} appears twice")
        seen_shapes.add(entry["shape"])
        _validate_shape_entry(entry, space, where)


def _space_of(params) -> SearchSpace:
    if not params or not all(isinstance(v, list) and v and all(_is_int(x) for x in v) for v in params.values()):
        raise ValueError("field 'space' must map each tunable to a non-empty list of integers")
    return SearchSpace(params=params)


def _validate_shape_entry(entry: dict, space: SearchSpace, where: str) -> None:
    try:
        default = space.validate(entry.get("default"), source=f"{where}.default")
    except KernelhubError as exc:
        raise ValueError(str(exc)) from None
    configs = entry.get("configs")
    if not isinstance(configs, list) or not configs:
        raise ValueError(f"{where}: 'configs' is missing or empty")
    seen = set()
    for j, item in enumerate(configs):
        at = f"{where}.configs[{j}]"
        if not isinstance(item, dict):
            raise ValueError(f"{at}: expected an object")
        try:
            key = tuple(space.validate(item.get("config"), source=f"{at}.config").values())
        except KernelhubError as exc:
            raise ValueError(str(exc)) from None
        if key in seen:
            raise ValueError(f"{at}: config {item['config']} appears twice")
        seen.add(key)
        if item.get("state") not in STATES:
            raise ValueError(f"{at}: state is {item.get('state')!r}, expected one of {list(STATES)}")
        if item["state"] == "complete":
            for name in ("median_ms", "p20_ms", "p80_ms"):
                value = item.get(name)
                if not (_is_number(value) and math.isfinite(value) and value > 0):
                    raise ValueError(f"{at}: {name} is {value!r}, expected a positive number")
        elif not isinstance(item.get("reason"), str):
            raise ValueError(f"{at}: a config in state {item['state']!r} needs a 'reason' string")
        if "infeasible" in item and not isinstance(item["infeasible"], str):
            raise ValueError(f"{at}: 'infeasible' must be a string (the constraint's reason)")
    if tuple(default.values()) not in seen:
        raise ValueError(f"{where}: the DEFAULT {default} was not measured")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_key(config: Mapping[str, int], params: Mapping) -> tuple[int, ...]:
    """A config as a tuple in the space's parameter order (how a sweep's configs are looked up)."""
    return tuple(config[name] for name in params)
