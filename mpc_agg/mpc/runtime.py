"""The only module that imports ``mpyc``.

MPyC parses ``sys.argv`` and configures logging when ``mpyc.runtime`` is first imported, and
keeps one global runtime. :func:`load_runtime` sets ``sys.argv`` to the options built from the
topology (:func:`mpc_agg.mpc.argv.mpyc_argv`), imports MPyC once, and restores ``sys.argv``.
Configure logging before calling it, so MPyC's ``basicConfig`` leaves yours in place.

MPyC's own ``start()`` listens on every interface and, without ``--ssl``, believes the party
number a peer sends; :class:`MpycNetwork` opens the links itself instead (README, "Security
model"): it listens on the party's own address only, speaks TLS 1.3 with the certificates
the topology pins, checks a peer's certificate against the index it claims before reading
anything else, compares topology fingerprints before the first message of the protocol,
and installs the restricted unpickler (:mod:`mpc_agg.mpc.unpickle`) for everything MPyC
receives. It dials each peer at the host MPyC parsed from ``-P host:port`` (an IPv6 literal
too: MPyC splits at the last colon) and listens on :attr:`LinkSecurity.bind_host`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpc_agg.config.fingerprint import differing_sections
from mpc_agg.config.schema import host_port
from mpc_agg.errors import PartyLinkLost, StartupError
from mpc_agg.transport.tls import (
    der_of,
    party_client_context,
    party_server_context,
    pinned_index,
)

log = logging.getLogger("mpc_agg.mpc")


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


class RefusedMessage:
    """What MPyC hands on in place of a peer message the restricted unpickler refused
    (:mod:`mpc_agg.mpc.unpickle`): raising inside MPyC's transfer would stop the event
    loop, so the refusal travels as a value and :class:`MpycNetwork` drops the links."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _install_unpickler() -> None:
    """Route every ``pickle.loads`` in ``mpyc.runtime`` through the restricted unpickler;
    a refused message becomes a :class:`RefusedMessage`."""
    from mpc_agg.mpc import unpickle

    def loads(data: bytes) -> object:
        try:
            return unpickle.restricted_loads(data)
        except pickle.UnpicklingError as exc:
            return RefusedMessage(str(exc))

    unpickle.install(loads)


@dataclass(frozen=True)
class LinkSecurity:
    """What a party needs to open authenticated party links (docs/design.md, "Keys and
    identities"): its certificate and key files, every party's pinned ``party_cert`` by
    index, the address to listen on (its own host, or the bind address of its local
    settings; an IPv6 literal without brackets), and its topology's section digests
    (:func:`mpc_agg.config.fingerprint.section_digests`)."""

    cert_key: tuple[Path, Path]
    pins: dict[int, str]
    bind_host: str
    digests: dict[str, str]


def _supervise_links(on_lost: Any, pins: dict[int, str]) -> None:
    """Make MPyC create links that check the peer's pinned certificate against the index it
    claims, and whose loss calls ``on_lost(link, exc)`` instead of MPyC's own handler
    (which raises inside an event-loop callback or unsets a link blindly)."""
    from mpyc import asyncoro

    base = asyncoro.MessageExchanger
    if getattr(base, "supervised", False):
        base = base.__mro__[1]

    class SupervisedExchanger(base):  # type: ignore[misc, valid-type]
        supervised = True
        retired = False  # set on links this party dropped on purpose

        identity_checked = False

        def data_received(self, data: bytes) -> None:
            # MPyC's listening side takes the peer's party number from its first two bytes;
            # refuse, before anything else is read, a peer whose certificate is not the one
            # pinned for the index it claims.
            if self.peer_pid is None and not self.identity_checked:
                head = bytes(self.bytes) + data
                if len(head) >= 2:
                    self.identity_checked = True
                    if not self._identity_matches(int.from_bytes(head[:2], "little")):
                        self.retired = True
                        self.transport.close()
                        return
            if self.retired:
                return
            super().data_received(data)

        def _identity_matches(self, claimed: int) -> bool:
            ssl_object = self.transport.get_extra_info("ssl_object")
            der = None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
            if der is not None and claimed in pins and der == der_of(pins[claimed]):
                return True
            log.error(
                "refusing a party link: the peer claims to be aggregator %d but does not "
                "present the certificate the topology pins for it (it presents %s)",
                claimed,
                "none" if der is None else f"that of aggregator {pinned_index(der, pins)}",
            )
            return False

        def connection_lost(self, exc: BaseException | None) -> None:
            if not self.retired:
                on_lost(self, exc)

    asyncoro.MessageExchanger = SupervisedExchanger


class MpycNetwork:
    """:class:`~mpc_agg.mpc.network.PartyNetwork` over MPyC's party links (``mpc.transfer``).

    Adds what MPyC lacks for a long-running service:

    * link supervision: a lost link sets :attr:`broken` (MPyC would raise inside a callback
      or, on the next send, stop the event loop);
    * a deadline on every step (``step_timeout_s``): a party that does not answer in time is
      treated as a lost link, and this party closes all its links so the others notice too;
    * :meth:`reconnect`: every party drops all links, resets MPyC's program counter and
      PRSS keys, and connects afresh, so a restarted party rejoins and later rounds work.
    """

    def __init__(
        self,
        argv: list[str],
        security: LinkSecurity,
        *,
        step_timeout_s: float = 30.0,
        mismatch_retry_s: float = 5.0,
    ) -> None:
        self._mpc = load_runtime(argv)
        _install_unpickler()  # every message from a peer goes through it
        self.pid: int = self._mpc.pid
        self.m: int = len(self._mpc.parties)
        self.security = security
        self.step_timeout_s = step_timeout_s
        self.mismatch_retry_s = mismatch_retry_s
        self.broken = asyncio.Event()
        self.mismatch: str | None = None
        """Why the links were last refused for a topology mismatch (None once they agree)."""
        self._connected = False
        self._lost: set[int] = set()
        self._secfld: Any = None
        _supervise_links(self._on_lost, security.pins)

    @property
    def connected(self) -> bool:
        """True while every link to another party is up."""
        return self._connected and not self.broken.is_set()

    def missing(self) -> list[int]:
        """Peers whose link is down (or not yet up)."""
        if not self._connected:
            return [p.pid for p in self._mpc.parties if p.pid != self.pid and p.protocol is None]
        return sorted(self._lost)

    def run(self, coro: Any) -> Any:
        """Run ``coro`` to completion on MPyC's event loop."""
        return self._mpc.run(coro)

    async def start(self) -> None:
        """Connect to every other party and check that all hold this topology; returns when
        all links are up and agree (retries forever; a mismatch is logged and retried
        every ``mismatch_retry_s``)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._connect_all()
            # MPyC resolves this party's own "protocol" future once all links are up; a fresh
            # one keeps later resolutions legal. Our hook replaces MPyC's connection_lost,
            # which would raise in a callback or unset a link that a reconnect has replaced.
            self._mpc.parties[self.pid].protocol = loop.create_future()
            self._lost.clear()
            self.broken.clear()
            try:
                mismatch = await self._compare_topologies()
            except PartyLinkLost as exc:
                log.warning("a link dropped during the topology check (%s); reconnecting", exc)
                self._drop_links()
                self._reset_counters()
                await asyncio.sleep(0.2)
                continue
            if mismatch is None:
                break
            self.mismatch = mismatch
            log.error("refusing the party links: %s", mismatch)
            self._drop_links()
            self._reset_counters()
            await asyncio.sleep(self.mismatch_retry_s)
        self.mismatch = None
        self._connected = True

    async def _connect_all(self) -> None:
        """MPyC's ``start()`` with authenticated links: listen on this party's own address
        (or its bind address) only, for lower indices; dial higher ones; TLS 1.3 with
        pinned certificates."""
        from mpyc import asyncoro

        rt, sec = self._mpc, self.security
        loop = asyncio.get_running_loop()
        for peer in rt.parties:
            peer.protocol = loop.create_future() if peer.pid == self.pid else None
        server = None
        if self.pid:
            lower = [sec.pins[j] for j in range(self.pid)]
            port = rt.parties[self.pid].port
            try:
                server = await loop.create_server(
                    lambda: asyncoro.MessageExchanger(rt),
                    host=sec.bind_host,
                    port=port,
                    ssl=party_server_context(sec.cert_key, lower),
                )
            except OSError as exc:
                raise StartupError(
                    f"cannot listen for party links on {host_port(sec.bind_host, port)}: "
                    f"{os.strerror(exc.errno) if exc.errno else exc}"
                ) from None
        try:
            for peer in rt.parties[self.pid + 1 :]:
                context = party_client_context(sec.cert_key, sec.pins[peer.pid])
                while True:
                    try:
                        await loop.create_connection(
                            functools.partial(asyncoro.MessageExchanger, rt, peer.pid),
                            peer.host,
                            peer.port,
                            ssl=context,
                        )
                        break
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - peer not up yet: retry
                        log.debug("connecting to aggregator %d: %s", peer.pid, exc)
                    await asyncio.sleep(0.1)
            await rt.parties[self.pid].protocol
        finally:
            if server is not None:
                server.close()

    async def _compare_topologies(self) -> str | None:
        """Exchange section digests with every party; a description of the first mismatch,
        or None when every party holds the same topology."""
        digests = self.security.digests
        theirs = await self._await(self._mpc.transfer(digests), self.step_timeout_s)
        for j, other in enumerate(theirs):
            sections = differing_sections(digests, other)
            if j != self.pid and sections:
                return (
                    f"aggregator {j} runs another topology (differing section(s): "
                    f"{', '.join(sections)}); every party must load the same topology file"
                )
        return None

    def _reset_counters(self) -> None:
        self._mpc._program_counter = [0, 0]
        self._mpc._pc_level = 0
        self._mpc.threshold = self._mpc.threshold  # fresh PRSS keys, cleared PRF cache

    def _peers(self) -> list[Any]:
        return [p for p in self._mpc.parties if p.pid != self.pid]

    def _on_lost(self, protocol: Any, exc: BaseException | None) -> None:
        pid = protocol.peer_pid
        if pid is None or self._mpc.parties[pid].protocol is not protocol:
            return  # a link that never completed its handshake, or one already replaced
        self._lost.add(pid)
        if not self.broken.is_set():
            log.warning("link to aggregator %d lost%s", pid, f": {exc}" if exc else "")
            self.broken.set()

    def _drop_links(self) -> None:
        for peer in self._peers():
            proto = peer.protocol
            peer.protocol = None
            if proto is not None:
                proto.retired = True
                try:
                    proto.close_connection()
                except Exception:  # noqa: BLE001 - transport may be gone already
                    pass

    def _check(self) -> None:
        if not self.connected:
            raise PartyLinkLost(f"the link to aggregator(s) {self.missing()} is down")

    async def _await(self, transfer: Any, timeout_s: float | None) -> Any:
        """Await an MPyC transfer; fail on a lost link or, with ``timeout_s``, on a deadline."""
        fut = asyncio.ensure_future(transfer)
        waiter = asyncio.ensure_future(self.broken.wait())
        try:
            done, _ = await asyncio.wait(
                {fut, waiter}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        if fut in done:
            result = fut.result()
            refused = [
                r
                for r in (result if isinstance(result, list) else [result])
                if isinstance(r, RefusedMessage)
            ]
            if refused:
                # A configured peer sent something the protocol never sends: drop every
                # link (all parties then reconnect) and fail the step.
                reason = refused[0].reason
                log.error("a party sent a message that is not allowed (%s); dropping links", reason)
                self.broken.set()
                self._drop_links()
                raise PartyLinkLost(f"a party sent a message that is not allowed: {reason}")
            return result
        fut.cancel()
        if not done:  # deadline: treat as a lost link, and drop ours so the others notice
            self.broken.set()
            self._drop_links()
            raise PartyLinkLost(
                f"a party did not answer within the step deadline of {timeout_s:g} s"
            )
        raise PartyLinkLost(f"the link to aggregator(s) {self.missing()} is down")

    async def broadcast(self, obj: Any, sender: int) -> Any:
        """Party ``sender``'s ``obj`` to all. Receivers wait without a deadline (they are idle
        until the leader has work) but fail as soon as a link is lost."""
        self._check()
        transfer = self._mpc.transfer(obj if self.pid == sender else None, senders=sender)
        return await self._await(transfer, None)

    async def exchange(self, obj: Any) -> list[Any]:
        """All-to-all; fails after ``step_timeout_s`` or as soon as a link is lost."""
        self._check()
        objects: list[Any] = await self._await(self._mpc.transfer(obj), self.step_timeout_s)
        return objects

    async def joint_binomial_sum(self, local_sum: Any, trials: int) -> Any:
        """docs/design.md, "Differential privacy" (``binomial``): open ``sum_j S_j + Z`` where
        each coordinate of
        ``Z`` is ``Bin(trials, 1/2) - trials/2`` built from secret random bits generated
        jointly inside MPyC, so no aggregator knows any part of the noise. Every party
        inputs its canonical sum share ``S_j``; returns the opened total (canonical uint64).
        Needs threshold >= 1 (with t = 0 MPyC's "secret" values are plain)."""
        self._check()
        bits = trials * int(local_sum.shape[0])
        timeout = self.step_timeout_s + bits / 1e4  # generous: ~7e4 bits/s measured
        return await self._await(self._joint_binomial(local_sum, trials), timeout)

    async def _joint_binomial(self, local_sum: Any, trials: int) -> Any:
        import numpy as np

        from mpc_agg.core.field import P

        mpc = self._mpc
        if self._secfld is None:
            self._secfld = mpc.SecFld(order=P)
        secfld = self._secfld
        d = int(local_sum.shape[0])
        shares = mpc.input(secfld.array(local_sum.astype(np.int64)))
        total = shares[0]
        for x in shares[1:]:
            total = total + x
        bits = mpc.np_random_bits(secfld, trials * d)
        noise = mpc.np_sum(mpc.np_reshape(bits, (d, trials)), axis=1)
        opened = await mpc.output(total + noise - trials // 2)
        return np.asarray(opened.value, dtype=object).astype(np.uint64)

    async def reconnect(self) -> None:
        """Drop every link and connect afresh (returns once all parties are back)."""
        self._connected = False
        self._drop_links()
        self._reset_counters()
        await self.start()

    async def stop(self) -> None:
        """Close links without MPyC's shutdown barrier (other parties may already be gone)."""
        self._connected = False
        self._drop_links()
