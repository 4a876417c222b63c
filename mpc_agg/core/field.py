"""Vector arithmetic in GF(p), p = 2**61 - 1, on numpy ``uint64`` arrays.

docs/design.md, "Cryptographic core" (field). Elements are stored as ``uint64``. An array is
*canonical* when every value is in ``[0, p)``; the wire and the public functions speak only
canonical values. Internally, sums may be *lazy*: ``fold`` maps any ``uint64`` ``x`` to
``(x & p) + (x >> 61)``, which is congruent to ``x`` mod p (since ``2**61 = 1 mod p``) and at
most ``2**61 + 6``. After a fold, seven more values ``<= p`` can be added without leaving 64
bits: ``2**61 + 6 + 7 * (2**61 - 1) = 2**64 - 1`` (see :data:`LAZY_ADDS`).

No function loops over elements in Python (long vectors are processed in blocks of
:data:`BLOCK` elements), and none branches per element.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

P: int = 2**61 - 1
"""The field order, the Mersenne prime 2**61 - 1."""

HALF: int = P // 2
"""Canonical values above HALF encode negatives (``v`` stands for ``v - p``)."""

LAZY_ADDS: int = 7
"""How many values ``<= p`` may be added to a folded array before it must be folded again."""

_P64 = np.uint64(P)
_S61 = np.uint64(61)
_ONE = np.uint64(1)

FieldArray = npt.NDArray[np.uint64]


def zeros(d: int) -> FieldArray:
    """The zero vector of length ``d``."""
    return np.zeros(d, dtype=np.uint64)


BLOCK: int = 1 << 16
"""Elements per block in :func:`fold` and :func:`canonical` (512 KiB: stays in L2 cache)."""


def fold_into(src: FieldArray, dst: FieldArray, hi: FieldArray) -> None:
    """``dst = (src & p) + (src >> 61)`` for one block; ``hi`` is scratch of the same size."""
    np.right_shift(src, _S61, out=hi)
    np.bitwise_and(src, _P64, out=dst)
    dst += hi


def fold(x: FieldArray, out: FieldArray | None = None) -> FieldArray:
    """Partially reduce: result is congruent to ``x`` mod p and ``<= 2**61 + 6``.

    Works block by block with one small scratch buffer, so a 10^7-element fold allocates no
    80 MB temporary (``out=x`` folds in place). ``x`` is a 1-D vector.
    """
    if out is None:
        out = np.empty_like(x)
    hi = np.empty(min(x.size, BLOCK), dtype=np.uint64)
    for start in range(0, x.size, BLOCK):
        stop = min(start + BLOCK, x.size)
        fold_into(x[start:stop], out[start:stop], hi[: stop - start])
    return out


def canonical(x: FieldArray, out: FieldArray | None = None) -> FieldArray:
    """Fully reduce any ``uint64`` array to ``[0, p)``.

    Two folds bring every value to ``[0, p]``; then ``fold(v + 1) - 1`` maps ``p`` to 0 and
    leaves smaller values alone, without a per-element branch. All of it runs block by block
    while the block is in cache. ``x`` is a 1-D vector.
    """
    if out is None:
        out = np.empty_like(x)
    hi = np.empty(min(x.size, BLOCK), dtype=np.uint64)
    for start in range(0, x.size, BLOCK):
        stop = min(start + BLOCK, x.size)
        o, h = out[start:stop], hi[: stop - start]
        fold_into(x[start:stop], o, h)
        fold_into(o, o, h)  # now in [0, p]
        o += _ONE  # in [1, p + 1] = [1, 2**61]
        fold_into(o, o, h)  # p + 1 -> 1, others unchanged
        o -= _ONE
    return out


def is_canonical(x: FieldArray) -> bool:
    """True when every value is in ``[0, p)`` (an empty array is canonical)."""
    return x.size == 0 or int(x.max()) < P


def add(a: FieldArray, b: FieldArray) -> FieldArray:
    """``a + b`` mod p for canonical inputs; canonical result."""
    return canonical(a + b)


def neg(a: FieldArray) -> FieldArray:
    """``-a`` mod p for a canonical input; canonical result."""
    return canonical(_P64 - a)


def sub(a: FieldArray, b: FieldArray) -> FieldArray:
    """``a - b`` mod p for canonical inputs; canonical result."""
    return canonical(a + (_P64 - b))


def from_signed(v: npt.NDArray[np.int64], out: FieldArray | None = None) -> FieldArray:
    """Embed signed integers with ``|v| < p/2`` in GF(p): negative ``v`` becomes ``p + v``.

    Branch-free: ``v >> 63`` is all ones exactly for negative ``v``, so ``p & (v >> 63)``
    adds ``p`` to those values (the ``uint64`` addition wraps ``2**64 + v + p`` to ``p + v``).
    ``out`` may be ``v.view(np.uint64)`` to embed in place.
    """
    v = np.asarray(v, dtype=np.int64)
    mask = np.right_shift(v, 63).view(np.uint64)
    mask &= _P64
    return np.add(v.view(np.uint64), mask, out=out)


def to_signed(x: FieldArray) -> npt.NDArray[np.int64]:
    """Inverse of :func:`from_signed` for canonical ``x``: values above p/2 become negative."""
    x = np.asarray(x, dtype=np.uint64)
    # (HALF - x) >> 63 as int64 is -1 (all ones) exactly when x > HALF.
    neg_mask = np.right_shift((np.uint64(HALF) - x).view(np.int64), 63).view(np.uint64)
    signed: npt.NDArray[np.int64] = (x - (neg_mask & _P64)).view(np.int64)
    return signed


def sum_vectors(vectors: list[FieldArray]) -> FieldArray:
    """Sum of canonical vectors of one length, with lazy reduction; canonical result."""
    if not vectors:
        raise ValueError("sum_vectors needs at least one vector")
    acc = vectors[0].copy()
    pending = 0
    for v in vectors[1:]:
        if pending == LAZY_ADDS:
            fold(acc, out=acc)
            pending = 0
        acc += v
        pending += 1
    return canonical(acc, out=acc)
