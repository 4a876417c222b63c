"""A running sum of field vectors in O(d) memory, reduced lazily.

docs/design.md, "A round, step by step": each accepted share is added to a running sum, so an
aggregator's
memory is O(d), not O(clients x d). The sum is folded once every
:data:`~mpc_agg.core.field.LAZY_ADDS` additions (see :mod:`mpc_agg.core.field` for the bound),
so most additions are one numpy ``+=``.
"""

from __future__ import annotations

import numpy as np

from mpc_agg.core import field
from mpc_agg.core.field import LAZY_ADDS, FieldArray


class Accumulator:
    """Running sum of canonical vectors of length ``dim``.

    Invariant: every value of the internal array is ``<= 2**61 + 6 + pending * p``,
    with ``pending <= LAZY_ADDS``, so it never overflows 64 bits.
    """

    __slots__ = ("dim", "_acc", "_pending", "count")

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._acc = field.zeros(dim)
        self._pending = 0
        self.count = 0
        """Net number of vectors added (additions minus subtractions)."""

    def __repr__(self) -> str:
        return f"Accumulator(dim={self.dim}, count={self.count})"

    def _make_room(self) -> None:
        if self._pending == LAZY_ADDS:
            field.fold(self._acc, out=self._acc)
            self._pending = 0

    def add(self, v: FieldArray) -> None:
        """Add a canonical vector of length ``dim``."""
        if v.shape != (self.dim,):
            raise ValueError(f"vector has shape {v.shape}, accumulator dimension is {self.dim}")
        self._make_room()
        np.add(self._acc, v, out=self._acc)
        self._pending += 1
        self.count += 1

    def subtract(self, v: FieldArray) -> None:
        """Subtract a canonical vector of length ``dim`` (adds ``p - v``, which is ``<= p``)."""
        if v.shape != (self.dim,):
            raise ValueError(f"vector has shape {v.shape}, accumulator dimension is {self.dim}")
        self._make_room()
        self._acc += np.uint64(field.P) - v
        self._pending += 1
        self.count -= 1

    def value(self) -> FieldArray:
        """The canonical sum (a new array; the accumulator is unchanged)."""
        return field.canonical(self._acc.copy())
