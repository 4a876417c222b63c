"""Reveal of an additive sum over the party network.

DESIGN.md, "Reveal": each aggregator holds ``S_j``, its share of the total (the sum of the
shares it accepted from the agreed clients). Every party sends ``S_j`` to all and adds the
``m`` vectors. Given the total, the ``S_j`` are uniformly random subject to summing to it
(each client's shares are), so seeing them reveals nothing beyond the total. This is raw
bytes through MPyC's links, O(d) per party, with no secure-array overhead.

A party that could not compute ``S_j`` sends ``None`` instead (an abort marker) rather than
skipping the exchange, so every party makes the same network calls and reaches the same
decision: any abort fails the round everywhere.
"""

from __future__ import annotations

import numpy as np

from mpc_agg.core.field import FieldArray, is_canonical
from mpc_agg.core.sharing import unshard
from mpc_agg.errors import AgreementFailed
from mpc_agg.mpc.network import PartyNetwork


def sum_share_payload(local_sum: FieldArray | None) -> bytes | None:
    """What a party sends at the reveal: its canonical ``S_j`` as bytes, or None to abort."""
    return None if local_sum is None else local_sum.astype("<u8", copy=False).tobytes()


def combine_sum_shares(payloads: list[bytes | None], d: int) -> FieldArray:
    """The total from every party's payload; raises AgreementFailed on an abort or a bad size."""
    aborted = [j for j, raw in enumerate(payloads) if raw is None]
    if aborted:
        raise AgreementFailed(
            f"aggregator(s) {aborted} could not compute their share of the total; "
            "nothing is revealed"
        )
    parts = []
    for j, raw in enumerate(payloads):
        if not isinstance(raw, bytes) or len(raw) != 8 * d:
            raise AgreementFailed(f"aggregator {j} sent a sum share of the wrong size")
        part = np.frombuffer(raw, dtype="<u8").astype(np.uint64, copy=False)
        if not is_canonical(part):
            raise AgreementFailed(f"aggregator {j} sent a sum share with a value not below p")
        parts.append(part)
    return unshard(parts)


async def reveal_sum(network: PartyNetwork, local_sum: FieldArray | None, d: int) -> FieldArray:
    """Open ``sum_j S_j``; every party gets the total, or AgreementFailed if any aborted."""
    payloads = await network.exchange(sum_share_payload(local_sum))
    return combine_sum_shares(payloads, d)
