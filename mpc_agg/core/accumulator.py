"""A running sum of ring vectors in O(d) memory, reduced lazily.

docs/design.md, "A round, step by step": each accepted share is added to a running sum, so an
aggregator's
memory is O(d), not O(clients x d). In GF(p) the sum is folded once every
:data:`~mpc_agg.core.field.LAZY_ADDS` additions (see :mod:`mpc_agg.core.field` for the bound),
so most additions are one numpy ``+=``; in Z_(2^32) every addition is one ``+=`` that wraps
(:mod:`mpc_agg.core.ring`).

A vector may also arrive as consecutive blocks (:meth:`Accumulator.add_blocks`: a streamed
upload read back from its spool file, a seed expanded block by block; docs/design.md,
"Streamed uploads"): it still counts as one pending addition, so the lazy bound is the same,
and no d-sized temporary is made. Additions may come from several threads: each whole vector
is added under the accumulator's lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np

from mpc_agg.core.ring import GF_P61, Ring, RingArray


class Accumulator:
    """Running sum of canonical vectors of length ``dim`` in ``ring``.

    Invariant (GF(p)): every value of the internal array is ``<= 2**61 + 6 + pending * p``,
    with ``pending <= LAZY_ADDS``, so it never overflows 64 bits. Z_(2^32) needs none.
    ``damaged`` is True once a block-wise addition stopped part way (its blocks ran short or
    raised): the sum is then wrong and must never be revealed.
    """

    __slots__ = ("dim", "ring", "_acc", "_pending", "count", "damaged", "_lock", "_scratch")

    def __init__(self, dim: int, ring: Ring = GF_P61) -> None:
        self.dim = dim
        self.ring = ring
        self._acc: RingArray | None = ring.zeros(dim)
        self._pending = 0
        self.count = 0
        """Net number of vectors added (additions minus subtractions)."""
        self.damaged = False
        self._lock = threading.Lock()
        self._scratch: RingArray | None = None

    def __repr__(self) -> str:
        return f"Accumulator(dim={self.dim}, ring={self.ring.name}, count={self.count})"

    def _check(self, v: RingArray) -> None:
        if v.shape != (self.dim,):
            raise ValueError(f"vector has shape {v.shape}, accumulator dimension is {self.dim}")
        self._check_dtype(v)

    def _check_dtype(self, v: RingArray) -> None:
        if v.dtype != self.ring.dtype:
            raise ValueError(
                f"vector has dtype {v.dtype}, the accumulator sums {self.ring.name} elements "
                f"({np.dtype(self.ring.dtype)})"
            )

    def _array(self) -> RingArray:
        if self._acc is None:
            raise ValueError("the accumulator's sum was taken (see take)")
        return self._acc

    def _make_room(self, acc: RingArray) -> None:
        if self._pending >= self.ring.lazy_adds:
            self.ring.reduce(acc, out=acc)
            self._pending = 0

    def add(self, v: RingArray) -> None:
        """Add a canonical vector of length ``dim``."""
        self._check(v)
        with self._lock:
            acc = self._array()
            self._make_room(acc)
            np.add(acc, v, out=acc)
            self._pending += 1
            self.count += 1

    def subtract(self, v: RingArray) -> None:
        """Subtract a canonical vector of length ``dim`` (adds a value congruent to ``-v``
        and ``<= modulus``)."""
        self._check(v)
        with self._lock:
            acc = self._array()
            self._make_room(acc)
            acc += self.ring.lazy_neg(v)
            self._pending += 1
            self.count -= 1

    def add_blocks(self, blocks: Iterable[RingArray], *, subtract: bool = False) -> None:
        """Add (with ``subtract``, subtract) one canonical vector of length ``dim`` given as
        consecutive blocks from index 0 (any lengths summing to ``dim``).

        Counts as one pending addition whatever the number of blocks. Each block is used
        before the next is asked for (so a block may be a reused buffer). If the blocks
        raise, run short or overrun ``dim``, the error propagates (ValueError for a wrong
        length or dtype) and the accumulator is ``damaged``: part of the vector is in it.
        """
        with self._lock:
            acc = self._array()
            self._make_room(acc)
            self._pending += 1  # first: a partial addition counts against the lazy bound
            done = 0
            complete = False
            try:
                for v in blocks:
                    self._check_dtype(v)
                    n = int(v.shape[0]) if v.ndim == 1 else -1
                    if n < 0 or done + n > self.dim:
                        raise ValueError(
                            f"blocks of shape {v.shape} overrun the accumulator's dimension "
                            f"{self.dim} after {done} elements"
                        )
                    part = acc[done : done + n]
                    if subtract:
                        neg = self._neg_scratch(n)
                        self.ring.lazy_neg(v, out=neg)
                        np.add(part, neg, out=part)
                    else:
                        np.add(part, v, out=part)
                    done += n
                if done != self.dim:
                    raise ValueError(
                        f"blocks ended after {done} of the accumulator's {self.dim} elements"
                    )
                complete = True
            finally:
                if not complete:
                    self.damaged = True
            self.count += -1 if subtract else 1

    def _neg_scratch(self, n: int) -> RingArray:
        if self._scratch is None or self._scratch.shape[0] < n:
            self._scratch = self.ring.empty(n)
        return self._scratch[:n]

    def value(self) -> RingArray:
        """The canonical sum (a new array; the accumulator is unchanged)."""
        with self._lock:
            return self.ring.canonical(self._array().copy())

    def take(self) -> RingArray:
        """The canonical sum in the accumulator's own buffer (reduced in place, no copy);
        the accumulator holds nothing afterwards (every later call raises ValueError)."""
        with self._lock:
            acc = self._array()
            self._acc = None
            self._scratch = None
            return self.ring.canonical(acc, out=acc)
