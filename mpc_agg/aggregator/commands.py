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
or an exception, after which the party votes "not ready".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

from mpc_agg.core import codec
from mpc_agg.core.field import FieldArray
from mpc_agg.core.protocol import (
    CloseCommand,
    EndedRounds,
    OpenRounds,
    PartyView,
    ReadyVote,
    Refusal,
    decide_views,
    decide_votes,
    decode_as,
    encode,
    ended_elsewhere,
    union_of_open,
)
from mpc_agg.core.rounds import TERMINAL, Agreement, Round, RoundState
from mpc_agg.core.sharing import Share, ShareKind
from mpc_agg.core.statement import clients_digest
from mpc_agg.errors import AgreementFailed, PartyLinkLost, ProtocolViolation
from mpc_agg.mpc.network import PartyNetwork

from .ingest import Ingest
from .privacy import Privacy
from .store import RoundStore

log = logging.getLogger("mpc_agg.aggregator")

LEADER = 0


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
        self.close_queue: asyncio.Queue[str] = asyncio.Queue()

    @property
    def is_leader(self) -> bool:
        return self.index == LEADER

    # -- the command loop ---------------------------------------------------------------

    async def serve(self) -> None:
        """Forever: reconcile once, then receive the leader's next command and execute it
        with all parties."""
        failed = await self.reconcile()
        if failed:
            log.warning("%d round(s) failed here because they had ended elsewhere", failed)
        while True:
            if self.is_leader:
                round_id = await self.close_queue.get()
                try:
                    raw = await self.network.broadcast(encode(CloseCommand(round_id)), LEADER)
                except PartyLinkLost as exc:
                    rnd = self.store.rounds.get(round_id)
                    self.fail(rnd, f"cannot close: {exc}", "party_lost")
                    if rnd is not None and rnd.state in TERMINAL:
                        self.wind_up(rnd)  # ended for good; reconcile tells the others
                    continue
                except BaseException:
                    rnd = self.store.rounds.get(round_id)
                    if rnd is not None and rnd.state is RoundState.OPEN:
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
                command = decode_as(raw, CloseCommand)
            except ProtocolViolation as exc:
                log.error("ignoring a command from the leader: %s", exc)
                continue
            await self.aggregate(command.round_id)

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
            share: FieldArray | None = None
            try:
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
        None: its privacy refuses (plan, budget), or the ``closing`` mark cannot be made
        durable (after a restart this round must only come back failed)."""
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

    def sum_share(self, rnd: Round, agreement: Agreement) -> FieldArray:
        """This aggregator's share of the total, ready to reveal: the agreed clients' sum,
        with this aggregator's noise added when the round has DP. Raises on any failure,
        and then nothing of the share leaves the party.

        In order, each step complete or raising: subtract dropped clients; mark the round
        ``revealing`` in its journal (durable); with DP, charge the release in the ledger
        (durable) and add the noise (docs/design.md, "Fail closed").
        """
        gone = sorted(rnd.accepted.keys() - agreement.clients)
        dropped = [self._share_vector(rnd, c) for c in gone]
        rnd.agree(agreement.clients, dropped, agreement.dropped)
        self.store.journals[rnd.round_id].append_mark("revealing")
        return self.privacy.noisy(rnd.round_id, rnd.local_sum())

    def _share_vector(self, rnd: Round, client_id: str) -> FieldArray:
        """The expanded share of an accepted client (re-read from the journal if FULL)."""
        accepted = rnd.accepted[client_id]
        if accepted.kind is ShareKind.SEED:
            assert accepted.seed is not None
            return Share(self.index, ShareKind.SEED, rnd.dim, seed=accepted.seed).expand(
                rnd.round_id, client_id
            )
        assert isinstance(accepted.ref, tuple)
        body = self.store.journals[rnd.round_id].read(accepted.ref)
        return codec.decode_share(body, aggregator=self.index, dim=rnd.dim).expand(
            rnd.round_id, client_id
        )

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
