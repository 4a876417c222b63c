"""What an aggregator admits of uploads at once, and how fast their bodies must come.

README, "HTTP API (per aggregator)" (limits) and "Security model" (hostile input):

* **slots**: at most ``rounds.max_concurrent_uploads`` uploads in flight at one aggregator
  (global), and at most :attr:`ServerLimits.client_uploads` of them from one client id;
* **bytes**: one client id claims at most one full share of the round it uploads to (its
  announced lengths, summed over its uploads in flight); the bodies held in memory at once
  stay within ``rounds.upload_buffer_mb``, and a body takes its part of that buffer *as its
  bytes arrive* (in :data:`GRANULE` steps), not when it is announced, so an upload that
  announced 8 MB and sent 4 bytes holds one granule. A streamed body (a full share of a
  large round, read block by block: :class:`UploadBody`) holds one block at most, never its
  whole length (docs/design.md, "Streamed uploads");
* **rates**: a body must arrive within ``deadlines.upload_s`` and, after a grace period, at
  :attr:`ServerLimits.min_rate_bps` at least (enforced by the HTTP server's body reader).

Slot refusals are :class:`~mpc_agg.errors.Busy` (503 with ``Retry-After``) at once, never
a wait on a queue an attacker can fill. When the buffer is full, an upload that needs more
waits for room (its client held back by TCP flow control, up to ``deadlines.upload_s``),
unless the *oldest* upload in flight is waiting: then younger ones that need room are
refused at once, so the oldest always makes progress and a full buffer cannot deadlock
half-received bodies.

Pure asyncio, no HTTP: :mod:`mpc_agg.transport.http_server` holds one :class:`UploadLimits`
per application.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol

from mpc_agg.config.schema import Topology
from mpc_agg.errors import Busy, PayloadTooLarge

__all__ = [
    "GRANULE",
    "BufferTicket",
    "ServerLimits",
    "UploadBody",
    "UploadBuffer",
    "UploadLimits",
]

GRANULE = 64 * 1024
"""Bytes of the upload buffer a body takes at a time as it arrives (aiohttp reads in
chunks of this size too)."""


class UploadBody(Protocol):
    """An upload body read as it arrives, piece by piece (the HTTP server's reader, with its
    deadlines and buffer ticket): what a streamed upload is given instead of its bytes."""

    @property
    def length(self) -> int:
        """The announced length in bytes (``Content-Length``): the body is exactly that."""
        ...

    async def read(self, n: int) -> bytearray:
        """The next ``n`` bytes of the body, exactly; raises
        :class:`~mpc_agg.errors.RequestTimeout` (too slow),
        :class:`~mpc_agg.errors.ClientDisconnected` or :class:`~mpc_agg.errors.MalformedUpload`
        (it ends first)."""
        ...

    async def finish(self) -> None:
        """Once ``length`` bytes were read: :class:`~mpc_agg.errors.MalformedUpload` if more
        follow."""
        ...


@dataclass(frozen=True)
class ServerLimits:
    """The HTTP server's limits against slow, greedy or idle peers (local tuning: not in the
    topology fingerprint). :meth:`for_topology` takes the first three from the topology.

    ``max_uploads``, ``buffer_bytes``: ``rounds.max_concurrent_uploads`` and
    ``rounds.upload_buffer_mb``. ``upload_s``: ``deadlines.upload_s``, the longest a body
    may take (and the longest the oldest upload waits for buffer room).
    ``client_uploads``: uploads in flight per client id at this aggregator.
    ``min_rate_bps``, ``grace_s``: after ``grace_s`` seconds, a body must have arrived at
    ``min_rate_bps`` bytes per second on average (time spent waiting for buffer room is not
    counted), else 408 ``timeout``.
    ``idle_timeout_s``: a connection with no request in progress (before its first request
    head is complete, TLS handshake included, or after its last answer) is closed after
    this long while the server holds half its ``max_connections`` or more:
    slow headers (slowloris) and idle keep-alive connections; ``calm_idle_timeout_s``:
    the same below that (a crowd of honest clients on a busy machine may need seconds for
    their TLS handshakes).
    ``max_connections``: connections held open at once; beyond it the oldest idle one is
    closed, or the new one if none is idle (``None``: unbounded, for in-process tests).
    ``retry_after_s``: the ``Retry-After`` of a busy answer.
    ``log_lines_per_minute``: refusal log lines per error code and minute (the rest are
    counted in ``/metrics`` and summed up in the next line of that code).
    """

    max_uploads: int = 256
    buffer_bytes: int = 128 << 20
    upload_s: float = 120.0
    client_uploads: int = 2
    min_rate_bps: float = 64 * 1024
    grace_s: float = 5.0
    idle_timeout_s: float = 5.0
    calm_idle_timeout_s: float = 30.0
    max_connections: int | None = None
    retry_after_s: int = 1
    log_lines_per_minute: int = 10

    @classmethod
    def for_topology(cls, topology: Topology, **changes: object) -> ServerLimits:
        """The limits of ``topology`` (its ``rounds`` and ``deadlines``), with ``changes``."""
        policy = topology.rounds
        base = cls(
            max_uploads=policy.max_concurrent_uploads,
            buffer_bytes=policy.upload_buffer_bytes,
            upload_s=topology.deadlines.upload_s,
        )
        return replace(base, **changes)  # type: ignore[arg-type]


class BufferTicket:
    """One upload's share of an :class:`UploadBuffer`: ``held`` bytes, taken with
    :meth:`need` as its body arrives and given back all at once when the upload ends."""

    def __init__(self, buffer: UploadBuffer, seq: int) -> None:
        self.buffer = buffer
        self.seq = seq
        self.held = 0

    async def need(self, nbytes: int, wait_s: float) -> float:
        """Hold at least ``nbytes`` in all; returns the seconds spent waiting for room.
        See :meth:`UploadBuffer.grow`."""
        if nbytes <= self.held:
            return 0.0
        return await self.buffer.grow(self, nbytes - self.held, wait_s)


class UploadBuffer:
    """Bytes of upload bodies held in memory at once at one aggregator, with a cap.

    Uploads take bytes as their bodies arrive (:meth:`BufferTicket.need`). When the cap is
    reached, an upload waits for room (its client held back by TCP), up to ``wait_s``, then
    :class:`Busy`; but once the *oldest* upload has to wait, every younger one that needs
    room is refused with :class:`Busy` at once (and younger waiters give up). So a full
    buffer never deadlocks half-received bodies: the oldest always gets room as the others
    finish or give up.
    """

    def __init__(self, capacity: int, *, retry_after_s: int = 1) -> None:
        self.capacity = capacity
        self.used = 0
        self.retry_after_s = retry_after_s
        self._tickets: dict[int, BufferTicket] = {}  # by seq: oldest first
        self._seq = itertools.count()
        self._freed = asyncio.Event()
        self._oldest_waits = False

    def open(self) -> BufferTicket:
        """A ticket holding nothing yet, younger than every open one."""
        ticket = BufferTicket(self, next(self._seq))
        self._tickets[ticket.seq] = ticket
        return ticket

    def close(self, ticket: BufferTicket) -> None:
        """Give back everything ``ticket`` holds and wake the waiter (idempotent)."""
        if self._tickets.pop(ticket.seq, None) is None:
            return
        self.used -= ticket.held
        ticket.held = 0
        self._freed.set()

    def _oldest(self) -> BufferTicket | None:
        return next(iter(self._tickets.values()), None)

    async def grow(self, ticket: BufferTicket, extra: int, wait_s: float) -> float:
        """Add ``extra`` bytes to ``ticket``; returns the seconds waited for room."""
        if ticket.held + extra > self.capacity:
            raise PayloadTooLarge(
                f"body of {ticket.held + extra} bytes exceeds the upload buffer of "
                f"{self.capacity} bytes"
            )
        if self.used + extra <= self.capacity:
            self.used += extra
            ticket.held += extra
            return 0.0
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + wait_s
        i_wait_oldest = False
        try:
            while self.used + extra > self.capacity:
                oldest = self._oldest() is ticket
                if not oldest and self._oldest_waits:
                    raise Busy(
                        f"the upload buffer ({self.capacity >> 20} MiB) is full and an older "
                        "upload is waiting for room; retry later",
                        retry_after_s=self.retry_after_s,
                    )
                if oldest and not self._oldest_waits:
                    self._oldest_waits = i_wait_oldest = True
                    self._freed.set()  # younger waiters give up their place
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise Busy(
                        f"the upload buffer ({self.capacity >> 20} MiB) stayed full for "
                        f"{wait_s:g} s; retry later",
                        retry_after_s=self.retry_after_s,
                    )
                self._freed.clear()
                try:
                    await asyncio.wait_for(self._freed.wait(), remaining)
                except asyncio.TimeoutError:
                    continue
        finally:
            if i_wait_oldest:
                self._oldest_waits = False
        self.used += extra
        ticket.held += extra
        return loop.time() - start


class UploadLimits:
    """The admission limits of one aggregator: at most ``max_uploads`` uploads in flight
    (receiving or processing their body), at most ``client_uploads`` of them and one full
    share's worth of announced bytes per client id, and their bodies within an
    :class:`UploadBuffer` of ``buffer_bytes``."""

    def __init__(
        self,
        max_uploads: int,
        buffer_bytes: int,
        *,
        client_uploads: int = 2,
        retry_after_s: int = 1,
    ) -> None:
        self.max_uploads = max_uploads
        self.client_uploads = client_uploads
        self.retry_after_s = retry_after_s
        self.inflight = 0
        """Uploads admitted and not yet finished."""
        self.buffer = UploadBuffer(buffer_bytes, retry_after_s=retry_after_s)
        self.clients: dict[str, tuple[int, int]] = {}
        """Client id -> (uploads in flight, bytes they announced)."""

    @asynccontextmanager
    async def admit(
        self, client_id: str, nbytes: int, client_bytes: int, *, hold: int | None = None
    ) -> AsyncIterator[BufferTicket]:
        """Hold one upload slot of ``client_id`` for an announced body of ``nbytes`` for
        the body of the ``with``; yields the :class:`BufferTicket` the body's bytes are
        taken on as they arrive. ``hold``: the most of the body held in memory at once
        (one block of a streamed body; default ``nbytes``, the body taken whole).

        :class:`PayloadTooLarge` if ``hold`` could never fit in the buffer;
        :class:`Busy` at once when ``max_uploads`` are in flight, when ``client_id`` has
        ``client_uploads`` in flight, or when its announced bytes would exceed
        ``client_bytes`` (one full share of the round). Everything is released however the
        body ends, cancellation included.
        """
        held = nbytes if hold is None else min(hold, nbytes)
        if held > self.buffer.capacity:
            what = "body" if held == nbytes else "block of a streamed body"
            raise PayloadTooLarge(
                f"{what} of {held} bytes exceeds the upload buffer of {self.buffer.capacity} bytes"
            )
        if self.inflight >= self.max_uploads:
            raise Busy(
                f"{self.max_uploads} uploads are in flight at this aggregator; retry later",
                retry_after_s=self.retry_after_s,
            )
        count, claimed = self.clients.get(client_id, (0, 0))
        if count >= self.client_uploads:
            raise Busy(
                f"client {client_id!r} already has {count} uploads in flight at this "
                f"aggregator (at most {self.client_uploads} per client); retry later",
                retry_after_s=self.retry_after_s,
            )
        if claimed + nbytes > client_bytes:
            raise Busy(
                f"client {client_id!r} already has uploads of {claimed} bytes in flight at "
                f"this aggregator; with {nbytes} more it would exceed one full share "
                f"({client_bytes} bytes); retry later",
                retry_after_s=self.retry_after_s,
            )
        self.inflight += 1
        self.clients[client_id] = (count + 1, claimed + nbytes)
        ticket = self.buffer.open()
        try:
            yield ticket
        finally:
            self.buffer.close(ticket)
            self.inflight -= 1
            count, claimed = self.clients.pop(client_id)
            if count > 1:
                self.clients[client_id] = (count - 1, claimed - nbytes)
