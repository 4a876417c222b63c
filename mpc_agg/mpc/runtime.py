"""The only module that imports ``mpyc``.

MPyC parses ``sys.argv`` and configures logging when ``mpyc.runtime`` is first imported, and
keeps one global runtime. :func:`load_runtime` sets ``sys.argv`` to the options built from the
topology (:func:`mpc_agg.mpc.argv.mpyc_argv`), imports MPyC once, and restores ``sys.argv``.
Configure logging before calling it, so MPyC's ``basicConfig`` leaves yours in place.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from mpc_agg.errors import PartyLinkLost


def load_runtime(argv: list[str]) -> Any:
    """Import MPyC with ``argv`` as its options and return its runtime ``mpc``."""
    if "mpyc.runtime" in sys.modules:
        raise RuntimeError("mpyc.runtime was already imported: its options can no longer be set")
    saved = sys.argv
    sys.argv = [saved[0] if saved else "mpc_agg", *argv]
    try:
        from mpyc.runtime import mpc
    finally:
        sys.argv = saved
    return mpc


class MpycNetwork:
    """:class:`~mpc_agg.mpc.network.PartyNetwork` over MPyC's party links (``mpc.transfer``)."""

    def __init__(self, argv: list[str]) -> None:
        self._mpc = load_runtime(argv)
        self.pid: int = self._mpc.pid
        self.m: int = len(self._mpc.parties)
        self._connected = False

    @property
    def connected(self) -> bool:
        """True once started and while every link to another party is up."""
        return self._connected and not self._lost_links()

    def _lost_links(self) -> list[int]:
        return [p.pid for p in self._mpc.parties if p.pid != self.pid and p.protocol is None]

    def _check_links(self) -> None:
        # MPyC would fail inside a callback and stop the event loop; refuse cleanly instead.
        lost = self._lost_links()
        if lost:
            raise PartyLinkLost(f"the link to aggregator(s) {lost} is down")

    def run(self, coro: Any) -> Any:
        """Run ``coro`` to completion on MPyC's event loop."""
        return self._mpc.run(coro)

    async def start(self) -> None:
        await self._mpc.start()
        # MPyC resolves this party's own "protocol" future once all links are up, and resolves
        # it again when they all close; a fresh future keeps the second resolution legal when
        # peers disconnect first (as in MPyC's own shutdown).
        me = self._mpc.parties[self.pid]
        me.protocol = asyncio.get_running_loop().create_future()
        self._connected = True

    async def broadcast(self, obj: Any, sender: int) -> Any:
        self._check_links()
        return await self._mpc.transfer(obj if self.pid == sender else None, senders=sender)

    async def exchange(self, obj: Any) -> list[Any]:
        self._check_links()
        return await self._mpc.transfer(obj)

    async def stop(self) -> None:
        """Close links without MPyC's shutdown barrier (other parties may already be gone)."""
        self._connected = False
        for peer in self._mpc.parties:
            if peer.pid != self.pid and peer.protocol is not None:
                try:
                    peer.protocol.close_connection()
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
