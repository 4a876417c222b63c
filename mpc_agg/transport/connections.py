"""The connections an aggregator's HTTP server holds: bounded below the descriptor limit,
and closed when idle (README, "HTTP API (per aggregator)": limits; docs/design.md,
"Abuse resistance").

aiohttp has no header timeout and no connection cap, and a TLS handshake that never
completes would hold its descriptor for asyncio's 60 s. So every accepted TCP connection
first meets a small protocol of ours, :class:`_Front`, before any TLS or HTTP: the event
loop (asyncio's or uvloop, which MPyC uses when installed) calls it at accept, and it asks
the :class:`ConnectionGate`:

* the gate counts the connections it admitted until they are lost (TLS handshakes in
  progress included), so it counts descriptors;
* beyond ``max_connections`` it aborts the oldest *idle* connection (no request in
  progress) to make room, or resets the new one at once if every connection is busy or
  younger than :attr:`ConnectionGate.min_age_s` (a new connection gets that long for its
  TLS handshake and request head before a newer one may push it out): a crowd of idle
  connections can never keep a new client out for long, a flood of new ones cannot push out
  a client mid-handshake, and the party never runs out of descriptors for its journals,
  ledger and party links;
* it runs a watchdog per connection: one that has had no request in progress for
  ``idle_timeout_s`` (from its accept, through its TLS handshake and request head, or from
  its last answer) is aborted while the server holds half its connection budget or more;
  below that, after ``calm_idle_timeout_s``. That is the header timeout (slowloris), the
  TLS handshake timeout and the keep-alive timeout in one rule, strict when connections
  are scarce, lenient when they are not: a crowd of honest clients on a CPU-starved machine,
  whose handshakes take seconds, is not cut off and made to start again.

An admitted connection is then upgraded to TLS by :class:`_Front` (``loop.start_tls``) and
handed to aiohttp's request handler. A connection is *busy* from the moment its request head
is parsed (the HTTP middleware calls :meth:`ConnectionGate.begin`) until its answer is
written; bodies are bounded by the body reader's rate rule instead.

:func:`raise_descriptor_limit` and :func:`connection_budget` size the gate for the party.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, Protocol

__all__ = [
    "Connection",
    "ConnectionGate",
    "GatedHandler",
    "connection_budget",
    "raise_descriptor_limit",
]

log = logging.getLogger("mpc_agg.http")

RESERVED_DESCRIPTORS = 256
"""Descriptors kept free below the soft limit for everything but HTTP connections: journals,
the round index, the ledger, party links, the event loop's own."""


def raise_descriptor_limit() -> tuple[int, int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns
    ``(old soft, new soft, hard)`` (the soft limit unchanged if it cannot be raised)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    new = soft
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            new = target
        except (OSError, ValueError):
            new = soft
    return soft, new, hard


def connection_budget(soft_limit: int, reserved: int = RESERVED_DESCRIPTORS) -> int:
    """HTTP connections a process with ``soft_limit`` descriptors may hold: ``reserved``
    below the limit (at most a quarter of it for small limits), at least 16."""
    return max(16, soft_limit - min(reserved, soft_limit // 4))


class Connection:
    """One admitted connection: its current transport (the TCP one, then the TLS one),
    whether a request is in progress on it, and its watchdog."""

    __slots__ = ("busy", "closed", "closing", "idle_since", "since", "timer", "transport")

    def __init__(self, transport: asyncio.BaseTransport, since: float) -> None:
        self.transport = transport
        self.since = since
        """Loop time of its accept."""
        self.idle_since = since
        """Loop time since which it has had no request in progress."""
        self.busy = 0
        self.closing = False
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None


class GatedHandler(Protocol):
    """What :class:`_Front` needs of the HTTP handler it hands a connection to (the HTTP
    server's ``RequestHandler`` subclass): an ``asyncio.Protocol`` that tells the gate
    when its connection is lost."""

    gate_conn: Connection | None

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> bool | None: ...


class ConnectionGate:
    """At most ``max_connections`` connections (None: unbounded), each aborted after
    ``idle_timeout_s`` without a request in progress while at least half of
    ``max_connections`` are open, after ``calm_idle_timeout_s`` (default: the same) below
    that. Counters for ``/metrics``: :attr:`open`, :attr:`refused`, :attr:`evicted`,
    :attr:`idle_closed`."""

    SLACK = 32
    """Connections being aborted (evicted, not yet gone) above ``max_connections`` at most;
    beyond, new ones are reset even if an idle one could be evicted."""

    def __init__(
        self,
        max_connections: int | None,
        idle_timeout_s: float,
        calm_idle_timeout_s: float | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.calm_idle_timeout_s = max(
            idle_timeout_s, idle_timeout_s if calm_idle_timeout_s is None else calm_idle_timeout_s
        )
        self.min_age_s = min(0.5, idle_timeout_s / 2)
        """A connection younger than this is never evicted for a newer one."""
        self._conns: dict[Connection, None] = {}  # accept order
        self._closing = 0
        self.accepted = 0
        self.refused = 0
        """New connections reset at accept (every connection was busy)."""
        self.evicted = 0
        """Idle connections aborted to make room for a new one."""
        self.idle_closed = 0
        """Connections aborted by the watchdog (no request in progress for too long)."""

    @property
    def open(self) -> int:
        """Connections accepted and not yet lost."""
        return len(self._conns)

    def protocol_factory(
        self, make_handler: Callable[[], Any], ssl_context: ssl.SSLContext | None
    ) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for ``loop.create_server``: each connection passes this
        gate, then TLS (with ``ssl_context``), then goes to ``make_handler()``."""
        return lambda: _Front(self, make_handler, ssl_context)

    def admit(self, transport: asyncio.BaseTransport) -> Connection | None:
        """A new connection: track it, or return None (the caller resets it)."""
        limit = self.max_connections
        now = asyncio.get_running_loop().time()
        if limit is not None and len(self._conns) - self._closing >= limit:
            victim = None
            if len(self._conns) < limit + self.SLACK:
                victim = self._oldest_idle(now - self.min_age_s)
            if victim is None:
                self.refused += 1
                return None
            self.evicted += 1
            self._shut(victim)
        conn = Connection(transport, now)
        self._conns[conn] = None
        self.accepted += 1
        self._arm(conn)
        return conn

    def _oldest_idle(self, accepted_before: float) -> Connection | None:
        """The oldest connection accepted before ``accepted_before`` with no request in
        progress (accept order: the scan stops at the first one that is too young)."""
        for conn in self._conns:
            if conn.since > accepted_before:
                return None
            if not conn.busy and not conn.closing:
                return conn
        return None

    def begin(self, conn: Connection) -> None:
        """A request head arrived on ``conn``: busy until :meth:`end`."""
        conn.busy += 1
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def end(self, conn: Connection) -> None:
        """The request :meth:`begin` was called for has been answered."""
        conn.busy -= 1
        if conn.busy == 0 and not conn.closed and not conn.closing:
            conn.idle_since = asyncio.get_running_loop().time()
            self._arm(conn)

    def closed(self, conn: Connection) -> None:
        """``conn`` is lost (idempotent)."""
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn, None)
        if conn.closing:
            self._closing -= 1
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def abort_all(self) -> None:
        """Abort every connection (on shutdown)."""
        for conn in list(self._conns):
            if not conn.closing:
                self._shut(conn)

    @property
    def under_pressure(self) -> bool:
        """True while at least half of ``max_connections`` are open."""
        limit = self.max_connections
        return limit is not None and 2 * len(self._conns) >= limit

    def _arm(self, conn: Connection, delay: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        wait = self.idle_timeout_s if delay is None else delay
        conn.timer = loop.call_later(wait, self._expire, conn)

    def _expire(self, conn: Connection) -> None:
        conn.timer = None
        if conn.closed or conn.busy or conn.closing:
            return
        idle = asyncio.get_running_loop().time() - conn.idle_since
        allowed = self.idle_timeout_s if self.under_pressure else self.calm_idle_timeout_s
        if idle < allowed:  # calm: look again after at most idle_timeout_s
            self._arm(conn, min(self.idle_timeout_s, allowed - idle))
            return
        self.idle_closed += 1
        self._shut(conn)

    def _shut(self, conn: Connection) -> None:
        """Abort ``conn``; it is counted until the event loop reports it lost."""
        conn.closing = True
        self._closing += 1
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        conn.transport.abort()  # type: ignore[attr-defined]


class _Front(asyncio.Protocol):
    """The first protocol of every accepted connection: admission by the gate, then TLS,
    then the hand-over to the HTTP handler (``transport.set_protocol``).

    uvloop starts reading a new connection right after ``connection_made``, whatever the
    protocol asked, so the client's first TLS bytes may reach this protocol before
    ``loop.start_tls`` puts the TLS protocol in its place: they are kept and fed to the TLS
    protocol before anything read later (asyncio's loop honours the pause; nothing comes
    early there).
    """

    def __init__(
        self,
        gate: ConnectionGate,
        make_handler: Callable[[], Any],
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.gate = gate
        self.make_handler = make_handler
        self.ssl_context = ssl_context
        self.conn: Connection | None = None
        self.lost = False
        self.raw_phase = ssl_context is not None
        """True until ``start_tls`` has put the TLS protocol on the transport."""
        self.early = bytearray()  # raw bytes that came before start_tls took over
        self.pending = bytearray()  # decrypted bytes between the handshake and the hand-over
        self.eof = False
        self.task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn = self.gate.admit(transport)
        if self.conn is None:
            transport.abort()  # type: ignore[attr-defined]
            return
        if self.ssl_context is None:
            self._hand_over(transport)
        else:
            transport.pause_reading()  # type: ignore[attr-defined]
            self.task = asyncio.ensure_future(self._handshake(transport))

    async def _handshake(self, raw: asyncio.BaseTransport) -> None:
        assert self.conn is not None and self.ssl_context is not None
        loop = asyncio.get_running_loop()
        timeout = self.gate.calm_idle_timeout_s + 1.0  # the watchdog usually comes first
        tls = None
        if not raw.is_closing() and not self.lost and not self.eof:
            start = asyncio.ensure_future(
                loop.start_tls(
                    raw,
                    self,
                    self.ssl_context,
                    server_side=True,
                    ssl_handshake_timeout=timeout,
                )
            )
            # One turn of the loop: start_tls has swapped in its TLS protocol and scheduled
            # its connection_made; the early bytes are fed right after it, in the same turn,
            # so before anything the transport reads next.
            await asyncio.sleep(0)
            self.raw_phase = False
            if self.early:
                loop.call_soon(_feed, raw.get_protocol(), bytes(self.early))
                self.early.clear()
            try:
                tls = await asyncio.wait_for(start, timeout + 1.0)
            except (OSError, ssl.SSLError, asyncio.TimeoutError, RuntimeError, ValueError):
                tls = None
        if tls is None or self.lost or tls.is_closing():
            raw.abort()  # type: ignore[attr-defined]
            self.gate.closed(self.conn)
            return
        self._hand_over(tls)

    def _hand_over(self, transport: asyncio.BaseTransport) -> None:
        assert self.conn is not None
        self.conn.transport = transport
        handler = self.make_handler()
        handler.gate_conn = self.conn
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.pending:
            handler.data_received(bytes(self.pending))
            self.pending.clear()
        if self.eof:
            handler.eof_received()

    def data_received(self, data: bytes) -> None:
        if self.raw_phase:
            self.early += data
            if len(self.early) > 1 << 16 and self.conn is not None and not self.conn.closing:
                self.gate._shut(self.conn)  # no TLS client sends that much before an answer
        else:
            self.pending += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        if self.conn is not None:
            self.gate.closed(self.conn)


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand ``data`` to ``protocol`` as if its transport had read it."""
    if isinstance(protocol, asyncio.BufferedProtocol) or hasattr(protocol, "get_buffer"):
        buffered: Any = protocol
        view = memoryview(data)
        while view:
            buf = buffered.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            buffered.buffer_updated(n)
            view = view[n:]
    else:
        protocol.data_received(data)  # type: ignore[attr-defined]
