"""Search spaces: tunable values plus the restrictions a real GPU imposes.

A config is a plain `dict[str, int]` (JSON in the database). A space validates configs read from
anywhere (database, import file, user), enumerates and samples its feasible configs, and drives
Optuna's suggestions, so every consumer agrees on what a legal config is.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from kernelhub.errors import InvalidConfigError

Config = dict[str, int]

# A constraint looks at (config, shape, shared-memory limit in bytes) and returns the reason the
# config is infeasible, or None when it is fine.
Constraint = Callable[[Mapping[str, int], tuple[int, ...], int], "str | None"]


@dataclass(frozen=True)
class SearchSpace:
    """Named tunables, each with its finite choices, and the constraints between them."""

    params: Mapping[str, Sequence[int]]
    constraints: Sequence[Constraint] = field(default_factory=tuple)

    def validate(self, config: Mapping, *, source: str = "config") -> Config:
        """Return `config` as a clean dict, or raise InvalidConfigError naming what is wrong.

        Shape-independent: use `infeasibility` for the constraints that depend on the shape.
        """
        if not isinstance(config, Mapping):
            raise InvalidConfigError(f"{source}: expected a mapping of tunables, got {type(config).__name__}")
        missing = sorted(set(self.params) - set(config))
        unknown = sorted(set(config) - set(self.params))
        if missing or unknown:
            raise InvalidConfigError(f"{source}: missing keys {missing}, unknown keys {unknown}")
        clean: Config = {}
        for name, choices in self.params.items():
            value = config[name]
            if isinstance(value, bool) or not isinstance(value, int) or value not in choices:
                raise InvalidConfigError(f"{source}: {name}={value!r} is not one of {list(choices)}")
            clean[name] = value
        return clean

    def infeasibility(self, config: Mapping[str, int], shape: tuple[int, ...], smem_bytes: int) -> str | None:
        """Why `config` cannot run `shape` on a device with `smem_bytes` of shared memory, or None."""
        for constraint in self.constraints:
            reason = constraint(config, shape, smem_bytes)
            if reason is not None:
                return reason
        return None

    def configs(self) -> Iterator[Config]:
        """Every combination of values, feasible or not, in a fixed order."""
        names = list(self.params)
        for values in itertools.product(*(self.params[n] for n in names)):
            yield dict(zip(names, values))

    def feasible(self, shape: tuple[int, ...], smem_bytes: int) -> list[Config]:
        return [c for c in self.configs() if self.infeasibility(c, shape, smem_bytes) is None]

    def sample(self, n: int, shape: tuple[int, ...], smem_bytes: int, seed: int = 0) -> list[Config]:
        """Up to `n` distinct feasible configs, drawn reproducibly."""
        pool = self.feasible(shape, smem_bytes)
        return random.Random(seed).sample(pool, min(n, len(pool)))

    def suggest(self, trial) -> Config:
        """Ask an Optuna trial for one value of every tunable."""
        return {name: trial.suggest_categorical(name, list(choices)) for name, choices in self.params.items()}

    def fingerprint(self) -> str:
        """Stable digest of the tunables and their choices (part of a family's kernel version)."""
        text = json.dumps({k: list(v) for k, v in self.params.items()}, sort_keys=True)
        text += "".join(getattr(c, "__qualname__", repr(c)) for c in self.constraints)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
