"""The family contract, held for every registered family (and the fixed kernels where it applies):
a new family gets these tests by registering, with nothing to add here.

- registration: the loader finds the spec, its sources exist, its kernel version covers the
  toolbox (a change to kernels/common/ marks every family's tuned rows stale);
- shapes: every shape of every set round-trips through its database text, and its bucket is
  idempotent at distance zero from itself;
- DEFAULTs: every shape of every set, in every dtype, gets one of the family's DEFAULTs, within
  the shared memory of the smallest GPU kernelhub tunes for (sm_86, kernelhub/compiler/targets.py);
  on the tune and bench sets (the models' real shapes) every constraint of the space holds too
  (on the odd, tiny smoke shapes a DEFAULT's blocks may exceed the problem: it still runs);
- correctness: the DEFAULT each smoke shape and dtype gets, and every DEFAULT at a smoke shape,
  match the reference on fresh inputs into a poisoned output (collectives on local gloo ranks).

That the DEFAULTs (and the fixed kernels' configs) compile for sm_80 and sm_90 within the targets'
limits and without spills is tests/test_compiler.py's full check (`kernelhub compile --configs 0`,
every compilable kernel at every tune shape and dtype); tests/test_compile_agreement.py holds the
shared-memory estimates against the compiler.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from helpers import SMALLEST_SMEM_BYTES, kernel_shape_id, local_worlds, reference_problem  # noqa: F401
from kernelhub import registry
from kernelhub.kernels import loader

FAMILIES = loader.families()
FIXED = loader.fixed_kernels()
SHAPE_SETS = registry.SHAPE_SETS
REAL_SHAPE_SETS = ("tune", "bench")


def _by_set(kernels):
    return [pytest.param(kernel, shape_set, id=f"{kernel.name}-{shape_set}")
            for kernel in kernels for shape_set in SHAPE_SETS]


def _smoke_runs():
    """(spec, shape, dtype) of every smoke shape and dtype."""
    return [pytest.param(spec, shape, dtype, id=f"{kernel_shape_id(spec, shape)}-{dtype}")
            for spec in FAMILIES for shape in spec.shapes("smoke") for dtype in spec.dtypes]


def _default_at(spec, config) -> tuple:
    """The smoke shape a DEFAULT is checked at: the first the space accepts it for on the smallest
    GPU, else the last (DEFAULTs run at any shape, some only make sense at larger ones)."""
    shapes = spec.shapes("smoke")
    return next((s for s in shapes if spec.space.infeasibility(config, s, SMALLEST_SMEM_BYTES) is None), shapes[-1])


def _every_default():
    return [pytest.param(spec, index, dtype, id=f"{spec.name}-DEFAULT{index}-{dtype}")
            for spec in FAMILIES for index in range(len(spec.defaults)) for dtype in spec.dtypes]


# -- registration --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", FAMILIES, ids=lambda spec: spec.name)
def test_family_is_registered_completely(spec):
    assert loader.get_family(spec.name) is spec
    assert spec.source_files and all(path.exists() for path in spec.source_files)
    assert len(spec.kernel_version) == 16 and int(spec.kernel_version, 16) >= 0
    assert spec.dtypes and len(spec.shape_names) == len(spec.shapes("smoke")[0])


def test_kernel_version_covers_the_toolbox(tmp_path, monkeypatch):
    """The toolbox is part of every kernel: a changed file of kernels/common/ is a new version."""
    spec = loader.get_family("int8_gemm")
    toolbox = tmp_path / "common"
    shutil.copytree(registry.TOOLBOX, toolbox, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(registry, "TOOLBOX", toolbox)
    assert dataclasses.replace(spec).kernel_version == spec.kernel_version  # the same files, the same version
    helpers_file = toolbox / "triton_helpers.py"
    helpers_file.write_text(helpers_file.read_text() + "\n# changed\n")
    assert dataclasses.replace(spec).kernel_version != spec.kernel_version


# -- shapes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, shape_set", _by_set(FAMILIES + FIXED))
def test_shape_text_round_trips(kernel, shape_set):
    for shape in kernel.shapes(shape_set):
        assert len(shape) == len(kernel.shape_names)
        assert kernel.parse_shape(kernel.format_shape(shape)) == tuple(shape)


@pytest.mark.parametrize("spec, shape_set", _by_set(FAMILIES))
def test_bucket_is_idempotent_at_distance_zero(spec, shape_set):
    for shape in spec.shapes(shape_set):
        bucket = spec.bucket(tuple(shape))
        assert spec.bucket(bucket) == bucket, kernel_shape_id(spec, shape)
        assert spec.bucket_distance(bucket, bucket) == 0, kernel_shape_id(spec, shape)


# -- DEFAULTs on the smallest GPU ----------------------------------------------------------------

@pytest.mark.parametrize("spec, shape_set", _by_set(FAMILIES))
def test_defaults_fit_the_smallest_gpu(spec, shape_set):
    for shape in spec.shapes(shape_set):
        for dtype in spec.dtypes:
            where = f"{kernel_shape_id(spec, shape)} {dtype}"
            config = spec.default_config(tuple(shape), dtype)
            assert config in spec.defaults, where
            assert spec.space.validate(config) == config, where
            if spec.shared_memory is not None:
                need = spec.shared_memory(config, tuple(shape)).bytes
                assert need <= SMALLEST_SMEM_BYTES, f"{where}: {config} needs {need} B of shared memory"
            if shape_set in REAL_SHAPE_SETS:
                reason = spec.space.infeasibility(config, tuple(shape), SMALLEST_SMEM_BYTES)
                assert reason is None, f"{where}: {config}: {reason}"


@pytest.mark.parametrize("kernel, shape_set", _by_set(k for k in FIXED if k.shared_memory is not None))
def test_fixed_configs_fit_the_smallest_gpu(kernel, shape_set):
    for shape in kernel.shapes(shape_set):
        need = kernel.shared_memory(kernel.config(tuple(shape)), tuple(shape)).bytes
        assert need <= SMALLEST_SMEM_BYTES, f"{kernel_shape_id(kernel, shape)} needs {need} B of shared memory"


# -- DEFAULTs against the reference --------------------------------------------------------------

@pytest.mark.parametrize("spec, shape, dtype", _smoke_runs())
def test_default_matches_reference(spec, shape, dtype, local_worlds):  # noqa: F811
    config = spec.default_config(tuple(shape), dtype)
    problem = reference_problem(spec, tuple(shape), dtype, config, seed=sum(shape), worlds=local_worlds)
    assert problem is None, f"{config}: {problem}"


@pytest.mark.parametrize("spec, index, dtype", _every_default())
def test_every_default_matches_reference(spec, index, dtype, local_worlds):  # noqa: F811
    config = spec.defaults[index]
    shape = _default_at(spec, config)
    problem = reference_problem(spec, shape, dtype, config, seed=index, worlds=local_worlds)
    assert problem is None, f"{kernel_shape_id(spec, shape)} {config}: {problem}"
