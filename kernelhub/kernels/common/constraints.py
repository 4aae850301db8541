"""The constraints tile kernels share: registers per thread, blocks against the problem, and the
set every tiled GEMM over shapes (M, N, K) has.

A constraint is `(config, shape, smem_bytes) -> reason | None` (`kernelhub.space.Constraint`);
these build them from what differs between families, so the reasons read alike everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from kernelhub.kernels.common.shared_memory import SharedMemory, fits
from kernelhub.kernels.common.sizes import next_pow2
from kernelhub.space import Constraint

Shape = tuple[int, ...]

MIN_DOT = 16  # tl.dot needs every dimension of its operand tiles >= 16
# Accumulator registers per thread above which a [BLOCK_M, BLOCK_N] 32-bit tile spills.
MAX_ACC_REGS_PER_THREAD = 128
THREADS_PER_WARP = 32


def registers_fit(what: str, elements: Callable[[Mapping[str, int], Shape], int],
                  limit: int = MAX_ACC_REGS_PER_THREAD, unit: str = "registers") -> Constraint:
    """The constraint that `elements(config, shape)` 32-bit values (a tile the kernel keeps in
    registers, named `what`) spread over the block's threads stay within `limit` per thread."""
    def registers_fit(config, shape, smem_bytes):
        warps = config["num_warps"]
        per_thread = elements(config, shape) // (THREADS_PER_WARP * warps)
        if per_thread > limit:
            return f"{what}: {per_thread} {unit} per thread with {warps} warps (> {limit})"
        return None
    return registers_fit


def blocks_fit_problem(params: Mapping[str, Sequence[int]], sizes: Callable[[Shape], Mapping[str, int]],
                       what: str = "padded problem size") -> Constraint:
    """The constraint that no block exceeds the size it tiles (`sizes(shape)`: block name -> size)
    padded to a power of two, and to the smallest block the space offers (a smaller problem still
    takes that one): a larger block only computes padding."""
    def blocks_fit_problem(config, shape, smem_bytes):
        for name, size in sizes(shape).items():
            padded = next_pow2(size, minimum=min(params[name]))
            if config[name] > padded:
                return f"{name}={config[name]} exceeds the {what} {padded}"
        return None
    return blocks_fit_problem


def splits_have_work(split: str, block: str, axis: int, axis_name: str) -> Constraint:
    """The constraint that the `split` programs sharing one reduction (split-K and its kin) each
    get at least one `block` of the shape's `axis`: more would only add zero partials."""
    def splits_have_work(config, shape, smem_bytes):
        tiles = max(1, -(-shape[axis] // config[block]))
        if config[split] > tiles:
            return f"{split}={config[split]} exceeds the {tiles} {axis_name} tiles of {axis_name}={shape[axis]}"
        return None
    return splits_have_work


def gemm_constraints(params: Mapping[str, Sequence[int]], shared_memory: Callable[[Mapping[str, int], Shape], SharedMemory],
                     *, accumulator: str) -> tuple[Constraint, ...]:
    """A tiled GEMM over shapes (M, N, K) with tunables BLOCK_M, BLOCK_N, BLOCK_K and num_warps:
    its `shared_memory(config, shape)` fits the device, its `accumulator` tile ("int32", "float32")
    [BLOCK_M, BLOCK_N] fits the registers, and no block exceeds the padded problem."""
    def fits_shared_memory(config, shape, smem_bytes):
        return fits(shared_memory(config, shape), smem_bytes)

    return (
        fits_shared_memory,
        registers_fit(f"{accumulator} accumulator", lambda config, shape: config["BLOCK_M"] * config["BLOCK_N"]),
        blocks_fit_problem(params, lambda shape: dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), shape))),
    )
