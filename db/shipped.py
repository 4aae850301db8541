"""Shipped configs: tuned configs that come with kernelhub, one read-only file per GPU key.

`db/shipped/<gpu key>.json` (installed as `kernelhub/db/shipped/`) is an export document, as
`kernelhub export --ship` writes it. The runtime consults it after the user's database and before
the family's DEFAULT (`kernelhub.configs`): a bucket the user tuned uses the user's row, any
other bucket a shipped row of it. Nothing ever writes here at run time; `kernelhub import` of the
same file copies its rows into a database.

Every entry passes the same rules as an import (`kernelhub.db.exchange`) and, at run time, the same
staleness and feasibility rules as a stored row; an entry that fails is skipped (and said), one
file that cannot be read at all gives no rows. An entry filed under another GPU key than its
file's name is skipped too: the file name is what the lookup trusts.

`KERNELHUB_SHIPPED_DIR` names another folder of such files (tests, or a site's own set); set to
the empty string, it turns the layer off.
"""

from __future__ import annotations

import os
from pathlib import Path

from kernelhub.db.exchange import FamilyLookup, load_export_file, parse_entry
from kernelhub.db.fields import brief
from kernelhub.db.store import BestConfig
from kernelhub.errors import ConfigDBError

SHIPPED_DIR_ENV = "KERNELHUB_SHIPPED_DIR"
PACKAGE_SHIPPED_DIR = Path(__file__).with_name("shipped")


def shipped_dir() -> Path | None:
    """The folder of shipped configs: `KERNELHUB_SHIPPED_DIR`, else the package's; None when turned off."""
    chosen = os.environ.get(SHIPPED_DIR_ENV)
    if chosen is None:
        return PACKAGE_SHIPPED_DIR
    return Path(chosen) if chosen.strip() else None


def shipped_file(gpu_key: str) -> Path | None:
    """Where the shipped configs of `gpu_key` live (the file may not exist); None when turned off."""
    folder = shipped_dir()
    return None if folder is None else folder / f"{gpu_key}.json"


def shipped_keys() -> list[str]:
    """The GPU keys that have a shipped file, sorted."""
    folder = shipped_dir()
    if folder is None or not folder.is_dir():
        return []
    return sorted(path.stem for path in folder.glob("*.json") if path.is_file())


def read_shipped(gpu_key: str, get_family: FamilyLookup, *, family: str | None = None,
                 problems: list[str] | None = None) -> list[BestConfig]:
    """The entries of `gpu_key`'s shipped file that an import accepts (only `family`'s, if given).

    No file: no rows. `problems`, when given, gets one line for the file if it cannot be read and
    one for each entry skipped, saying why; nothing here raises for what a file holds.
    """
    path = shipped_file(gpu_key)
    if path is None or not path.is_file():
        return []
    notes = problems if problems is not None else []
    try:
        doc = load_export_file(path)
        entries = doc.get("entries")
        if not isinstance(entries, list):
            raise ConfigDBError(f"shipped configs {path}: 'entries' is missing or not a list")
    except ConfigDBError as exc:
        notes.append(str(exc))
        return []
    rows = []
    for index, item in enumerate(entries):
        if family is not None and isinstance(item, dict) and item.get("family") != family:
            continue
        try:
            row = parse_entry(item, get_family)
        except ValueError as exc:
            notes.append(f"shipped configs {path}: entry {index} skipped: {exc}")
            continue
        if row.gpu_key != gpu_key:
            notes.append(f"shipped configs {path}: entry {index} skipped: filed under gpu_key "
                         f"{brief(row.gpu_key)} in the file of {gpu_key}")
            continue
        rows.append(row)
    return rows
