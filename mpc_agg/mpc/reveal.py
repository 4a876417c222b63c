"""Reveal of an additive sum over the party network.

DESIGN.md, "Reveal": each aggregator holds ``S_j``, its share of the total (the sum of the
shares it accepted from the agreed clients). Every party sends ``S_j`` to all and adds the
``m`` vectors. Given the total, the ``S_j`` are uniformly random subject to summing to it
(each client's shares are), so seeing them reveals nothing beyond the total. This is raw
bytes through MPyC's links, O(d) per party, with no secure-array overhead.
"""

from __future__ import annotations

import numpy as np

from mpc_agg.core.field import FieldArray, is_canonical
from mpc_agg.core.sharing import unshard
from mpc_agg.errors import AgreementFailed
from mpc_agg.mpc.network import PartyNetwork


async def reveal_sum(network: PartyNetwork, local_sum: FieldArray) -> FieldArray:
    """Open ``sum_j S_j`` given this party's canonical ``S_j``; every party gets the total."""
    d = local_sum.shape[0]
    payloads = await network.exchange(local_sum.astype("<u8", copy=False).tobytes())
    parts = []
    for j, raw in enumerate(payloads):
        if not isinstance(raw, bytes) or len(raw) != 8 * d:
            raise AgreementFailed(f"aggregator {j} sent a sum share of the wrong size")
        part = np.frombuffer(raw, dtype="<u8").astype(np.uint64, copy=False)
        if not is_canonical(part):
            raise AgreementFailed(f"aggregator {j} sent a sum share with a value not below p")
        parts.append(part)
    return unshard(parts)
