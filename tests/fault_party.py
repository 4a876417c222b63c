"""A test-only aggregator party with an injected fault.

    python tests/fault_party.py --delay-vote-s 2 --config C --index I --party-dir D [--log-level L]

Runs the normal party (:func:`mpc_agg.party.main`) with its MPyC network wrapped in
:class:`mpc_agg.mpc.memory.DelayingNetwork`, so fault injection never goes through the
production party's options or environment (docs/design.md, "Fail closed"). With
``--delay-vote-s S`` every readiness vote (exchange 2 of a round) waits ``S`` seconds before
it is sent: the parties have agreed and hold their shares, and nothing has been revealed.
Tests start it through ``LocalFederation(..., party_command=fault_party_command(...))``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mpc_agg import party
from mpc_agg.core.protocol import ReadyVote, decode
from mpc_agg.errors import ProtocolViolation
from mpc_agg.mpc.memory import DelayingNetwork
from mpc_agg.mpc.network import PartyNetwork

SCRIPT = Path(__file__).resolve()


def fault_party_command(*fault_options: str) -> list[str]:
    """The ``party_command`` of a LocalFederation whose parties run this program."""
    return [sys.executable, "-u", str(SCRIPT), *fault_options]


def is_ready_vote(obj: Any) -> bool:
    """Whether ``obj`` is a readiness vote on the wire."""
    try:
        return isinstance(decode(obj), ReadyVote)
    except ProtocolViolation:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="mpc_agg.party with injected faults (tests only); other options go to "
        "the party",
    )
    parser.add_argument(
        "--delay-vote-s",
        type=float,
        default=0.0,
        help="seconds every readiness vote waits before it is sent (default: no delay)",
    )
    faults, rest = parser.parse_known_args(argv)

    def wrap(network: PartyNetwork) -> PartyNetwork:
        return DelayingNetwork(network, faults.delay_vote_s, when=is_ready_vote)

    return party.main(rest, wrap_network=wrap if faults.delay_vote_s > 0 else None)


if __name__ == "__main__":
    sys.exit(main())
