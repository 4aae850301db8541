"""Test helpers for file-system conditions that the tests must create themselves."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def unwritable_directory(directory: Path):
    """`directory` made unwritable for the duration: by its mode, or, for root (whom modes do not
    stop), by `chattr +i`; skips the test where neither is possible."""
    as_root = os.geteuid() == 0
    if as_root:
        if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a file system without chattr +i: cannot make a directory unwritable")
    else:
        directory.chmod(0o555)
    try:
        yield directory
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(0o755)
