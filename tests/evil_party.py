"""A test-only aggregator party that attacks the others (tests/test_party_security.py).

    python tests/evil_party.py --attacker A --poison-once MARKER --config C --index I ...
    python tests/evil_party.py --attacker A --tamper-result --config C --index I ...

Aggregator ``A`` attacks; the others run the normal party.
It is a *configured* party (it holds the keys the topology pins for its index) that
misbehaves, which is what authentication cannot stop:

``--poison-once MARKER``  at its first readiness vote it sends, instead of the vote, a
                          pickle whose ``__reduce__`` would create the file ``MARKER`` in
                          any party that unpickled it normally. Once only.
``--tamper-result``       its HTTP API answers ``GET .../result`` with the first coordinate
                          of the total changed and the client count doubled (a proxy standing
                          in for the leader); its signed statement stays honest.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

from mpc_agg import party
from mpc_agg.core import codec
from mpc_agg.core.field import P
from mpc_agg.core.protocol import ReadyVote, decode
from mpc_agg.errors import ProtocolViolation
from mpc_agg.mpc.network import PartyNetwork


class Payload:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class PoisoningNetwork:
    """``inner``, except that the first readiness vote is replaced by a :class:`Payload`."""

    def __init__(self, inner: PartyNetwork, marker: str) -> None:
        self.inner = inner
        self.marker = marker
        self.poisoned = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def exchange(self, obj: Any) -> list[Any]:
        if not self.poisoned:
            try:
                is_vote = isinstance(decode(obj), ReadyVote)
            except ProtocolViolation:
                is_vote = False
            if is_vote:
                self.poisoned = True
                return await self.inner.exchange(Payload(self.marker))
        return await self.inner.exchange(obj)


def tamper_results() -> None:
    """Make this party's ``result`` answers lie (first coordinate + 1, clients doubled)."""
    from mpc_agg.aggregator import Aggregator

    honest = Aggregator.result

    def lying(self: Aggregator, round_id: str) -> bytes:
        total, meta = codec.decode_result(honest(self, round_id))
        forged = np.array(total, dtype=np.uint64)
        forged[0] = (int(forged[0]) + (1 << 30)) % P
        meta["num_clients"] = 2 * int(meta["num_clients"])
        return codec.encode_result(forged, meta)

    Aggregator.result = lying  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mpc_agg.party that attacks (tests only)")
    parser.add_argument("--poison-once", metavar="MARKER", default=None)
    parser.add_argument("--tamper-result", action="store_true")
    parser.add_argument(
        "--attacker", type=int, default=0, help="the one index that attacks (others are honest)"
    )
    parser.add_argument("--index", type=int, required=True)
    attack, rest = parser.parse_known_args(argv)
    rest += ["--index", str(attack.index)]
    if attack.index != attack.attacker:
        return party.main(rest)
    if attack.tamper_result:
        tamper_results()

    def wrap(network: PartyNetwork) -> PartyNetwork:
        return PoisoningNetwork(network, attack.poison_once)  # type: ignore[return-value]

    return party.main(rest, wrap_network=wrap if attack.poison_once else None)


if __name__ == "__main__":
    sys.exit(main())
