"""The leader's command loop and the aggregation driver, run identically by every party.

docs/design.md, "A round, step by step" and "Fail closed". The driver moves the messages of
:mod:`mpc_agg.core.protocol` through the party network and applies the verdicts computed
there; local steps (durable marks, the sum share, noise) come from the store and privacy::

    leader: close requested -> broadcast CloseCommand      followers: await the broadcast
    all:    CLOSING (mark "closing") -> exchange 1: PartyView -> decide_views
            -> subtract dropped -> AGGREGATING (mark "revealing") -> sum share [+ ledger,
            + noise] -> exchange 2: ReadyVote -> decide_votes -> exchange 3: sum shares
            -> DONE        (any failure -> FAILED at every party, nothing revealed)

Everything between "the sums are fixed" and the reveal happens in :meth:`Driver.sum_share`,
whose *return value* is the only array the reveal ever sends: a share with its noise added,
or an exception, after which the party votes "not ready". It takes the running sum in place
(no second d-vector) and, in a large round (docs/design.md, "Streamed uploads"), subtracts
dropped clients block by block and runs on an ingest thread, off the event loop. A round
whose running sum was damaged (a share that could not be added whole) refuses to agree
(``storage_failure``): it fails closed.

The leader also broadcasts :class:`~mpc_agg.core.protocol.AbortCommand`: a round past its
deadline (``expired``) or aborted by the collector (``cancelled``) fails at every party that
holds it open, nothing revealed (docs/design.md, "Round deadlines"). Deadlines are checked
by :meth:`Driver.check_deadlines`, every second in a party process: the leader queues the
abort; a follower fails on its own a round still open ``grace_s`` after its deadline (the
leader never knew it, or never aborted it), and so does a leader whose links are down;
reconciliation at the next link-up tells the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

from mpc_agg.core.protocol import (
    AbortCommand,
    CloseCommand,
    Command,
    EndedRounds,
    OpenRounds,
    PartyView,
    ReadyVote,
    Refusal,
    decide_views,
    decide_votes,
    decode,
    decode_as,
    encode,
    ended_elsewhere,
    union_of_open,
)
from mpc_agg.core.ring import RingArray
from mpc_agg.core.rounds import TERMINAL, Agreement, Round, RoundState
from mpc_agg.core.statement import clients_digest
from mpc_agg.errors import AgreementFailed, PartyLinkLost, ProtocolViolation
from mpc_agg.mpc.network import PartyNetwork

from .ingest import Ingest
from .privacy import Privacy
from .store import RoundStore

log = logging.getLogger("mpc_agg.aggregator")

LEADER = 0

DEADLINE_TICK_S = 1.0
"""How often a party process checks round deadlines (:meth:`Driver.watch_deadlines`)."""

FOLLOWER_GRACE_S = 60.0
"""A follower fails an overdue round on its own only this long (plus two step deadlines)
after the deadline, so that the leader's abort, which gives every party the same verdict,
normally comes first: it may wait behind an aggregation in the leader's command loop."""


class Driver:
    """Runs the party protocol for aggregator ``store.index`` over ``network``."""

    def __init__(
        self,
        store: RoundStore,
        ingest: Ingest,
        privacy: Privacy,
        network: PartyNetwork,
        counters: dict[str, int],
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.ingest = ingest
        self.privacy = privacy
        self.network = network
        self.counters = counters
        self.clock = clock
        self.index = store.index
        self.queue: asyncio.Queue[Command] = asyncio.Queue()
        """Leader: the commands to broadcast, in order (closes and aborts)."""
        self.aborting: dict[str, str] = {}
        """Leader: round id -> code of each abort queued and not yet applied."""
        self.grace_s = FOLLOWER_GRACE_S + 2 * store.topology.deadlines.step_s

    @property
    def is_leader(self) -> bool:
        return self.index == LEADER

    # -- the command loop ---------------------------------------------------------------

    def queue_close(self, round_id: str) -> None:
        """Leader: broadcast a close of ``round_id`` when the command loop gets to it."""
        self.queue.put_nowait(CloseCommand(round_id))

    def queue_abort(self, round_id: str, code: str) -> None:
        """Leader: broadcast an abort of ``round_id`` (idempotent while one is queued). A
        close queued before it is skipped: the abort wins."""
        if round_id in self.aborting:
            return
        command = AbortCommand(round_id, code)
        self.aborting[round_id] = code
        self.queue.put_nowait(command)
        log.info("round %s: abort (%s) queued", round_id, code)

    async def serve(self) -> None:
        """Forever: reconcile once, then receive the leader's next command and execute it
        with all parties."""
        failed = await self.reconcile()
        if failed:
            log.warning("%d round(s) failed here because they had ended elsewhere", failed)
        while True:
            if self.is_leader:
                command = await self.queue.get()
                if isinstance(command, CloseCommand) and command.round_id in self.aborting:
                    rnd = self.store.rounds.get(command.round_id)
                    if rnd is not None and rnd.state is RoundState.OPEN and rnd.close_requested:
                        rnd.withdraw_close()
                    continue  # an abort was requested since: it follows in the queue
                try:
                    raw = await self.network.broadcast(encode(command), LEADER)
                except PartyLinkLost as exc:
                    rnd = self.store.rounds.get(command.round_id)
                    if isinstance(command, AbortCommand):
                        self.aborting.pop(command.round_id, None)
                        self.abort_here(rnd, command.code)  # reconcile tells the others
                        continue
                    self.fail(rnd, f"cannot close: {exc}", "party_lost")
                    if rnd is not None and rnd.state in TERMINAL:
                        self.wind_up(rnd)  # ended for good; reconcile tells the others
                    continue
                except BaseException:
                    rnd = self.store.rounds.get(command.round_id)
                    if isinstance(command, AbortCommand):
                        # Still wanted after the links come back (applying it twice is
                        # harmless: a round no longer open is left alone).
                        self.queue.put_nowait(command)
                    elif rnd is not None and rnd.state is RoundState.OPEN:
                        rnd.withdraw_close()  # a later close may try again
                    raise
            else:
                try:
                    raw = await self.network.broadcast(None, LEADER)
                except PartyLinkLost as exc:
                    log.error("waiting for the leader: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
            try:
                received = decode(raw)
                if not isinstance(received, (CloseCommand, AbortCommand)):
                    raise ProtocolViolation(
                        f"malformed party message: expected a command, got "
                        f"{type(received).__name__}"
                    )
            except ProtocolViolation as exc:
                log.error("ignoring a command from the leader: %s", exc)
                continue
            if isinstance(received, AbortCommand):
                self.apply_abort(received)
            else:
                await self.aggregate(received.round_id)

    # -- deadlines and aborts -----------------------------------------------------------

    def apply_abort(self, command: AbortCommand) -> None:
        """Every party, on the leader's abort: fail the round if it is open here."""
        if self.is_leader:
            self.aborting.pop(command.round_id, None)
        rnd = self.store.rounds.get(command.round_id)
        if rnd is None or rnd.state is not RoundState.OPEN:
            log.info("round %s: abort (%s) has nothing to do here", command.round_id, command.code)
            return
        self.abort_here(rnd, command.code)

    def abort_here(self, rnd: Round | None, code: str) -> None:
        """Fail ``rnd`` here with ``code`` (``expired`` or ``cancelled``) if it is still
        open, and end its journal; nothing of it is revealed and its id stays used."""
        if rnd is None or rnd.state is not RoundState.OPEN:
            return
        if code == "expired":
            max_open_s = self.store.topology.rounds.max_open_s
            reason = (
                f"round {rnd.round_id!r} was not closed within rounds.max_open_s = "
                f"{max_open_s:g} s of its opening; nothing is revealed"
            )
        else:
            reason = f"round {rnd.round_id!r} was aborted by the collector; nothing is revealed"
        self.fail(rnd, reason, code)
        self.wind_up(rnd)

    def check_deadlines(self) -> int:
        """Act on every open round past its deadline (``rounds.max_open_s``); returns how
        many rounds this call aborted or failed.

        The leader queues an abort (code ``expired``) for the command loop to broadcast,
        unless a close is already queued (its outcome decides); a leader whose links are
        down fails its overdue rounds, and those whose abort is queued, itself. A follower
        fails a round that is still open :attr:`grace_s` after its deadline. A round failed
        by one party alone is failed at the others by reconciliation when the links come up
        (or by their own deadline).
        """
        now = self.clock()
        acted = 0
        connected = self.network.connected
        for rnd in self.store.live_rounds():
            if self.is_leader and connected:
                if rnd.overdue(now) and not rnd.close_requested:
                    if rnd.round_id not in self.aborting:
                        self.queue_abort(rnd.round_id, "expired")
                        acted += 1
            elif self.is_leader and rnd.round_id in self.aborting:
                self.abort_here(rnd, self.aborting[rnd.round_id])
                acted += 1
            elif rnd.overdue(now, 0.0 if self.is_leader else self.grace_s):
                self.abort_here(rnd, "expired")
                acted += 1
        return acted

    async def watch_deadlines(self, tick_s: float = DEADLINE_TICK_S) -> None:
        """Forever: :meth:`check_deadlines` every ``tick_s`` seconds."""
        while True:
            try:
                self.check_deadlines()
            except Exception:  # noqa: BLE001 - logged; the next tick tries again
                log.exception("checking round deadlines failed")
            await asyncio.sleep(tick_s)

    async def reconcile(self) -> int:
        """Every party, each time the party links come up: a round that has ended at any
        party ends at every party (e.g. one this party got back open after it crashed before
        it could mark the close). Two exchanges, the same at every party; returns how many
        rounds this party failed."""
        mine = sorted(r for r, rnd in self.store.rounds.items() if rnd.state not in TERMINAL)
        opened = [
            _or_empty(raw, OpenRounds)
            for raw in await self.network.exchange(encode(OpenRounds(tuple(mine))))
        ]
        ended = tuple(r for r in union_of_open(opened) if self.store.ended_here(r))
        verdicts = [
            _or_empty(raw, EndedRounds)
            for raw in await self.network.exchange(encode(EndedRounds(ended)))
        ]
        failed = 0
        for round_id, j in ended_elsewhere(verdicts, self.index).items():
            rnd = self.store.rounds.get(round_id)
            if rnd is None or rnd.state in TERMINAL:
                continue
            self.fail(
                rnd,
                f"round {round_id!r} had ended at aggregator {j}; nothing revealed",
                "ended_elsewhere",
            )
            self.wind_up(rnd)
            failed += 1
        return failed

    # -- one aggregation ----------------------------------------------------------------

    async def aggregate(self, round_id: str) -> None:
        """Close, agree on the client set, and reveal ``round_id``; every party runs this.

        Every party makes the same exchanges whatever happens locally (views, then a
        readiness vote, then the sum shares), so the parties never fall out of step, every
        party reaches the same verdict, and no share of the total leaves any party unless
        every party holds its noised share.
        """
        t0 = self.clock()
        rnd = self.store.rounds.get(round_id)
        if rnd is not None and rnd.state is RoundState.OPEN:
            rnd.close()
        try:
            if rnd is not None:
                await self.ingest.drain(rnd)  # inside the try: a cancellation fails the round
            live = rnd is not None and rnd.state is RoundState.CLOSING
            view = PartyView(
                round_id,
                rnd.dim if live and rnd else None,
                rnd.min_clients if live and rnd else 0,
                frozenset(rnd.accepted) if live and rnd else frozenset(),
                self.refusal(round_id) if live else None,
                self.privacy.summary(round_id),
            )
            try:
                raw_views = await self.network.exchange(encode(view))  # exchange 1
                agreement = decide_views([decode_as(v, PartyView) for v in raw_views])
            except AgreementFailed as exc:  # same views everywhere: same verdict everywhere
                self.fail(rnd, str(exc), exc.code)
                return
            assert rnd is not None  # decide_views fails if any party lacks the round
            share: RingArray | None = None
            try:
                if self.store.streamed(rnd.dim, rnd.ring):  # O(d) work off the loop
                    share = await self.ingest.run(self.sum_share, rnd, agreement)
                else:
                    share = self.sum_share(rnd, agreement)
            except Exception:  # noqa: BLE001 - announced to all parties in exchange 2
                log.exception("round %s: cannot compute this aggregator's sum share", round_id)
            t_agreed = self.clock()
            try:
                raw_votes = await self.network.exchange(encode(ReadyVote(share is not None)))
                decide_votes([decode_as(v, ReadyVote) for v in raw_votes])  # exchange 2
                assert share is not None  # this party voted too
                total = await self.privacy.reveal(self.network, round_id, share, rnd.dim)
            except AgreementFailed as exc:
                self.fail(rnd, str(exc), exc.code)
                return
            rnd.reveal(total)
            rnd.clients_digest = clients_digest(agreement.clients)
            t_done = self.clock()
            rnd.timings.update(
                {
                    "open_s": round(t0 - rnd.opened_at, 6),
                    "agree_s": round(t_agreed - t0, 6),
                    "reveal_s": round(t_done - t_agreed, 6),
                }
            )
            self.counters["rounds_done"] += 1
            log.info(
                "round %s done: %d clients (%d dropped), agree %.3fs, reveal %.3fs",
                round_id,
                rnd.num_clients,
                len(rnd.dropped_clients),
                t_agreed - t0,
                t_done - t_agreed,
            )
        except asyncio.CancelledError:
            self.fail(
                rnd, "the party network was lost during aggregation; nothing revealed", "party_lost"
            )
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a party link lost: the round must end
            log.exception("round %s: aggregation error", round_id)
            lost = isinstance(exc, PartyLinkLost)
            detail = str(exc) if lost else "see the aggregators' logs"
            self.fail(
                rnd,
                f"aggregation error at aggregator {self.index}: {detail}",
                "party_lost" if lost else "aggregation_error",
            )
        finally:
            if rnd is not None and rnd.state in TERMINAL:
                self.wind_up(rnd)

    def refusal(self, round_id: str) -> Refusal | None:
        """Why this aggregator refuses to aggregate ``round_id`` (sent in exchange 1), or
        None: its running sum is damaged (a share could not be added whole), its privacy
        refuses (plan, budget), or the ``closing`` mark cannot be made durable (after a
        restart this round must only come back failed)."""
        rnd = self.store.rounds.get(round_id)
        damaged = None if rnd is None else rnd.sum_damaged
        if damaged is not None:
            return Refusal(
                "storage_failure",
                f"aggregator {self.index} cannot trust its running sum of round "
                f"{round_id!r} ({damaged}); nothing is revealed",
            )
        refusal = self.privacy.refusal(round_id)
        if refusal is not None:
            return refusal
        try:
            self.store.journals[round_id].append_mark("closing")
        except (OSError, KeyError) as exc:
            log.error("round %s: cannot mark the close durably (%s)", round_id, exc)
            return Refusal(
                "storage_failure",
                f"aggregator {self.index} could not record the close of round {round_id!r} "
                "durably; nothing is revealed",
            )
        return None

    def sum_share(self, rnd: Round, agreement: Agreement) -> RingArray:
        """This aggregator's share of the total, ready to reveal: the agreed clients' sum,
        with this aggregator's noise added when the round has DP. Raises on any failure,
        and then nothing of the share leaves the party.

        In order, each step complete or raising: subtract dropped clients (block by block
        for streamed shares and in large rounds: read back from the spool, re-expanded);
        mark the round ``revealing`` in its journal (durable); take the running sum in place
        (refused if damaged); with DP, charge the release in the ledger (durable) and add
        the noise (docs/design.md, "Fail closed"). Any thread (an ingest thread for a large
        round).
        """
        gone = sorted(rnd.accepted.keys() - agreement.clients)
        dropped = [self.store.share_blocks(rnd, c, rnd.accepted[c]) for c in gone]
        rnd.agree(agreement.clients, dropped, agreement.dropped)
        self.store.journals[rnd.round_id].append_mark("revealing")
        return self.privacy.noisy(rnd.round_id, rnd.take_sum())

    # -- ending ---------------------------------------------------------------------------

    def fail(self, rnd: Round | None, reason: str, code: str) -> None:
        """Fail ``rnd`` here (if still live) with ``code``; nothing will be revealed."""
        if rnd is None:
            log.warning("close of an unknown round failed: %s", reason)
            return
        if rnd.state not in TERMINAL:
            rnd.fail(reason, code)
            self.counters["rounds_failed"] += 1
        log.warning("round %s failed (%s): %s", rnd.round_id, code, reason)

    def wind_up(self, rnd: Round) -> None:
        """An ended round keeps only its total (DONE); its journal ends and goes, once no
        ingest thread can still write to it (uploads reserved before a cancelled close are
        refused as they finish)."""
        self.store.keep_result(rnd)
        journal = self.store.journals.pop(rnd.round_id, None)
        if journal is None:
            return
        state = rnd.state.value

        def forget() -> None:
            self.store.forget_journal(rnd.round_id, journal, state)

        if not rnd.pending:
            forget()
        else:
            self.ingest.track(self.ingest.settle_then(rnd, forget))


M = TypeVar("M", OpenRounds, EndedRounds)


def _or_empty(raw: object, kind: type[M]) -> M:
    """A reconcile message of ``kind``, or an empty one (logged) if a peer sent something
    malformed: a broken peer cannot stop the others from reconciling."""
    try:
        message: M = decode_as(raw, kind)
    except ProtocolViolation as exc:
        log.error("reconcile: %s", exc)
        return kind(())
    return message
