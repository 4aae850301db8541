"""The GPU targets `kernelhub compile` builds for: an architecture, its limits, and occupancy.

A target is an architecture (`sm_80`, `sm_90`, `gfx942`, ...) with the per-block and per-SM limits
a kernel is judged against, or a GPU key (`a100`, `h100`, `mi300x`, ...), which names its
architecture and adds the chip's SM count. Limits are NVIDIA's CUDA C Programming Guide tables
("Technical Specifications per Compute Capability") and AMD's CDNA3 ISA guide:

    arch     GPUs (keys)                                   smem/block  smem/SM   warps/SM  blocks/SM
    sm_80    A100, A800, A30                               163 KiB     164 KiB   64        32
    sm_86    A10, A10G, A40, RTX 3090, RTX A6000           99 KiB      100 KiB   48        16
    sm_89    L40S, L40, L4, RTX 4090, RTX 6000 Ada         99 KiB      100 KiB   48        24
    sm_90    H100, H200, H800, H20, GH200                  227 KiB     228 KiB   64        32
    sm_100   B200                                          227 KiB     228 KiB   64        32
    gfx942   MI300X                                        64 KiB LDS per workgroup; occupancy from the compiler

NVIDIA: 64K 32-bit registers per SM, at most 255 per thread, allocated per warp in units of 256;
every block also takes 1 KiB of shared memory the driver reserves, and shared memory is allocated
in 128-byte units (the occupancy calculator's rules, used by `occupancy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Target:
    """One compile target: an architecture and the limits a kernel compiled for it must respect."""

    name: str  # what the user typed or the architecture: "sm_90", "h100", "gfx942"
    arch: str  # "sm_90", "gfx942"
    backend: str  # Triton's backend name: "cuda" or "hip"
    warp_size: int
    shared_per_block: int  # bytes a block may use (opt-in maximum, static + dynamic)
    shared_per_sm: int
    registers_per_sm: int  # 32-bit registers
    max_registers_per_thread: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    sm_count: int | None = None  # known only for a GPU key

    @property
    def capability(self) -> int | str:
        """Triton's `GPUTarget.arch`: 90 for sm_90, "gfx942" for AMD."""
        return int(self.arch.removeprefix("sm_")) if self.backend == "cuda" else self.arch

    def gpu_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.capability, self.warp_size)


_KIB = 1024
_NVIDIA = dict(backend="cuda", warp_size=32, registers_per_sm=65536, max_registers_per_thread=255)
ARCHITECTURES: dict[str, Target] = {t.arch: t for t in (
    Target("sm_80", "sm_80", shared_per_block=163 * _KIB, shared_per_sm=164 * _KIB, max_warps_per_sm=64,
           max_blocks_per_sm=32, **_NVIDIA),
    Target("sm_86", "sm_86", shared_per_block=99 * _KIB, shared_per_sm=100 * _KIB, max_warps_per_sm=48,
           max_blocks_per_sm=16, **_NVIDIA),
    Target("sm_89", "sm_89", shared_per_block=99 * _KIB, shared_per_sm=100 * _KIB, max_warps_per_sm=48,
           max_blocks_per_sm=24, **_NVIDIA),
    Target("sm_90", "sm_90", shared_per_block=227 * _KIB, shared_per_sm=228 * _KIB, max_warps_per_sm=64,
           max_blocks_per_sm=32, **_NVIDIA),
    Target("sm_100", "sm_100", shared_per_block=227 * _KIB, shared_per_sm=228 * _KIB, max_warps_per_sm=64,
           max_blocks_per_sm=32, **_NVIDIA),
    # CDNA3: 64 KiB of LDS per workgroup and per CU; 512 VGPRs per SIMD lane, 4 SIMDs of up to 8
    # waves each. The compiler reports the occupancy itself (waves per SIMD).
    Target("gfx942", "gfx942", backend="hip", warp_size=64, shared_per_block=64 * _KIB, shared_per_sm=64 * _KIB,
           registers_per_sm=4 * 512 * 64, max_registers_per_thread=512, max_warps_per_sm=32, max_blocks_per_sm=32),
)}

# GPU key -> (architecture, SM or CU count) of the common form factor.
GPUS: dict[str, tuple[str, int]] = {
    "a100": ("sm_80", 108), "a800": ("sm_80", 108), "a30": ("sm_80", 56),
    "a10": ("sm_86", 72), "a10g": ("sm_86", 80), "a40": ("sm_86", 84), "rtx3090": ("sm_86", 82),
    "rtxa6000": ("sm_86", 84),
    "l40s": ("sm_89", 142), "l40": ("sm_89", 142), "l4": ("sm_89", 58), "rtx4090": ("sm_89", 128),
    "rtx6000ada": ("sm_89", 142),
    "h100": ("sm_90", 132), "h200": ("sm_90", 132), "h800": ("sm_90", 132), "h20": ("sm_90", 78),
    "gh200": ("sm_90", 132),
    "b200": ("sm_100", 148),
    "mi300x": ("gfx942", 304),
}

DEFAULT_TARGETS = ("sm_80", "sm_90")


def target(name: str) -> Target:
    """The target an architecture (`sm_90`, also `sm90` or `90`) or a GPU key (`h100`) names."""
    text = name.strip().lower()
    if text in GPUS:
        arch, sms = GPUS[text]
        return replace(ARCHITECTURES[arch], name=text, sm_count=sms)
    if text.isdigit():
        text = f"sm_{text}"
    elif text.startswith("sm") and not text.startswith("sm_"):
        text = "sm_" + text[2:]
    if text in ARCHITECTURES:
        return ARCHITECTURES[text]
    raise ValueError(f"unknown target {name!r}: expected an architecture ({', '.join(ARCHITECTURES)}) or a GPU key "
                     f"({', '.join(GPUS)})")


@dataclass(frozen=True)
class Occupancy:
    """Blocks (and warps) of one kernel resident on one SM at once, and what limits them."""

    blocks: int
    warps: int
    limiter: str  # "warps", "registers", "shared memory" or "blocks"


def occupancy(t: Target, *, num_warps: int, registers: int, shared_bytes: int) -> Occupancy:
    """Resident blocks per SM of a kernel with `num_warps` warps per block, `registers` per thread and
    `shared_bytes` per block (static + dynamic), by the CUDA occupancy calculator's rules."""
    by_warps = t.max_warps_per_sm // num_warps
    registers_per_warp = math.ceil(max(registers, 1) * t.warp_size / 256) * 256
    by_registers = (t.registers_per_sm // registers_per_warp) // num_warps
    per_block = math.ceil((shared_bytes + 1024) / 128) * 128  # the driver's 1 KiB per block, 128-byte units
    by_shared = t.shared_per_sm // per_block
    limits = {"warps": by_warps, "registers": by_registers, "shared memory": by_shared,
              "blocks": t.max_blocks_per_sm}
    limiter = min(limits, key=limits.get)
    blocks = max(0, limits[limiter])
    return Occupancy(blocks=blocks, warps=blocks * num_warps, limiter=limiter)
