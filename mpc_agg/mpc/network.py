"""The party network as the aggregator sees it: broadcast from one party, all-to-all exchange.

:class:`PartyNetwork` is what :class:`mpc_agg.aggregator.Aggregator` needs; the MPyC-backed
implementation lives in :mod:`mpc_agg.mpc.runtime` (the only module importing ``mpyc``).
Every party must make the same sequence of calls: MPyC matches messages by program counter.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class PartyNetwork(Protocol):
    """Authenticated links between the ``m`` aggregators; this one is ``pid``."""

    pid: int
    m: int
    broken: asyncio.Event
    """Set when a link is lost or a step missed its deadline; :meth:`reconnect` clears it."""

    @property
    def connected(self) -> bool:
        """True once links to every other party are up."""

    async def start(self) -> None:
        """Connect to every other party (returns when all are connected)."""

    async def broadcast(self, obj: Any, sender: int) -> Any:
        """Party ``sender`` sends ``obj`` to all; everyone returns it (others pass None)."""

    async def exchange(self, obj: Any) -> list[Any]:
        """Every party sends ``obj`` to all; returns the m objects in party order."""

    async def joint_binomial_sum(self, local_sum: Any, trials: int) -> Any:
        """Open the sum of all parties' shares plus jointly generated binomial noise."""

    def missing(self) -> list[int]:
        """Peers whose link is down."""

    async def reconnect(self) -> None:
        """Drop all links and connect afresh (all parties do this after a loss)."""

    async def stop(self) -> None:
        """Close the links."""
