"""Additive sharing with seed-compressed shares.

DESIGN.md, "Additive sharing with seed compression" (the ``shard`` step of Prio3,
draft-irtf-cfrg-vdaf section 7.2, without proofs). For ``m`` aggregators a client draws
``m - 1`` fresh seeds; aggregator ``j``'s share is ``expand(seed_j, context(round, client, j))``
except for one aggregator, which gets the *full* share ``x - sum of the others``. Only that
one receives ``8 d`` bytes; the others receive 16. Which aggregator gets the full share
rotates by client (:func:`full_share_index`), balancing load.

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
from mpc_agg.core.field import FieldArray
from mpc_agg.core.xof import SEED_BYTES, expand, share_context

_P64 = np.uint64(field.P)


class ShareKind(enum.IntEnum):
    """How a share is carried: the whole vector, or a seed the aggregator expands."""

    FULL = 0
    SEED = 1


@dataclass(frozen=True, repr=False, eq=False)
class Share:
    """One aggregator's additive share of one client's vector.

    ``vector`` is set for FULL shares (canonical, length ``dim``), ``seed`` for SEED shares.
    The repr shows only kind and size: share contents never reach logs.
    """

    aggregator: int
    kind: ShareKind
    dim: int
    vector: FieldArray | None = None
    seed: bytes | None = None

    def __post_init__(self) -> None:
        if self.kind is ShareKind.FULL:
            if self.vector is None or self.vector.shape != (self.dim,) or self.seed is not None:
                raise ValueError("a FULL share carries exactly one vector of length dim")
        elif self.seed is None or len(self.seed) != SEED_BYTES or self.vector is not None:
            raise ValueError(f"a SEED share carries exactly one {SEED_BYTES}-byte seed")

    def __repr__(self) -> str:
        size = f"{self.dim} elements" if self.kind is ShareKind.FULL else f"{SEED_BYTES}-byte seed"
        return f"Share(aggregator={self.aggregator}, kind={self.kind.name}, {size})"

    def expand(self, round_id: str, client_id: str) -> FieldArray:
        """This share as a field vector of length ``dim``.

        A SEED share expands in the context (round, client, this aggregator); a FULL share
        is returned as is.
        """
        if self.kind is ShareKind.FULL:
            assert self.vector is not None
            return self.vector
        assert self.seed is not None
        return expand(self.seed, share_context(round_id, client_id, self.aggregator), self.dim)


def full_share_index(client_id: str, m: int) -> int:
    """The aggregator that receives ``client_id``'s full share: a hash of the id mod ``m``."""
    digest = hashlib.sha256(b"mpc_agg/full-share/v1" + client_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % m


def shard(
    x: FieldArray,
    round_id: str,
    client_id: str,
    m: int,
    *,
    full_index: int | None = None,
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> list[Share]:
    """Split canonical ``x`` into ``m`` additive shares, one per aggregator (index order).

    ``random_bytes`` is the seed source (the OS CSPRNG unless a test injects one).
    ``full_index`` overrides the rotation of :func:`full_share_index`.
    """
    if m < 2:
        raise ValueError(f"sharing needs m >= 2 aggregators, got {m}")
    if x.dtype != np.uint64 or x.ndim != 1:
        raise ValueError(f"x must be a 1-D uint64 field vector, got {x.dtype} of shape {x.shape}")
    if not field.is_canonical(x):
        raise ValueError("x must be canonical (every value below p)")
    d = int(x.shape[0])
    full = full_share_index(client_id, m) if full_index is None else full_index
    if not 0 <= full < m:
        raise ValueError(f"full_index must be in 0..{m - 1}, got {full}")
    shares: list[Share | None] = [None] * m
    acc = x.copy()  # canonical, so within the folded bound of field.LAZY_ADDS
    pending = 0
    for j in range(m):
        if j == full:
            continue
        seed = random_bytes(SEED_BYTES)
        share = Share(j, ShareKind.SEED, d, seed=seed)
        minus = share.expand(round_id, client_id)  # a fresh array: negate it in place
        np.subtract(_P64, minus, out=minus)  # p - v, in [1, p]
        if pending == field.LAZY_ADDS:
            field.fold(acc, out=acc)
            pending = 0
        acc += minus
        pending += 1
        shares[j] = share
    field.canonical(acc, out=acc)
    shares[full] = Share(full, ShareKind.FULL, d, vector=acc)
    return [s for s in shares if s is not None]


def unshard(vectors: list[FieldArray]) -> FieldArray:
    """Recombine expanded shares (or per-aggregator sums) into the secret: their sum mod p."""
    return field.sum_vectors([np.asarray(v, dtype=np.uint64) for v in vectors])
