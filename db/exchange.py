"""Export tuned configs to a JSON document, and import such a document into a store.

An export carries its format version, and every entry the kernel version it was tuned with and
the full identity of the device it was tuned on, which is what decides whether it is stale.

An import is validated entry by entry before anything is written, before the database is even
opened (`parse_export`): family known (to the caller's `get_family`: the loader's in the CLI),
bucket and dtype legal for it, config inside its search space, every value inside its column's
rule (`kernelhub.db.fields`: finite positive times, ints that fit, strings of printable text that
fit), device identity complete and of the entry's GPU key, no two entries for one database row.
Then it is written in one transaction: a bad file never leaves half of itself in the database.
What is read is bounded (`MAX_EXPORT_BYTES`).

Rows of any kernel version are accepted: an import from an older kernelhub brings stale rows,
which are shown and pruned like local ones. An export holds only what an import accepts: rows
it would refuse (invalid ones, unknown families, configs outside the space) are skipped and counted.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

import kernelhub
from kernelhub.db.fields import brief, normalize
from kernelhub.db.models import BestConfigRow, Device
from kernelhub.db.store import DEVICE_FIELDS, BestConfig, ConfigStore
from kernelhub.errors import ConfigDBError, KernelhubError, UnknownFamilyError
from kernelhub.files import write_text
from kernelhub.registry import FamilySpec

# get_family(name) -> the family's spec, UnknownFamilyError if none (`kernelhub.kernels.loader.get_family`).
FamilyLookup = Callable[[str], FamilySpec]

EXPORT_FORMAT = "kernelhub-configs"
EXPORT_VERSION = 1
# An export is about 1 KB per entry (pretty-printed): this holds some 250,000 entries. A file over
# it is not an export kernelhub wrote, and reading it whole could exhaust the memory.
MAX_EXPORT_BYTES = 256 * 2**20

# The fields of an entry; each must be present (REQUIRED) or may be (OPTIONAL), and nothing else.
_REQUIRED = ("gpu_key", "family", "bucket", "dtype", "config", "median_ms", "p20_ms", "p80_ms", "trials",
             "kernel_version", "torch_version", "triton_version")
_OPTIONAL = ("cuda_version", "throughput", "throughput_unit", "default_median_ms", "device", "created_at")
_ENTRY_FIELDS = frozenset(_REQUIRED + _OPTIONAL)
_MAX_DIMENSION = 2**63 - 1  # a shape dimension (a torch size is int64)


def export_configs(store: ConfigStore, *, get_family: FamilyLookup, gpu_key: str | None = None,
                   skipped: list[str] | None = None) -> dict:
    """The best configs in `store` (or those of one GPU) that an import accepts, as a JSON-able document.

    Rows an import would refuse are left out; `skipped`, when given, gets one line for each, saying why.
    """
    entries = []
    for row in store.best_configs(gpu_key=gpu_key, include_invalid=True):
        item = {name: getattr(row, name) for name in _ENTRY_FIELDS}
        problem = row.invalid
        if problem is None:
            item["created_at"] = row.created_at.isoformat()
            try:
                parse_entry(item, get_family)
            except ValueError as exc:
                problem = str(exc)
        if problem is None:
            entries.append(item)
        elif skipped is not None:
            where = " ".join(brief(getattr(row, k)).strip("'") for k in ("gpu_key", "family", "bucket", "dtype"))
            skipped.append(f"{where}: {problem}")
    return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "kernelhub_version": kernelhub.__version__,
            "exported_at": datetime.now(timezone.utc).isoformat(), "entries": entries}


def format_export(doc: dict) -> str:
    """An export document as the text of an export file (stable, readable, diffable)."""
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write_export_file(doc: dict, path: str | os.PathLike, *, force: bool = False,
                      protected: list[Path] = ()) -> None:
    """Write `doc` to `path` whole or not at all (`kernelhub.files.write_text`): an existing file
    only with `force`, the files in `protected` (the database's own) never."""
    write_text(format_export(doc), path, force=force, protected=protected)


def load_export_file(path: str | os.PathLike) -> dict:
    """Read an export document from a JSON file; ConfigDBError if unreadable, too large or not a JSON object."""
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            if stat.S_ISREG(info.st_mode) and info.st_size > MAX_EXPORT_BYTES:
                data = b""  # refused below without reading it
                size = info.st_size
            else:
                data = file.read(MAX_EXPORT_BYTES + 1)  # a device or pipe may never end
                size = len(data)
    except OSError as exc:
        raise ConfigDBError(f"cannot read config export {path}: {exc.strerror or exc}") from None
    if size > MAX_EXPORT_BYTES:
        raise ConfigDBError(f"config export {path} is larger than {MAX_EXPORT_BYTES // 2**20} MiB, more than any "
                            "kernelhub export; nothing was read: is it the right file?")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigDBError(f"config export {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                            "re-export it") from None
    except RecursionError:
        raise ConfigDBError(f"config export {path} nests JSON too deeply for an export; re-export it") from None
    except json.JSONDecodeError as exc:
        raise ConfigDBError(f"config export {path} is not valid JSON ({exc}); re-export it") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise ConfigDBError(f"config export {path} holds an integer of thousands of digits, which no export "
                            "has; re-export it") from None
    if not isinstance(doc, dict):
        raise ConfigDBError(f"config export {path} is not a {EXPORT_FORMAT} document (not a JSON object)")
    return doc


def parse_export(doc: object, *, into: str, get_family: FamilyLookup) -> list[BestConfig]:
    """Every entry of an export document, validated against the families `get_family` knows; no
    database is touched.

    Raises ConfigDBError naming the first bad entry and field and `into` (the database it was for).
    """
    def reject(problem: str):
        return ConfigDBError(f"import into {into} refused, nothing written: {problem}")

    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise reject(f"not a {EXPORT_FORMAT} document (format is {brief(found)})")
    version = doc.get("version")
    if type(version) is not int or version != EXPORT_VERSION:  # type: True == 1 and 1.0 == 1
        newer = type(version) is int and version > EXPORT_VERSION
        raise reject(f"export format version {brief(version)}, this kernelhub reads {EXPORT_VERSION}"
                     + ("; upgrade kernelhub" if newer else ""))
    if not isinstance(doc.get("entries"), list):
        raise reject("'entries' is missing or not a list")
    entries = []
    first_with_key: dict[tuple, int] = {}
    for index, item in enumerate(doc["entries"]):
        try:
            entry = parse_entry(item, get_family)
        except ValueError as exc:
            raise reject(f"entry {index}: {exc}") from None
        key = (entry.gpu_key, entry.family, entry.bucket, entry.dtype, entry.kernel_version)
        if key in first_with_key:
            raise reject(f"entries {first_with_key[key]} and {index} are both the config of {', '.join(key[:4])} "
                         f"(kernel version {key[4]}); an export has one entry per config")
        first_with_key[key] = index
        entries.append(entry)
    return entries


def import_configs(store: ConfigStore, doc: dict, *, get_family: FamilyLookup) -> int:
    """Validate every entry of an export document, then save them all in one transaction.

    Returns the number of entries imported. Raises ConfigDBError naming the first bad entry and
    field; nothing is written then.
    """
    entries = parse_export(doc, into=store.where, get_family=get_family)
    store.save_many(entries)
    return len(entries)


def parse_entry(item: object, get_family: FamilyLookup) -> BestConfig:
    """One export entry as a BestConfig; ValueError naming the field if anything is wrong."""
    if not isinstance(item, dict):
        raise ValueError(f"expected an object, got {type(item).__name__}")
    missing = [name for name in _REQUIRED if name not in item]
    if missing:
        raise ValueError(f"field {missing[0]!r} is missing")
    unknown = sorted(map(str, item.keys() - _ENTRY_FIELDS))
    if unknown:
        raise ValueError(f"field {brief(unknown[0])} is unknown")
    columns = BestConfigRow.__table__.c
    values = {}
    for name, value in item.items():
        if name in ("config", "device"):
            continue
        try:
            values[name] = normalize(columns[name], value)
        except ValueError as exc:
            raise ValueError(f"field {name!r} is {brief(value)}, {exc}") from None

    try:
        spec = get_family(values["family"])
    except UnknownFamilyError as exc:
        raise ValueError(f"field 'family': {exc}") from None
    try:
        shape = spec.parse_shape(values["bucket"])
    except ValueError as exc:
        raise ValueError(f"field 'bucket': {exc}") from None
    if not all(1 <= dimension <= _MAX_DIMENSION for dimension in shape):
        raise ValueError(f"field 'bucket': {values['bucket']!r} has a dimension outside 1 to {_MAX_DIMENSION}")
    if spec.format_shape(spec.bucket(shape)) != values["bucket"]:
        raise ValueError(f"field 'bucket': {values['bucket']!r} is not a {spec.name} bucket "
                         f"(that shape is stored as {spec.format_shape(spec.bucket(shape))!r})")
    if values["dtype"] not in spec.dtypes:
        raise ValueError(f"field 'dtype': {values['dtype']!r} is not one of {list(spec.dtypes)} for {spec.name}")
    config = item["config"]
    if not isinstance(config, dict):
        raise ValueError(f"field 'config' is {brief(config)}, expected an object of tunables")
    for name, value in config.items():  # keeps the space's messages short: no huge key or number in them
        if len(name) > 64 or not name.isprintable() or type(value) is not int or abs(value) >= 2**31:
            raise ValueError(f"field 'config': {brief(name)}={brief(value)} is not a tunable's integer value")
    try:
        values["config"] = spec.space.validate(config, source="field 'config'")
    except KernelhubError as exc:
        raise ValueError(str(exc)) from None

    device = item.get("device")
    if device is not None:
        if not isinstance(device, dict) or set(device) != set(DEVICE_FIELDS):
            raise ValueError(f"field 'device' must have exactly the keys {list(DEVICE_FIELDS)}")
        values["device"] = {}
        for name in DEVICE_FIELDS:
            try:
                values["device"][name] = normalize(Device.__table__.c[name], device[name])
            except ValueError as exc:
                raise ValueError(f"field 'device': {name!r} is {brief(device[name])}, {exc}") from None
        if device["key"] != values["gpu_key"]:
            raise ValueError(f"field 'device': tuned on a {device['key']!r} device, but stored under gpu_key "
                             f"{values['gpu_key']!r}")
    return BestConfig(**{f.name: values[f.name] for f in fields(BestConfig) if f.name in values})

