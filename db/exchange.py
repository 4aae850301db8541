"""Export tuned configs to a JSON document, and import such a document into a store.

An export carries its format version, and every entry the kernel version it was tuned with and
the full identity of the device it was tuned on, which is what decides whether it is stale.

An import is validated entry by entry before anything is written (family known, bucket and dtype
legal for it, config inside its search space, device identity complete and of the entry's GPU
key, no two entries for one database row), then written in one transaction: a bad file never
leaves half of itself in the database.

Rows of any kernel version are accepted: an import from an older kernelhub brings stale rows,
which are shown and pruned like local ones.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import kernelhub
from kernelhub import registry
from kernelhub.db.store import DEVICE_FIELDS, BestConfig, ConfigStore
from kernelhub.errors import ConfigDBError, KernelhubError

EXPORT_FORMAT = "kernelhub-configs"
EXPORT_VERSION = 1

# Field -> accepted JSON types (None: the field may be null); fields missing here are not accepted.
_REQUIRED = {
    "gpu_key": (str,), "family": (str,), "bucket": (str,), "dtype": (str,), "config": (dict,),
    "median_ms": (float, int), "p20_ms": (float, int), "p80_ms": (float, int), "trials": (int,),
    "kernel_version": (str,), "torch_version": (str,), "triton_version": (str, None),
}
_OPTIONAL = {
    "cuda_version": (str, None), "throughput": (float, int, None), "throughput_unit": (str, None),
    "default_median_ms": (float, int, None), "device": (dict, None), "created_at": (str,),
}


def export_configs(store: ConfigStore, *, gpu_key: str | None = None) -> dict:
    """Every best config in `store` (or those of one GPU) as a JSON-able document."""
    entries = []
    for entry in store.best_configs(gpu_key=gpu_key):
        item = asdict(entry)
        del item["id"]  # meaningless in another database
        item["created_at"] = entry.created_at.isoformat()
        entries.append(item)
    return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "kernelhub_version": kernelhub.__version__,
            "exported_at": datetime.now(timezone.utc).isoformat(), "entries": entries}


def load_export_file(path: str | os.PathLike) -> dict:
    """Read an export document from a JSON file; ConfigDBError if unreadable or not a JSON object."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigDBError(f"cannot read config export {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigDBError(f"config export {path} is not valid JSON ({exc}); re-export it") from exc
    if not isinstance(doc, dict):
        raise ConfigDBError(f"config export {path} is not a {EXPORT_FORMAT} document (not a JSON object)")
    return doc


def import_configs(store: ConfigStore, doc: dict) -> int:
    """Validate every entry of an export document, then save them all in one transaction.

    Returns the number of entries imported. Raises ConfigDBError naming the first bad entry and
    field; nothing is written then.
    """
    def reject(problem: str):
        return ConfigDBError(f"import into {store.where} refused, nothing written: {problem}")

    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise reject(f"not a {EXPORT_FORMAT} document (format is {found!r})")
    version = doc.get("version")
    if version != EXPORT_VERSION:
        newer = isinstance(version, int) and version > EXPORT_VERSION
        raise reject(f"export format version {version!r}, this kernelhub reads {EXPORT_VERSION}"
                     + ("; upgrade kernelhub" if newer else ""))
    if not isinstance(doc.get("entries"), list):
        raise reject("'entries' is missing or not a list")
    entries = []
    first_with_key: dict[tuple, int] = {}
    for index, item in enumerate(doc["entries"]):
        try:
            entry = _parse_entry(item)
        except ValueError as exc:
            raise reject(f"entry {index}: {exc}") from None
        key = (entry.gpu_key, entry.family, entry.bucket, entry.dtype, entry.kernel_version)
        if key in first_with_key:
            raise reject(f"entries {first_with_key[key]} and {index} are both the config of {', '.join(key[:4])} "
                         f"(kernel version {key[4]}); an export has one entry per config")
        first_with_key[key] = index
        entries.append(entry)
    store.save_many(entries)
    return len(entries)


def _type_ok(value, accepted: tuple) -> bool:
    if value is None:
        return None in accepted
    if isinstance(value, bool):  # JSON true/false are not numbers here
        return False
    return isinstance(value, tuple(t for t in accepted if t is not None))


def _parse_entry(item) -> BestConfig:
    """One export entry as a BestConfig; ValueError naming the field if anything is wrong."""
    if not isinstance(item, dict):
        raise ValueError(f"expected an object, got {type(item).__name__}")
    missing = sorted(_REQUIRED.keys() - item.keys())
    if missing:
        raise ValueError(f"field {missing[0]!r} is missing")
    unknown = sorted(item.keys() - _REQUIRED.keys() - _OPTIONAL.keys())
    if unknown:
        raise ValueError(f"field {unknown[0]!r} is unknown")
    for name, value in item.items():
        accepted = _REQUIRED.get(name) or _OPTIONAL[name]
        if not _type_ok(value, accepted):
            expected = " or ".join("null" if t is None else t.__name__ for t in accepted)
            raise ValueError(f"field {name!r} is {value!r}, expected {expected}")
    for name in ("median_ms", "p20_ms", "p80_ms", "default_median_ms", "throughput", "trials"):
        value = item.get(name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"field {name!r} is {value!r}, expected a finite number >= 0")

    try:
        spec = registry.get_family(item["family"])
    except KernelhubError as exc:
        raise ValueError(f"field 'family': {exc}") from None
    try:
        shape = spec.parse_shape(item["bucket"])
    except ValueError as exc:
        raise ValueError(f"field 'bucket': {exc}") from None
    if spec.format_shape(spec.bucket(shape)) != item["bucket"]:
        raise ValueError(f"field 'bucket': {item['bucket']!r} is not a {spec.name} bucket "
                         f"(that shape is stored as {spec.format_shape(spec.bucket(shape))!r})")
    if item["dtype"] not in spec.dtypes:
        raise ValueError(f"field 'dtype': {item['dtype']!r} is not one of {list(spec.dtypes)} for {spec.name}")
    try:
        config = spec.space.validate(item["config"], source="field 'config'")
    except KernelhubError as exc:
        raise ValueError(str(exc)) from None

    device = item.get("device")
    if device is not None:
        if set(device) != set(DEVICE_FIELDS):
            raise ValueError(f"field 'device' must have exactly the keys {list(DEVICE_FIELDS)}")
        bad = [k for k, v in device.items() if not _type_ok(v, (str, int, None))]
        if bad:
            raise ValueError(f"field 'device': {bad[0]!r} is {device[bad[0]]!r}, expected a string, int or null")
        if device["key"] != item["gpu_key"]:
            raise ValueError(f"field 'device': tuned on a {device['key']!r} device, but stored under gpu_key "
                             f"{item['gpu_key']!r}")
    values = dict(item, config=config)
    if "created_at" in item:
        try:
            created = datetime.fromisoformat(item["created_at"])
        except ValueError:
            raise ValueError(f"field 'created_at' is {item['created_at']!r}, not an ISO 8601 time") from None
        values["created_at"] = created if created.tzinfo else created.replace(tzinfo=timezone.utc)
    return BestConfig(**values)
