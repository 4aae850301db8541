"""Writing a user's file safely: whole or not at all, never over what must not be replaced."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kernelhub.errors import KernelhubError


def write_text(text: str, path: str | os.PathLike, *, force: bool = False, protected: list[Path] = ()) -> None:
    """Write `text` to `path` through a temporary file beside it, renamed over it at the end.

    An existing file is replaced only with `force`; the files in `protected` (a database's own)
    never, whatever their name or link. KernelhubError, with nothing written, when refused or failing.
    """
    target = Path(path)
    if target.is_dir():
        raise KernelhubError(f"{path} is a directory: give a file name inside it")
    resolved = target.resolve()  # through symlinks: the file that would change
    for own in protected:
        if resolved == own.resolve() or (resolved.exists() and own.exists() and os.path.samefile(resolved, own)):
            raise KernelhubError(f"{path} is a file of the config database itself ({own}); refused even with "
                                 "--force: write to another file")
    if resolved.exists() and not force:
        raise KernelhubError(f"{path} exists; pass --force to replace it, or write to another file")
    if not resolved.parent.is_dir():
        raise KernelhubError(f"cannot write {path}: its directory {resolved.parent} does not exist")
    try:
        handle, temporary = tempfile.mkstemp(dir=resolved.parent, prefix=f".{resolved.name}.", suffix=".tmp")
    except OSError as exc:
        raise KernelhubError(f"cannot write {path}: {exc.strerror or exc} (in {resolved.parent})") from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(file.fileno(), 0o666 & ~umask)  # as open() would create it, not mkstemp's 0600
            file.write(text)
        os.replace(temporary, resolved)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise KernelhubError(f"cannot write {path}: {exc.strerror or exc}; nothing was written") from None
