"""Which launch config a call uses: in-process cache -> config database -> shipped configs -> DEFAULT.

Lookup rule for a call of shape S on GPU key G (see each family's space module for its buckets):
1. the config of S's own bucket;
2. else the config of the nearest bucket the family accepts (`bucket_distance`);
3. else the family's DEFAULT for S.
The configs are the user's database's rows for (G, family, dtype), and, for every bucket the
database has none of, the rows kernelhub ships for G (`kernelhub.db.shipped`): a user's own row
always wins over a shipped one. Stale rows are never used (`stale_reason`: another kernel version,
another Triton major version, or tuned on a device of another compute capability or SM count under
the same key). Every config, stored or shipped, is validated against the family's space and
constraints (for its own bucket, on this device) before it can be used, so a corrupt or hand-edited
row falls back instead of launching. A database or shipped file that cannot be opened or read
never breaks a call: one warning, then the next layer.

The first call of a (GPU, family, dtype) reads the database and the shipped file once; after that a
call costs a dictionary lookup. `clear_cache()` forgets everything (after tuning, in tests).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

from kernelhub.device import DeviceIdentity
from kernelhub.errors import ConfigDBError, KernelhubError, UnknownFamilyError
from kernelhub.registry import FamilySpec, Shape
from kernelhub.space import Config

# (gpu key, family, dtype) -> {bucket: config}, validated rows of the current kernel version.
_stored: dict[tuple[str, str, str], dict[Shape, Config]] = {}
# (gpu key, family, dtype, call shape) -> the config that call uses.
_resolved: dict[tuple[str, str, str, Shape], Config] = {}
_MAX_RESOLVED = 1 << 16
_lock = threading.Lock()
_warned: set[str] = set()


class ConfigDBWarning(UserWarning):
    """The config database, a shipped file or a row in one could not be used; the lookup goes on
    to the next layer (shipped configs, then DEFAULTs)."""


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, ConfigDBWarning, stacklevel=4)


def clear_cache() -> None:
    with _lock:
        _stored.clear()
        _resolved.clear()


def stale_reason(row, spec: FamilySpec, device: DeviceIdentity) -> str | None:
    """Why a stored row (a `kernelhub.db.BestConfig`) must not be used on `device`, or None.

    Rows of the same key from devices that differ only in name or memory size are shared: that is
    what a key is for. `kernelhub show` marks the rows this rejects as stale.
    """
    if row.kernel_version != spec.kernel_version:
        return "kernel changed"
    row_major = (row.triton_version or "").split(".")[0]
    our_major = (device.triton_version or "").split(".")[0]
    if row_major and our_major and row_major != our_major:
        return f"tuned with triton {row.triton_version}"
    tuned_on = row.device or {}
    for field in ("compute_capability", "sm_count"):
        if field in tuned_on and tuned_on[field] != getattr(device, field):
            return f"tuned on {tuned_on.get('name')} ({field} {tuned_on[field]})"
    return None


UNKNOWN_KERNEL = "stale: unknown kernel"


def row_status(row, device: DeviceIdentity, get_family: Callable[[str], FamilySpec]) -> str:
    """'ok'; 'stale: <why>' when the runtime would not use this row on `device`; 'invalid: <why>' when
    no kernelhub could (a value breaks its column's rule, or a row of the current kernel has a bucket
    or config outside the family's). What `kernelhub show`, `prune` and `report` print.

    `get_family(name)` is the caller's lookup (`kernelhub.kernels.loader.get_family`): it raises
    UnknownFamilyError for a family this install does not know (its rows are `UNKNOWN_KERNEL`),
    and anything else for a family that fails to load (a broken KERNELHUB_FAMILIES must not make
    every row stale).
    """
    if row.invalid:
        return f"invalid: {row.invalid}"
    try:
        spec = get_family(row.family)
    except UnknownFamilyError:
        return UNKNOWN_KERNEL
    if row.kernel_version == spec.kernel_version:  # another version may have had other buckets and tunables
        try:
            spec.parse_shape(row.bucket)
            spec.space.validate(row.config, source="config")
        except (KernelhubError, ValueError) as exc:
            return f"invalid: {exc}"
    if row.gpu_key != device.key:  # another GPU's row: only the kernel version can be judged here
        return "stale: kernel changed" if row.kernel_version != spec.kernel_version else "ok"
    reason = stale_reason(row, spec, device)
    return f"stale: {reason}" if reason else "ok"


def _database_rows(spec: FamilySpec, dtype: str, device: DeviceIdentity) -> list:
    """The user's rows for (device, family, dtype) of the current kernel version, from `KERNELHUB_DB`."""
    from kernelhub.db import ConfigStore, default_url
    from kernelhub.db.store import sqlite_path

    url = None  # for the message, should finding the database fail
    try:
        url = default_url()
        path = sqlite_path(url)
        if path is not None and not path.exists():
            return []  # nothing tuned yet; reading never creates a database
        with ConfigStore(url, create=False) as store:
            return store.best_configs(gpu_key=device.key, family=spec.name, dtype=dtype,
                                      kernel_version=spec.kernel_version)
    except ConfigDBError as exc:
        _warn_once(f"kernelhub: not using the config database: {exc}")
    except Exception as exc:  # never let the database break a kernel call
        _warn_once(f"kernelhub: not using the config database {url or 'at KERNELHUB_DB'}: it is unreadable "
                   f"({type(exc).__name__}: {exc})")
    return []


def _shipped_rows(spec: FamilySpec, dtype: str, device: DeviceIdentity) -> list:
    """The rows kernelhub ships for (device, family, dtype) of the current kernel version."""
    from kernelhub.db.shipped import read_shipped

    def only_this_family(name: str) -> FamilySpec:
        if name != spec.name:
            raise UnknownFamilyError(f"not {spec.name}")
        return spec

    problems: list[str] = []
    try:
        rows = read_shipped(device.key, only_this_family, family=spec.name, problems=problems)
    except Exception as exc:  # a shipped file must not break a call either
        problems.append(f"shipped configs for {device.key} are unreadable ({type(exc).__name__}: {exc})")
        rows = []
    for problem in problems:
        _warn_once(f"kernelhub: {problem}")
    return [r for r in rows if r.dtype == dtype and r.kernel_version == spec.kernel_version]


def _usable(rows, spec: FamilySpec, device: DeviceIdentity, source: str) -> dict[Shape, Config]:
    """The rows' configs by bucket, without the stale ones and those that fail validation on `device`."""
    valid: dict[Shape, Config] = {}
    for row in rows:
        if stale_reason(row, spec, device):
            continue
        where = f"{source} {spec.name} config for {device.key} {row.bucket} {row.dtype}"
        try:
            bucket = spec.parse_shape(row.bucket)
            config = spec.space.validate(row.config, source=where)
        except (KernelhubError, ValueError) as exc:
            _warn_once(f"kernelhub: ignoring {where}: {exc}")
            continue
        reason = spec.space.infeasibility(config, bucket, device.shared_memory_bytes)
        if reason is not None:
            _warn_once(f"kernelhub: ignoring {where}: {reason}")
            continue
        valid[bucket] = config
    return valid


def _read_rows(spec: FamilySpec, dtype: str, device: DeviceIdentity) -> dict[Shape, Config]:
    """Every usable config for (device, family, dtype): the shipped ones, overridden bucket by bucket
    by the user's database."""
    table = _usable(_shipped_rows(spec, dtype, device), spec, device, "shipped")
    table.update(_usable(_database_rows(spec, dtype, device), spec, device, "stored"))
    return table


def _choose(spec: FamilySpec, shape: Shape, dtype: str, stored: dict[Shape, Config]) -> Config:
    bucket = spec.bucket(shape)
    if bucket in stored:
        return stored[bucket]
    scored = [(d, b) for b in stored if (d := spec.bucket_distance(bucket, b)) is not None]
    if scored:
        return stored[min(scored)[1]]
    return spec.default_config(shape, dtype)


def best_config(spec: FamilySpec, shape: Shape, dtype: str, device: DeviceIdentity) -> Config:
    """The config to launch `spec` with for `shape` and `dtype` on `device` (see module docstring)."""
    key = (device.key, spec.name, dtype, shape)
    config = _resolved.get(key)
    if config is not None:
        return config
    with _lock:
        table_key = (device.key, spec.name, dtype)
        if table_key not in _stored:
            _stored[table_key] = _read_rows(spec, dtype, device)
        config = _choose(spec, shape, dtype, _stored[table_key])
        if len(_resolved) >= _MAX_RESOLVED:
            _resolved.clear()
        _resolved[key] = config
    return config
