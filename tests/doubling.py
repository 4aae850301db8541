"""A test-only family maker (registering nothing): out = 2 * x on a tiny int32 vector, its CPU path
real (`tunes_on_cpu`). tests/fault_families.py registers two such families; tests build their own."""

from pathlib import Path

import torch

from kernelhub.checking import mismatch_exact
from kernelhub.registry import FamilySpec
from kernelhub.space import SearchSpace


def doubling_family(name: str, space: SearchSpace, default: dict, launch) -> FamilySpec:
    """A test family computing out = 2 * x on an int32 vector of shape (7,), on the CPU for real."""
    shapes = [(7,)]
    return FamilySpec(
        name=name, summary="test only", shape_names=("N",), dtypes=("int32",), space=space,
        default_config=lambda shape, dtype: dict(default), defaults=(default,),
        make_inputs=lambda shape, dtype, device, seed: {
            "x": torch.randint(1, 100, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32)},
        reference=lambda inputs: inputs["x"] * 2, launch=launch,
        new_output=lambda inputs: torch.empty_like(inputs["x"]),
        compare=lambda actual, expected, inputs: mismatch_exact(actual, expected),
        shape_sets={"smoke": shapes, "tune": shapes, "bench": shapes},
        bucket=lambda shape: shape, bucket_distance=lambda a, b: None,
        flops=lambda shape: 0, bytes_moved=lambda shape, dtype: 8 * shape[0],
        source_files=(Path(__file__),), tunes_on_cpu=True,
    )
