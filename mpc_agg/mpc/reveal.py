"""Reveal of an additive sum over the party network.

docs/design.md, "A round, step by step" (step 6): each aggregator holds ``S_j``, its share of the
total (the sum of the
shares it accepted from the agreed clients). Every party sends ``S_j`` to all and adds the
``m`` vectors. Given the total, the ``S_j`` are uniformly random subject to summing to it
(each client's shares are), so seeing them reveals nothing beyond the total. This is raw
bytes through MPyC's links, O(d) per party, with no secure-array overhead.

A party that could not compute ``S_j`` sends ``None`` instead (an abort marker) rather than
skipping the exchange, so every party makes the same network calls and reaches the same
decision: any abort fails the round everywhere.

Long vectors go in slices of :data:`REVEAL_SLICE` elements, one exchange each (the number
of slices depends only on ``d``, which every party agreed on): MPyC pickles and frames each
message whole, several copies of it at once, so one 80 MB message would cost an aggregator
about 1 GB of memory at d = 10^7; 8 MB slices keep that flat, at a few ms of latency each.

The reveal is *in place*: each slice of the total is written over the same slice of the
party's own ``S_j`` once that slice has been exchanged (what was sent is a copy, the wire
bytes), so the reveal holds no second d-vector; ``S_j`` is gone afterwards, and after an
abort its buffer holds part of the total and part of ``S_j``: it is never sent again, the
round has failed.
"""

from __future__ import annotations

import numpy as np

from mpc_agg.core.ring import GF_P61, Ring, RingArray
from mpc_agg.core.sharing import unshard
from mpc_agg.errors import AgreementFailed
from mpc_agg.mpc.network import PartyNetwork


def sum_share_payload(local_sum: RingArray | None, ring: Ring = GF_P61) -> bytes | None:
    """What a party sends at the reveal: its canonical ``S_j`` as little-endian words of
    ``ring`` (8 or 4 bytes each), or None to abort."""
    return None if local_sum is None else ring.to_wire(local_sum)


def combine_sum_shares(
    payloads: list[bytes | None], d: int, ring: Ring = GF_P61, out: RingArray | None = None
) -> RingArray:
    """The total in ``ring`` from every party's payload, written into ``out`` (length ``d``)
    when given; raises AgreementFailed on an abort or a bad size, before ``out`` is
    touched."""
    aborted = [j for j, raw in enumerate(payloads) if raw is None]
    if aborted:
        raise AgreementFailed(
            f"aggregator(s) {aborted} could not compute their share of the total; "
            "nothing is revealed",
            code="aborted",
        )
    parts = []
    for j, raw in enumerate(payloads):
        if not isinstance(raw, bytes) or len(raw) != ring.itemsize * d:
            raise AgreementFailed(
                f"aggregator {j} sent a sum share of the wrong size", code="bad_share"
            )
        part = ring.from_wire(raw, 0, d)
        if not ring.is_canonical(part):
            raise AgreementFailed(
                f"aggregator {j} sent a sum share with a value not below p", code="bad_share"
            )
        parts.append(part)
    if out is None:
        return unshard(parts, ring)
    if out.shape != (d,) or out.dtype != ring.dtype:
        raise AgreementFailed(
            f"no room for a total of {d} {ring.name} elements in a {out.dtype} array of "
            f"shape {out.shape}",
            code="aborted",
        )
    np.copyto(out, parts[0])
    pending = 0
    for part in parts[1:]:
        if pending >= ring.lazy_adds:
            ring.reduce(out, out=out)
            pending = 0
        np.add(out, part, out=out)
        pending += 1
    return ring.canonical(out, out=out)


REVEAL_SLICE: int = 1 << 20
"""Elements per reveal exchange (8 MiB of sum share in GF(p), 4 MiB in Z_(2^32))."""


def reveal_slices(d: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each exchange of a reveal of length ``d`` (one, even for d = 0)."""
    return [(a, min(a + REVEAL_SLICE, d)) for a in range(0, max(d, 1), REVEAL_SLICE)]


async def reveal_sum(
    network: PartyNetwork, local_sum: RingArray | None, d: int, ring: Ring = GF_P61
) -> RingArray:
    """Open ``sum_j S_j`` in ``ring`` in place: every party gets the total in ``local_sum``'s
    own buffer (returned), or AgreementFailed if any aborted.

    ``local_sum`` is this party's canonical ``S_j`` (a writable vector of length ``d``), or
    None to abort. Every party makes ``len(reveal_slices(d))`` exchanges unless a slice
    shows an abort or a bad payload, which every party sees alike, so all stop at the same
    slice. Slice ``k`` of ``local_sum`` is overwritten with the total's slice ``k`` only
    after it was sent; the slices after it still hold ``S_j``.
    """
    for start, stop in reveal_slices(d):
        mine = None if local_sum is None else local_sum[start:stop]
        payloads = await network.exchange(sum_share_payload(mine, ring))
        # Raises, at every party alike, on an abort (this party's own included) or a bad
        # payload; otherwise writes the total's slice over ``mine``, already sent.
        combine_sum_shares(payloads, stop - start, ring, out=mine)
    assert local_sum is not None  # an abort raised at the first exchange
    return local_sum
