"""Rows for the tests of hostile input: a valid int8_gemm export entry to break one field of at a time."""

from __future__ import annotations

import dataclasses

from kernelhub.db import BestConfig
from kernelhub.device import current_device
from kernelhub.kernels.int8_gemm import space
from kernelhub.kernels.int8_gemm.spec import SPEC

DEVICE = dataclasses.replace(current_device(), key="h100", name="NVIDIA H100 80GB HBM3", vendor="nvidia",
                             compute_capability="9.0", sm_count=132).to_dict()


def entry(**overrides) -> dict:
    """An export entry of an h100 int8_gemm config, as `kernelhub export` writes it."""
    values = dict(gpu_key="h100", family=SPEC.name, bucket="M=128,N=4096,K=4096", dtype="bfloat16",
                  config=dict(space.DEFAULT_LARGE_M), median_ms=0.05, p20_ms=0.049, p80_ms=0.052, trials=40,
                  kernel_version=SPEC.kernel_version, torch_version="2.11.0", triton_version="3.6.0",
                  cuda_version="12.8", throughput=85.9, throughput_unit="TFLOP/s", default_median_ms=0.08,
                  device=DEVICE, created_at="2025-01-01T00:00:00+00:00")
    return values | overrides


def best(**overrides) -> BestConfig:
    """The same as a BestConfig to save (created now)."""
    return BestConfig(**{k: v for k, v in entry(**overrides).items() if k != "created_at"})


def document(*entries, **overrides) -> dict:
    return {"format": "kernelhub-configs", "version": 1, "kernelhub_version": "0.1.0",
            "exported_at": "2025-01-01T00:00:00+00:00", "entries": list(entries or [entry()])} | overrides
