"""The families' loader: the registered specs, after every family module has been imported.

Built-in families register from their `spec.py` (imported here); out-of-tree families (and the
test suite's fault-injecting ones) from the modules named in `KERNELHUB_FAMILIES`, comma-separated,
imported after them. The contract types and `register` are `kernelhub.registry`'s, which imports
no family: the core modules (configs, the database, the compiler) take a spec or `get_family` from
their callers (the CLI, the tuner, the reports), which import this.
"""

from __future__ import annotations

import importlib
import os

from kernelhub import registry
from kernelhub.errors import KernelhubError, UnknownFamilyError

# Importing a family's spec module registers it; the order is the order of `families()`.
from kernelhub.kernels.int8_gemm import spec as _int8_gemm  # noqa: F401
from kernelhub.kernels.landmark_topk import spec as _landmark_topk  # noqa: F401
from kernelhub.kernels.lowrank_keys import spec as _lowrank_keys  # noqa: F401
from kernelhub.kernels.rmsnorm_quant import spec as _rmsnorm_quant  # noqa: F401
from kernelhub.kernels.sparse_gather import spec as _sparse_gather  # noqa: F401
from kernelhub.kernels.tp_overlap import spec as _tp_overlap  # noqa: F401

EXTRA_FAMILIES_ENV = "KERNELHUB_FAMILIES"


def _load_extra_families() -> None:
    """Import the modules `KERNELHUB_FAMILIES` names (each registers itself; a repeat is a no-op)."""
    for module in filter(None, (m.strip() for m in os.environ.get(EXTRA_FAMILIES_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except Exception as exc:  # a module that fails to import in any way is one error naming it
            raise KernelhubError(f"{EXTRA_FAMILIES_ENV}: cannot import {module!r}: {type(exc).__name__}: {exc}; "
                                 f"fix or remove it from {EXTRA_FAMILIES_ENV}") from None


def families() -> list[registry.FamilySpec]:
    """All registered families, in registration order."""
    _load_extra_families()
    return list(registry._FAMILIES.values())


def fixed_kernels() -> list[registry.FixedKernel]:
    """All registered untuned kernels, in registration order."""
    _load_extra_families()
    return list(registry._FIXED.values())


def get_family(name: str) -> registry.FamilySpec:
    """The spec registered as `name`: UnknownFamilyError if none is; a family module that fails to
    load raises its own KernelhubError, so a broken KERNELHUB_FAMILIES is never "unknown kernel"."""
    _load_extra_families()
    try:
        return registry._FAMILIES[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name read from a corrupt row or file
        raise UnknownFamilyError(f"unknown kernel family {name!r}; known: {sorted(registry._FAMILIES)}") from None
