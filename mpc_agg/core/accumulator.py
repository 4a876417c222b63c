"""A running sum of ring vectors in O(d) memory, reduced lazily.

docs/design.md, "A round, step by step": each accepted share is added to a running sum, so an
aggregator's
memory is O(d), not O(clients x d). In GF(p) the sum is folded once every
:data:`~mpc_agg.core.field.LAZY_ADDS` additions (see :mod:`mpc_agg.core.field` for the bound),
so most additions are one numpy ``+=``; in Z_(2^32) every addition is one ``+=`` that wraps
(:mod:`mpc_agg.core.ring`).
"""

from __future__ import annotations

import numpy as np

from mpc_agg.core.ring import GF_P61, Ring, RingArray


class Accumulator:
    """Running sum of canonical vectors of length ``dim`` in ``ring``.

    Invariant (GF(p)): every value of the internal array is ``<= 2**61 + 6 + pending * p``,
    with ``pending <= LAZY_ADDS``, so it never overflows 64 bits. Z_(2^32) needs none.
    """

    __slots__ = ("dim", "ring", "_acc", "_pending", "count")

    def __init__(self, dim: int, ring: Ring = GF_P61) -> None:
        self.dim = dim
        self.ring = ring
        self._acc = ring.zeros(dim)
        self._pending = 0
        self.count = 0
        """Net number of vectors added (additions minus subtractions)."""

    def __repr__(self) -> str:
        return f"Accumulator(dim={self.dim}, ring={self.ring.name}, count={self.count})"

    def _check(self, v: RingArray) -> None:
        if v.shape != (self.dim,):
            raise ValueError(f"vector has shape {v.shape}, accumulator dimension is {self.dim}")
        if v.dtype != self.ring.dtype:
            raise ValueError(
                f"vector has dtype {v.dtype}, the accumulator sums {self.ring.name} elements "
                f"({np.dtype(self.ring.dtype)})"
            )

    def _make_room(self) -> None:
        if self._pending >= self.ring.lazy_adds:
            self.ring.reduce(self._acc, out=self._acc)
            self._pending = 0

    def add(self, v: RingArray) -> None:
        """Add a canonical vector of length ``dim``."""
        self._check(v)
        self._make_room()
        np.add(self._acc, v, out=self._acc)
        self._pending += 1
        self.count += 1

    def subtract(self, v: RingArray) -> None:
        """Subtract a canonical vector of length ``dim`` (adds a value congruent to ``-v``
        and ``<= modulus``)."""
        self._check(v)
        self._make_room()
        self._acc += self.ring.lazy_neg(v)
        self._pending += 1
        self.count -= 1

    def value(self) -> RingArray:
        """The canonical sum (a new array; the accumulator is unchanged)."""
        return self.ring.canonical(self._acc.copy())
