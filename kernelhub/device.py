"""Which device are we on, and what short key do its tuned configs live under.

A GPU's marketing name varies by form factor and memory ("NVIDIA A100-SXM4-80GB",
"NVIDIA A100-PCIE-40GB"), so the full identity is kept for the record and mapped to a short
key (`a100`) that users type and the config database is indexed by. `KERNELHUB_GPU` overrides
the key, for fleets whose names differ from the table below.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import asdict, dataclass

import torch

CPU_KEY = "cpu"
GPU_KEY_ENV = "KERNELHUB_GPU"

# (pattern on the lower-cased device name, key). First match wins, so more specific names come
# first: "h200" before "h20", "l40s" before "l40" before "l4", "a800" before "a80".
_KEY_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bh200\b", "h200"),
    (r"\bh100\b", "h100"),
    (r"\bh800\b", "h800"),
    (r"\bh20\b", "h20"),
    (r"\bgh200\b", "gh200"),
    (r"\bb200\b", "b200"),
    (r"\ba100\b", "a100"),
    (r"\ba800\b", "a800"),
    (r"\ba10g\b", "a10g"),
    (r"\ba10\b", "a10"),
    (r"\ba30\b", "a30"),
    (r"\ba40\b", "a40"),
    (r"\bl40s\b", "l40s"),
    (r"\bl40\b", "l40"),
    (r"\bl4\b", "l4"),
    (r"\bv100\b", "v100"),
    (r"\bt4\b", "t4"),
    (r"rtx\s*4090", "rtx4090"),
    (r"rtx\s*3090", "rtx3090"),
    (r"rtx\s*a6000", "rtxa6000"),
    (r"rtx\s*6000 ada", "rtx6000ada"),
    (r"\bmi300x\b", "mi300x"),
    (r"\bmi250x?\b", "mi250"),
)

# Shared memory a kernel may use per block (opt-in maximum), by compute capability, for the
# devices where torch does not report it. The interpreter accepts any tile size; our own
# constraints must reject what the real GPU would refuse.
_SMEM_BY_CC = {(7, 0): 98304, (7, 5): 65536, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912,
               (8, 9): 101376, (9, 0): 232448, (10, 0): 232448, (12, 0): 101376}
# Limit assumed where there is no GPU (interpreter checks): the smallest of the common targets
# (sm_86 / sm_89), so a config that passes on CPU also fits every GPU we tune for.
DEFAULT_SMEM_BYTES = 101376


@functools.lru_cache(maxsize=64)
def key_for_name(name: str) -> str:
    """Short key for a device name: `"NVIDIA A100-SXM4-80GB" -> "a100"`.

    Unknown names become a sanitized form of the full name (`"Foo GPU 9" -> "foo-gpu-9"`).
    """
    lowered = name.lower()
    for pattern, key in _KEY_PATTERNS:
        if re.search(pattern, lowered):
            return key
    lowered = re.sub(r"^(nvidia|amd)\s+", "", lowered)
    return re.sub(r"[^a-z0-9]+", "-", lowered).strip("-") or "unknown-gpu"


@dataclass(frozen=True)
class DeviceIdentity:
    """Everything that decides whether a tuned config still applies.

    `key` is what users type and the database indexes; the rest is kept for the record and for
    staleness checks.
    """

    key: str
    name: str
    vendor: str  # "nvidia", "amd" or "cpu"
    compute_capability: str | None  # "9.0"; None on CPU
    sm_count: int | None
    memory_bytes: int | None
    shared_memory_bytes: int  # per-block limit our constraints check against
    cuda_version: str | None  # CUDA or HIP runtime torch was built with
    torch_version: str
    triton_version: str | None

    @property
    def is_gpu(self) -> bool:
        return self.vendor != "cpu"

    @property
    def torch_device(self) -> torch.device:
        """Where tensors for this device live: `cuda` (the current GPU, ROCm's too) or `cpu`."""
        return torch.device("cuda" if self.is_gpu else "cpu")

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for logs and error messages."""
        if not self.is_gpu:
            return f"{self.key} (no GPU)"
        return f"{self.key} ({self.name}, sm_{(self.compute_capability or '').replace('.', '')})"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _key_override() -> str:
    """`KERNELHUB_GPU`, sanitized; empty when unset. It renames GPUs only: a CPU stays `cpu`."""
    return key_for_name(os.environ[GPU_KEY_ENV]) if os.environ.get(GPU_KEY_ENV, "").strip() else ""


@functools.lru_cache(maxsize=None)
def _detect(index: int | None, override: str) -> DeviceIdentity:
    versions = dict(torch_version=torch.__version__, triton_version=_triton_version())
    if index is None:
        return DeviceIdentity(
            key=CPU_KEY, name="cpu", vendor="cpu", compute_capability=None,
            sm_count=None, memory_bytes=None, shared_memory_bytes=DEFAULT_SMEM_BYTES,
            cuda_version=None, **versions,
        )
    props = torch.cuda.get_device_properties(index)
    is_hip = torch.version.hip is not None
    cc = (props.major, props.minor)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or _SMEM_BY_CC.get(cc, DEFAULT_SMEM_BYTES)
    return DeviceIdentity(
        key=override or key_for_name(props.name),
        name=props.name,
        vendor="amd" if is_hip else "nvidia",
        compute_capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        memory_bytes=props.total_memory,
        shared_memory_bytes=int(smem),
        cuda_version=torch.version.hip if is_hip else torch.version.cuda,
        **versions,
    )


def current_device(index: int | None = None) -> DeviceIdentity:
    """Identity of CUDA device `index` (default: the current one), or of the CPU if there is no GPU."""
    if not torch.cuda.is_available():
        return _detect(None, "")
    if index is None:
        index = torch.cuda.current_device()
    return _detect(index, _key_override())


def device_for_tensor(t: torch.Tensor) -> DeviceIdentity:
    """Identity of the device a tensor lives on (CPU tensors give the `cpu` identity). Cheap: called per op."""
    if t.device.type == "cuda":
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return _detect(index, _key_override())
    return _detect(None, "")
