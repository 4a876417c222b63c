"""The ring share values live in: GF(2^61 - 1) on ``uint64`` or Z_(2^32) on ``uint32``.

docs/design.md, "Cryptographic core" (rings). Sharing, accumulation, the codecs and the
reveal are written once against :class:`Ring`; the two instances differ only in what is
below:

========================  ==============================  ================================
                          :data:`GF_P61` (``gf_p61``)      :data:`Z2_32` (``z2_32``)
========================  ==============================  ================================
element, wire             ``uint64``, ``<u8``             ``uint32``, ``<u4``
modulus                   ``p = 2**61 - 1``               ``2**32``
canonical                 ``< p`` (checked on upload)     every ``uint32``
lazy sums                 7 additions, then a fold        wrap-around, never reduced
negation                  ``p - v``                       ``2**32 - v`` (numpy wraps)
signed range (``limit``)  ``|v| < p // 2``                ``-2**31 <= v < 2**31``
seed expansion            61-bit words, reject ``p``      4-byte words as they come
========================  ==============================  ================================

A sum of signed values is recovered exactly from its ring element as long as its absolute
value stays below :attr:`Ring.limit` (the *centered lift*: values in the upper half stand
for negatives); :meth:`~mpc_agg.core.encoding.FixedPointEncoding.check_headroom` proves
that bound for ``max_clients`` clients plus the noise tail.

Functions take 1-D arrays of the ring's dtype; none loops over elements in Python.
"""

from __future__ import annotations

import abc
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from mpc_agg.core import field, xof

RingArray = npt.NDArray[np.unsignedinteger[Any]]
"""A vector of ring elements (``uint64`` for GF(p), ``uint32`` for Z_(2^32))."""

SignedArray = npt.NDArray[np.int64]


class WordBlocks(Protocol):
    """A seed's expansion, block by block (:class:`~mpc_agg.core.xof.BlockStream`,
    :class:`~mpc_agg.core.xof.WordStream`): the next ``n`` elements, or None if the block
    holds a rejected word."""

    def next_block(self, n: int) -> RingArray | None: ...


class Ring(abc.ABC):
    """One ring of share values; use the instances :data:`GF_P61` and :data:`Z2_32`.

    ``name`` is the YAML value of ``encoding.ring``; ``code`` the byte naming the ring in
    share and result headers; ``limit`` bounds the absolute value of a signed sum that
    :meth:`to_signed` recovers exactly; ``lazy_adds`` is how many values ``<= modulus`` may be
    added to a :meth:`reduce`-d array before it must be reduced again.
    """

    name: str
    code: int
    dtype: type[np.unsignedinteger[Any]]
    modulus: int
    limit: int
    limit_text: str
    lazy_adds: int

    def __repr__(self) -> str:
        return f"Ring({self.name})"

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire."""
        return int(np.dtype(self.dtype).itemsize)

    @property
    def wire(self) -> str:
        """The little-endian numpy dtype of the wire format (``'<u8'``, ``'<u4'``)."""
        return f"<u{self.itemsize}"

    def zeros(self, d: int) -> RingArray:
        """The zero vector of length ``d``."""
        return np.zeros(d, dtype=self.dtype)

    def empty(self, d: int) -> RingArray:
        """An uninitialised vector of length ``d``."""
        return np.empty(d, dtype=self.dtype)

    def from_wire(self, buf: Any, offset: int, count: int) -> RingArray:
        """A view of ``count`` elements of ``buf`` from byte ``offset`` (no copy on a
        little-endian machine); values are not checked (see :meth:`noncanonical_index`)."""
        view = np.frombuffer(buf, dtype=self.wire, offset=offset, count=count)
        return view if sys.byteorder == "little" else view.astype(self.dtype)

    def to_wire(self, x: RingArray) -> bytes:
        """``x`` as little-endian bytes."""
        return np.ascontiguousarray(x, dtype=self.wire).tobytes()

    # -- what each ring defines

    @abc.abstractmethod
    def noncanonical_index(self, x: RingArray) -> int | None:
        """The first index of ``x`` holding a value that is not an element, or None."""

    @abc.abstractmethod
    def canonical(self, x: RingArray, out: RingArray | None = None) -> RingArray:
        """``x`` fully reduced (any array :meth:`reduce` or lazy sums produced)."""

    @abc.abstractmethod
    def reduce(self, x: RingArray, out: RingArray | None = None) -> RingArray:
        """``x`` partly reduced, so that ``lazy_adds`` more values ``<= modulus`` fit."""

    @abc.abstractmethod
    def lazy_neg(self, v: RingArray, out: RingArray | None = None) -> RingArray:
        """A value congruent to ``-v`` and ``<= modulus``, for canonical ``v``."""

    @abc.abstractmethod
    def from_signed(self, v: SignedArray, out: RingArray | None = None) -> RingArray:
        """Embed signed integers (``|v| < limit``): negatives become ``modulus + v``."""

    @abc.abstractmethod
    def to_signed(self, x: RingArray) -> SignedArray:
        """The centered lift of canonical ``x``: inverse of :meth:`from_signed`."""

    @abc.abstractmethod
    def expand(self, seed: bytes, context: bytes, d: int) -> RingArray:
        """``d`` uniform elements from ``seed`` in ``context`` (see :mod:`mpc_agg.core.xof`)."""

    @abc.abstractmethod
    def blocks(self, seed: bytes, context: bytes, block: int) -> WordBlocks:
        """The stream of :meth:`expand` block by block; ``None`` for a block that holds a
        rejected word (GF(p) only), after which only :meth:`expand` defines the elements."""

    # -- generic

    def is_canonical(self, x: RingArray) -> bool:
        """True when every value of ``x`` is an element of the ring."""
        return self.noncanonical_index(x) is None

    def add(self, a: RingArray, b: RingArray) -> RingArray:
        """``a + b`` for canonical inputs; canonical result."""
        return self.canonical(a + b)

    def neg(self, a: RingArray) -> RingArray:
        """``-a`` for a canonical input; canonical result."""
        return self.canonical(self.lazy_neg(a))

    def sub(self, a: RingArray, b: RingArray) -> RingArray:
        """``a - b`` for canonical inputs; canonical result."""
        return self.canonical(a + self.lazy_neg(b))

    def sum_vectors(self, vectors: Sequence[RingArray]) -> RingArray:
        """Sum of canonical vectors of one length, reduced lazily; canonical result."""
        if not vectors:
            raise ValueError("sum_vectors needs at least one vector")
        acc = np.array(vectors[0], dtype=self.dtype, copy=True)
        pending = 0
        for v in vectors[1:]:
            if pending >= self.lazy_adds:
                self.reduce(acc, out=acc)
                pending = 0
            acc += np.asarray(v, dtype=self.dtype)
            pending += 1
        return self.canonical(acc, out=acc)


class _PrimeField61(Ring):
    """GF(p), p = 2**61 - 1 (:mod:`mpc_agg.core.field`)."""

    name = "gf_p61"
    code = 0
    dtype = np.uint64
    modulus = field.P
    limit = field.HALF
    limit_text = f"p/2 = {field.HALF:.3e}"
    lazy_adds = field.LAZY_ADDS

    def noncanonical_index(self, x: RingArray) -> int | None:
        if field.is_canonical(x):
            return None
        return int(np.flatnonzero(x >= np.uint64(field.P))[0])

    def canonical(self, x: RingArray, out: RingArray | None = None) -> RingArray:
        return field.canonical(x, out)

    def reduce(self, x: RingArray, out: RingArray | None = None) -> RingArray:
        return field.fold(x, out)

    def lazy_neg(self, v: RingArray, out: RingArray | None = None) -> RingArray:
        negated: RingArray = np.subtract(np.uint64(field.P), v, out=out)  # p - v, in [1, p]
        return negated

    def from_signed(self, v: SignedArray, out: RingArray | None = None) -> RingArray:
        return field.from_signed(v, out)

    def to_signed(self, x: RingArray) -> SignedArray:
        return field.to_signed(x)

    def expand(self, seed: bytes, context: bytes, d: int) -> RingArray:
        return xof.expand(seed, context, d)

    def blocks(self, seed: bytes, context: bytes, block: int) -> WordBlocks:
        return xof.BlockStream(xof.derive_key(seed, context), block)


class _Ring2_32(Ring):
    """Z_(2^32): numpy's ``uint32`` arithmetic wraps modulo 2**32 by itself."""

    name = "z2_32"
    code = 1
    dtype = np.uint32
    modulus = 2**32
    limit = 2**31
    limit_text = "2^31"
    lazy_adds = sys.maxsize  # no reduction is ever needed

    def noncanonical_index(self, x: RingArray) -> int | None:
        return None  # every uint32 is an element

    def canonical(self, x: RingArray, out: RingArray | None = None) -> RingArray:
        if out is None:
            return x
        if out is not x:
            np.copyto(out, x)
        return out

    def reduce(self, x: RingArray, out: RingArray | None = None) -> RingArray:
        return self.canonical(x, out)

    def lazy_neg(self, v: RingArray, out: RingArray | None = None) -> RingArray:
        negated: RingArray = np.negative(v, out=out)  # 2**32 - v, wrapping 0 to 0
        return negated

    def from_signed(self, v: SignedArray, out: RingArray | None = None) -> RingArray:
        if out is None:
            out = np.empty(np.shape(v), dtype=np.uint32)
        np.copyto(out, v, casting="unsafe")  # C's conversion to unsigned: modulo 2**32
        return out

    def to_signed(self, x: RingArray) -> SignedArray:
        lifted: SignedArray = np.asarray(x, dtype=np.uint32).view(np.int32).astype(np.int64)
        return lifted

    def expand(self, seed: bytes, context: bytes, d: int) -> RingArray:
        return xof.expand_u32(seed, context, d)

    def blocks(self, seed: bytes, context: bytes, block: int) -> WordBlocks:
        return xof.WordStream(xof.derive_key(seed, context, xof.DOMAIN_Z2_32), block)


GF_P61: Ring = _PrimeField61()
"""GF(2**61 - 1), 8-byte elements: the default."""

Z2_32: Ring = _Ring2_32()
"""Z_(2^32), 4-byte elements (``encoding: {ring: z2_32}``)."""

RINGS: dict[str, Ring] = {r.name: r for r in (GF_P61, Z2_32)}
"""Every ring by its YAML name."""


def ring_named(name: object) -> Ring:
    """The ring called ``name``; ValueError naming the choices otherwise."""
    ring = RINGS.get(name) if isinstance(name, str) else None
    if ring is None:
        raise ValueError(f"expected one of {', '.join(RINGS)}, got {name!r}")
    return ring


def ring_by_code(code: int) -> Ring | None:
    """The ring whose header byte is ``code``, or None."""
    return next((r for r in RINGS.values() if r.code == code), None)


def ring_of(x: npt.NDArray[Any]) -> Ring:
    """The ring whose elements have ``x``'s dtype; ValueError for any other dtype."""
    for ring in RINGS.values():  # either byte order: the wire format is fixed anyway
        if x.dtype.kind == "u" and x.dtype.itemsize == ring.itemsize:
            return ring
    raise ValueError(f"a vector of ring elements is uint64 or uint32, got {x.dtype}")
