"""Shared fixtures. Every test runs against a private config database, never the user's cache."""

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest


@pytest.fixture(autouse=True)
def private_config_db(tmp_path, monkeypatch):
    """Point KERNELHUB_DB at a fresh SQLite path, the shipped configs at an empty folder of this test's
    (tmp_path / "shipped", not created), and start each test with an empty config cache."""
    from kernelhub import configs

    url = f"sqlite:///{tmp_path / 'configs.sqlite'}"
    monkeypatch.setenv("KERNELHUB_DB", url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("KERNELHUB_SHIPPED_DIR", str(tmp_path / "shipped"))
    monkeypatch.delenv("KERNELHUB_BACKEND", raising=False)
    monkeypatch.delenv("KERNELHUB_GPU", raising=False)
    configs.clear_cache()
    yield url
    configs.clear_cache()


def select_cpu_quantiser(path: str, monkeypatch) -> None:
    """Make the int8 family's CPU quantiser take `path`: "compiled" (kernelhub/kernels/int8_gemm/
    native.py; skipped only where it is unavailable, which tests/test_int8_native.py holds to no
    compiler) or "numpy-torch" (what runs where it cannot be built)."""
    from kernelhub.kernels.int8_gemm import native

    if path == "compiled" and native.quantizer() is None:
        pytest.skip(f"no compiled quantiser here: {native.unavailable_reason()}")
    if path == "numpy-torch":
        monkeypatch.setattr(native, "quantizer", lambda: None)


@contextlib.contextmanager
def threads_split(source: str, monkeypatch):
    """The compiled quantiser (which must be there) with every call split over three threads (more
    than cores, and than rows at M = 1): `source` "team", a team of torch's OpenMP workers (skipped
    where torch's runtime exports none), or "started", threads each call starts."""
    import torch

    from kernelhub.kernels.int8_gemm import cpu, native

    quantizer = native.quantizer()
    entries = native.openmp_entries() if source == "team" else None
    if source == "team" and entries is None:
        pytest.skip("torch's parallel backend here is not an OpenMP runtime that exports its entries")
    monkeypatch.setattr(cpu, "_TEAM_MIN_ELEMENTS", 1)
    monkeypatch.setattr(cpu, "_THREADED_MIN_ELEMENTS", 1)
    previous = (torch.get_num_threads(), quantizer.team_entries)
    quantizer.use_team_threads(entries)
    torch.set_num_threads(3)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        quantizer.use_team_threads(previous[1])


@pytest.fixture(params=["compiled", "compiled-team", "compiled-started-threads", "numpy-torch"])
def cpu_quantiser(request, monkeypatch):
    """Each CPU quantiser of the int8 family in turn (`select_cpu_quantiser`), the compiled one also
    with every call split over threads, of both sources (`threads_split`)."""
    path = request.param
    select_cpu_quantiser("numpy-torch" if path == "numpy-torch" else "compiled", monkeypatch)
    if path in ("compiled", "numpy-torch"):
        yield path
    else:
        with threads_split("team" if path == "compiled-team" else "started", monkeypatch):
            yield path


# A throwaway PostgreSQL server (or KERNELHUB_TEST_POSTGRES) and a fresh database on it per test.
from postgres import postgres_server, postgres_url  # noqa: E402, F401
