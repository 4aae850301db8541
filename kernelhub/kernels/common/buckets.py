"""Shape buckets and the nearest-bucket distance, as every family defines them.

A bucket rounds the axes that vary per call (tokens, context length, batch) up to a power of
two and keeps the axes the model fixes exact. When no config is stored for a call's own bucket,
`kernelhub.configs` reuses the stored bucket of the smallest `bucket_distance`: buckets equal on
the exact axes, fewest doublings away on the varying ones, at most `MAX_DOUBLINGS` in total; on a
tie, the larger one (its tiles and splits were chosen for more work, which wastes less on a
smaller problem than the reverse costs), encoded as a bonus subtracted from the distance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from kernelhub.kernels.common.sizes import next_pow2

Shape = tuple[int, ...]

MAX_DOUBLINGS = 2
LARGER_BONUS = 0.25  # below one doubling: it only breaks ties


def pow2_bucket(shape: Sequence[int], axes: Sequence[int]) -> Shape:
    """`shape` with the sizes at `axes` rounded up to powers of two: `pow2_bucket((7, 96), (0,)) == (8, 96)`."""
    return tuple(next_pow2(size) if axis in axes else size for axis, size in enumerate(shape))


def doublings(a: int, b: int) -> float:
    """How many times `a` doubles (or halves) to reach `b`."""
    return abs(math.log2(a) - math.log2(b))


def doubling_distance(a: Shape, b: Shape, axes: Sequence[int], *, weights: Mapping[int, float] | None = None,
                      max_doublings: float = MAX_DOUBLINGS, bonus: float = LARGER_BONUS) -> float | None:
    """Distance from bucket `a` to bucket `b`: the doublings between them on `axes`, None beyond
    `max_doublings`; plus `weight` per doubling on each axis of `weights` (axes that move no work,
    never disqualifying); minus `bonus` when `b` is the larger problem on `axes`. None where they
    differ on any other axis."""
    weights = weights or {}
    if any(a[i] != b[i] for i in range(len(a)) if i not in axes and i not in weights):
        return None
    distance = sum(doublings(a[i], b[i]) for i in axes)
    if distance > max_doublings:
        return None
    larger = math.prod(b[i] for i in axes) > math.prod(a[i] for i in axes)
    return distance + sum(w * doublings(a[i], b[i]) for i, w in weights.items()) - (bonus if larger else 0.0)
