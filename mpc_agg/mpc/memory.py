"""Party networks for tests and benchmarks: in process, and a fault-injecting wrapper.

docs/design.md, "Layout and layering" (``mpc/memory``). Both satisfy
:class:`~mpc_agg.mpc.network.PartyNetwork`, so real :class:`~mpc_agg.aggregator.Aggregator`
objects run on them unchanged:

* :class:`InMemoryNetwork` links ``m`` parties of one event loop with one FIFO queue per
  ordered link ``(i, j)``. Every party making the same calls in the same order is what MPyC's
  program-counter matching assumes (docs/design.md, "A round, step by step"); FIFO links give
  the same pairing without sockets. :func:`memory_networks` builds the ``m`` ends.
* :class:`DelayingNetwork` wraps any party network (an :class:`InMemoryNetwork`, or the
  MPyC network of a real party process) and makes chosen exchanges wait first: fault
  injection lives here, on the test side, never in the production party code.

Nothing here imports ``mpyc``; there is no secure arithmetic, so
:meth:`InMemoryNetwork.joint_binomial_sum` raises :class:`NotImplementedError`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from mpc_agg.mpc.network import PartyNetwork

log = logging.getLogger("mpc_agg.mpc.memory")

Links: TypeAlias = Mapping[tuple[int, int], asyncio.Queue[Any]]
"""One queue per ordered pair ``(sender, receiver)`` of ``m`` parties (``m * m`` keys)."""


def memory_links(m: int) -> dict[tuple[int, int], asyncio.Queue[Any]]:
    """Fresh, empty links of ``m`` parties (the self-links ``(i, i)`` stay unused)."""
    if m < 1:
        raise ValueError(f"m must be at least 1, got {m}")
    return {(i, j): asyncio.Queue() for i in range(m) for j in range(m)}


class InMemoryNetwork:
    """Party ``pid``'s end of an in-process, FIFO-per-link party network.

    ``links`` is shared by all ``m`` ends (see :func:`memory_links`); ``m`` is derived from
    its size. Links never break: :attr:`broken` is never set and :meth:`missing` is empty.
    All ends must be used from one event loop.
    """

    def __init__(self, pid: int, links: Links) -> None:
        m = math.isqrt(len(links))
        if m < 1 or m * m != len(links):
            raise ValueError(f"links must hold m * m queues, got {len(links)}")
        if not 0 <= pid < m:
            raise ValueError(f"pid must be in 0..{m - 1}, got {pid}")
        self.pid = pid
        self.m = m
        self.broken = asyncio.Event()
        self._links = links

    @property
    def connected(self) -> bool:
        """Always True: in-process links are up from the start."""
        return True

    def missing(self) -> list[int]:
        """No peer is ever missing."""
        return []

    async def start(self) -> None:
        """Nothing to connect."""

    async def reconnect(self) -> None:
        """Nothing to reconnect."""

    async def stop(self) -> None:
        """Nothing to close."""

    async def broadcast(self, obj: Any, sender: int) -> Any:
        """Party ``sender`` queues ``obj`` to every other party; the others await it."""
        if self.pid == sender:
            for j in range(self.m):
                if j != sender:
                    self._links[(sender, j)].put_nowait(obj)
            return obj
        return await self._links[(sender, self.pid)].get()

    async def exchange(self, obj: Any) -> list[Any]:
        """Queue ``obj`` to every other party, then await theirs: m objects in party order."""
        for j in range(self.m):
            if j != self.pid:
                self._links[(self.pid, j)].put_nowait(obj)
        return [
            obj if j == self.pid else await self._links[(j, self.pid)].get() for j in range(self.m)
        ]

    async def joint_binomial_sum(self, local_sum: Any, trials: int) -> Any:
        """Not available: joint binomial noise needs MPyC's secure arithmetic
        (:class:`mpc_agg.mpc.runtime.MpycNetwork`)."""
        raise NotImplementedError(
            "the in-memory party network has no secure arithmetic; joint binomial noise "
            "runs only over MPyC (mpc_agg.mpc.runtime.MpycNetwork)"
        )

    def in_flight(self) -> int:
        """Objects sent on any link of this network and not yet received by their party."""
        return sum(q.qsize() for q in self._links.values())


def memory_networks(m: int) -> list[InMemoryNetwork]:
    """The ``m`` ends of one fresh in-memory party network, in party order."""
    links = memory_links(m)
    return [InMemoryNetwork(i, links) for i in range(m)]


class DelayingNetwork:
    """``inner`` with a pause of ``delay_exchange_s`` seconds before chosen exchanges.

    An exchange is delayed when at least ``after`` exchanges have gone through this wrapper
    before it and ``when`` (if given) is true of the object this party sends. Everything else
    goes straight to ``inner``; :attr:`broken`, :attr:`pid` and :attr:`m` are ``inner``'s.
    The pause happens before ``inner.exchange`` is called, so ``inner``'s step deadline does
    not count it. :attr:`exchanges` and :attr:`delayed` count what went through.

    In a real party process, the wrapper goes around the MPyC network through
    :func:`mpc_agg.party.main`'s ``wrap_network`` (see ``tests/fault_party.py``).
    """

    def __init__(
        self,
        inner: PartyNetwork,
        delay_exchange_s: float,
        *,
        after: int = 0,
        when: Callable[[Any], bool] | None = None,
    ) -> None:
        if not delay_exchange_s >= 0:
            raise ValueError(f"delay_exchange_s must be >= 0, got {delay_exchange_s}")
        if after < 0:
            raise ValueError(f"after must be >= 0, got {after}")
        self.inner = inner
        self.delay_exchange_s = delay_exchange_s
        self.after = after
        self.when = when
        self.pid = inner.pid
        self.m = inner.m
        self.broken = inner.broken  # the same event: inner sets and clears it
        self.exchanges = 0
        self.delayed = 0

    @property
    def connected(self) -> bool:
        """Whether ``inner`` is connected."""
        return self.inner.connected

    def missing(self) -> list[int]:
        """``inner``'s missing peers."""
        return self.inner.missing()

    async def start(self) -> None:
        """Start ``inner``."""
        await self.inner.start()

    async def reconnect(self) -> None:
        """Reconnect ``inner``."""
        await self.inner.reconnect()

    async def stop(self) -> None:
        """Stop ``inner``."""
        await self.inner.stop()

    async def broadcast(self, obj: Any, sender: int) -> Any:
        """``inner.broadcast``, never delayed."""
        return await self.inner.broadcast(obj, sender)

    async def exchange(self, obj: Any) -> list[Any]:
        """``inner.exchange``, after the pause if this exchange is one to delay."""
        number = self.exchanges
        self.exchanges += 1
        if number >= self.after and (self.when is None or self.when(obj)):
            self.delayed += 1
            log.warning(
                "fault injection: aggregator %d delays exchange %d by %g s",
                self.pid,
                number,
                self.delay_exchange_s,
            )
            await asyncio.sleep(self.delay_exchange_s)
        return await self.inner.exchange(obj)

    async def joint_binomial_sum(self, local_sum: Any, trials: int) -> Any:
        """``inner.joint_binomial_sum``, never delayed."""
        return await self.inner.joint_binomial_sum(local_sum, trials)
