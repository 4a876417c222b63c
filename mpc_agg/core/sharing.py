"""Additive sharing with seed-compressed shares.

docs/design.md, "Cryptographic core" (additive sharing with seed compression) (the ``shard`` step
of Prio3,
draft-irtf-cfrg-vdaf section 7.2, without proofs). For ``m`` aggregators a client draws
``m - 1`` fresh seeds; aggregator ``j``'s share is ``expand(seed_j, context(round, client, j))``
except for one aggregator, which gets the *full* share ``x - sum of the others``. Only that
one receives ``d`` elements (``8 d`` bytes in GF(p), ``4 d`` in Z_(2^32)); the others receive
16 bytes. The arithmetic is the :class:`~mpc_agg.core.ring.Ring`'s, the same code for both
rings. Which aggregator gets the full share
rotates by client (:func:`full_share_index`), balancing load. The seeds come from the OS
CSPRNG, or, for a client with a secret, from ``seed_for`` (derived, so reproducible after a
restart; see :class:`~mpc_agg.core.xof.ClientSecret`).

Any ``m - 1`` shares are jointly uniform and independent of ``x``; all ``m`` sum to ``x``.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mpc_agg.core import field
from mpc_agg.core.ring import GF_P61, Ring, RingArray
from mpc_agg.core.xof import SEED_BYTES, share_context


class ShareKind(enum.IntEnum):
    """How a share is carried: the whole vector, or a seed the aggregator expands."""

    FULL = 0
    SEED = 1


@dataclass(frozen=True, repr=False, eq=False)
class Share:
    """One aggregator's additive share of one client's vector.

    ``vector`` is set for FULL shares (canonical, length ``dim``, of ``ring``'s dtype),
    ``seed`` for SEED shares. The repr shows only kind and size: share contents never reach
    logs.
    """

    aggregator: int
    kind: ShareKind
    dim: int
    vector: RingArray | None = None
    seed: bytes | None = None
    ring: Ring = GF_P61

    def __post_init__(self) -> None:
        if self.kind is ShareKind.FULL:
            if self.vector is None or self.vector.shape != (self.dim,) or self.seed is not None:
                raise ValueError("a FULL share carries exactly one vector of length dim")
            if self.vector.dtype != self.ring.dtype:
                raise ValueError(
                    f"a FULL share in {self.ring.name} holds {np.dtype(self.ring.dtype)}, "
                    f"got {self.vector.dtype}"
                )
        elif self.seed is None or len(self.seed) != SEED_BYTES or self.vector is not None:
            raise ValueError(f"a SEED share carries exactly one {SEED_BYTES}-byte seed")

    def __repr__(self) -> str:
        size = f"{self.dim} elements" if self.kind is ShareKind.FULL else f"{SEED_BYTES}-byte seed"
        return f"Share(aggregator={self.aggregator}, kind={self.kind.name}, {size})"

    def expand(self, round_id: str, client_id: str) -> RingArray:
        """This share as a vector of ring elements of length ``dim``.

        A SEED share expands in the context (round, client, this aggregator); a FULL share
        is returned as is.
        """
        if self.kind is ShareKind.FULL:
            assert self.vector is not None
            return self.vector
        assert self.seed is not None
        context = share_context(round_id, client_id, self.aggregator)
        return self.ring.expand(self.seed, context, self.dim)


def full_share_index(client_id: str, m: int) -> int:
    """The aggregator that receives ``client_id``'s full share: a hash of the id mod ``m``."""
    digest = hashlib.sha256(b"mpc_agg/full-share/v1" + client_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % m


def shard(
    x: RingArray,
    round_id: str,
    client_id: str,
    m: int,
    *,
    full_index: int | None = None,
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    seed_for: Callable[[int, int], bytes] | None = None,
    ring: Ring = GF_P61,
) -> list[Share]:
    """Split canonical ``x`` (elements of ``ring``) into ``m`` additive shares, one per
    aggregator (index order).

    ``random_bytes`` is the seed source (the OS CSPRNG unless a test injects one).
    ``seed_for(aggregator, attempt)``, if given, replaces it: the seed of ``aggregator``'s
    share at ``attempt`` 0, 1, ... (a further attempt only after a rejected stream); it must
    be a PRF of its arguments, e.g. :meth:`~mpc_agg.core.xof.ClientSecret.seed`.
    ``full_index`` overrides the rotation of :func:`full_share_index`. ``x`` is unchanged;
    see :func:`shard_in_place` to build the full share in ``x``'s own memory.
    """
    return shard_in_place(  # which checks x (a copy keeps its dtype and shape)
        x.copy(),
        round_id,
        client_id,
        m,
        full_index=full_index,
        random_bytes=random_bytes,
        seed_for=seed_for,
        ring=ring,
    )


def shard_in_place(
    acc: RingArray,
    round_id: str,
    client_id: str,
    m: int,
    *,
    full_index: int | None = None,
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    seed_for: Callable[[int, int], bytes] | None = None,
    ring: Ring = GF_P61,
) -> list[Share]:
    """:func:`shard`, turning canonical ``acc`` itself into the full share (no copy).

    Each seed's expansion is subtracted block by block while the block is in cache, so no
    vector-sized temporary is made. If a seed's stream holds the rejected word (probability
    about ``d * 2**-61``), its subtraction is undone and another seed is drawn: seeds are
    uniform among those whose first ``d`` words are all below p, which makes the expansion
    exactly uniform on GF(p)^d, as rejection sampling would. With ``seed_for``, the next
    seed is ``seed_for(j, attempt + 1)``: the same argument, over the PRF's outputs. In
    Z_(2^32) no word is rejected and every seed is kept.
    """
    if m < 2:
        raise ValueError(f"sharing needs m >= 2 aggregators, got {m}")
    if acc.dtype != ring.dtype or acc.ndim != 1:
        raise ValueError(
            f"x must be a 1-D {np.dtype(ring.dtype)} vector of {ring.name} elements, got "
            f"{acc.dtype} of shape {acc.shape}"
        )
    if not ring.is_canonical(acc):
        raise ValueError(f"x must be canonical (every value an element of {ring.name})")
    d = int(acc.shape[0])
    full = full_share_index(client_id, m) if full_index is None else full_index
    if not 0 <= full < m:
        raise ValueError(f"full_index must be in 0..{m - 1}, got {full}")
    shares: list[Share | None] = [None] * m
    last = max(j for j in range(m) if j != full)
    for j in range(m):
        if j == full:
            continue
        context = share_context(round_id, client_id, j)
        attempt = 0
        while True:
            seed = random_bytes(SEED_BYTES) if seed_for is None else seed_for(j, attempt)
            attempt += 1
            # The last pass leaves each block canonical while it is in cache.
            if _subtract_expansion(ring, acc, seed, context, finish=j == last):
                break
        shares[j] = Share(j, ShareKind.SEED, d, seed=seed, ring=ring)
    shares[full] = Share(full, ShareKind.FULL, d, vector=acc, ring=ring)
    return [s for s in shares if s is not None]


def _subtract_expansion(
    ring: Ring, acc: RingArray, seed: bytes, context: bytes, *, finish: bool = False
) -> bool:
    """``acc -= expand(seed)`` block by block, keeping every value reduced (canonical with
    ``finish``); False, with ``acc`` as it was in the ring (and reduced), if the stream
    holds a rejected word."""
    done = _apply_expansion(ring, acc, seed, context, subtract=True, finish=finish)
    if done < acc.shape[0]:  # undo the blocks subtracted
        _apply_expansion(ring, acc[:done], seed, context, subtract=False)
        return False
    return True


def _apply_expansion(
    ring: Ring,
    acc: RingArray,
    seed: bytes,
    context: bytes,
    *,
    subtract: bool,
    finish: bool = False,
) -> int:
    """Add (or subtract) ``seed``'s stream to ``acc`` block by block, reducing after each
    block (to canonical with ``finish``); stops before a block holding a rejected word.
    Returns how many elements it did."""
    d = int(acc.shape[0])
    stream = ring.blocks(seed, context, min(d, field.BLOCK))
    for start in range(0, d, field.BLOCK):
        stop = min(start + field.BLOCK, d)
        words = stream.next_block(stop - start)
        if words is None:
            return start
        if subtract:
            ring.lazy_neg(words, out=words)  # congruent to -v, <= modulus
        a = acc[start:stop]
        a += words
        if finish:
            ring.canonical(a, out=a)
        else:
            ring.reduce(a, out=a)
    return d


def unshard(vectors: list[RingArray], ring: Ring = GF_P61) -> RingArray:
    """Recombine expanded shares (or per-aggregator sums) into the secret: their sum."""
    return ring.sum_vectors([np.asarray(v, dtype=ring.dtype) for v in vectors])
