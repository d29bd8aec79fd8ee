"""Which arrays a cache was built from, by weak reference.

Caches of values derived from weights (the FiLM tables, the sampler's weight dtype) are valid while the
module still holds the very arrays they were built from: MLX's ``update`` and loads swap a module's
arrays rather than write into them, and tracing a compiled function gives them new objects. Weak
references keep a cache from holding replaced weights alive.
"""

from __future__ import annotations

import weakref

import mlx.core as mx


class SeenArrays:
    def __init__(self) -> None:
        self._refs: list[weakref.ref] = []

    def same(self, arrays: list[mx.array]) -> bool:
        """True while ``arrays`` are, one for one, the arrays last remembered."""
        return len(self._refs) == len(arrays) and all(
            ref() is a for ref, a in zip(self._refs, arrays, strict=True)
        )

    def remember(self, arrays: list[mx.array]) -> None:
        self._refs = [weakref.ref(a) for a in arrays]
