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
"""

from __future__ import annotations

from mpc_agg.core.ring import GF_P61, Ring, RingArray
from mpc_agg.core.sharing import unshard
from mpc_agg.errors import AgreementFailed
from mpc_agg.mpc.network import PartyNetwork


def sum_share_payload(local_sum: RingArray | None, ring: Ring = GF_P61) -> bytes | None:
    """What a party sends at the reveal: its canonical ``S_j`` as little-endian words of
    ``ring`` (8 or 4 bytes each), or None to abort."""
    return None if local_sum is None else ring.to_wire(local_sum)


def combine_sum_shares(payloads: list[bytes | None], d: int, ring: Ring = GF_P61) -> RingArray:
    """The total in ``ring`` from every party's payload; raises AgreementFailed on an abort
    or a bad size."""
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
    return unshard(parts, ring)


REVEAL_SLICE: int = 1 << 20
"""Elements per reveal exchange (8 MiB of sum share in GF(p), 4 MiB in Z_(2^32))."""


def reveal_slices(d: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each exchange of a reveal of length ``d`` (one, even for d = 0)."""
    return [(a, min(a + REVEAL_SLICE, d)) for a in range(0, max(d, 1), REVEAL_SLICE)]


async def reveal_sum(
    network: PartyNetwork, local_sum: RingArray | None, d: int, ring: Ring = GF_P61
) -> RingArray:
    """Open ``sum_j S_j`` in ``ring``; every party gets the total, or AgreementFailed if any
    aborted.

    Every party makes ``len(reveal_slices(d))`` exchanges unless a slice shows an abort or a
    bad payload, which every party sees alike, so all stop at the same slice.
    """
    total = ring.empty(d)
    for start, stop in reveal_slices(d):
        mine = None if local_sum is None else local_sum[start:stop]
        payloads = await network.exchange(sum_share_payload(mine, ring))
        total[start:stop] = combine_sum_shares(payloads, stop - start, ring)
    return total
