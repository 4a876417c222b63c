"""The aggregator role: rounds, uploads, journal, and the leader-driven aggregation.

DESIGN.md, "Processes" and "Rounds". One :class:`Aggregator` per party process. HTTP
handlers call the synchronous methods (:meth:`open_round`, :meth:`receive_share`, ...);
:meth:`serve_commands` runs for the life of the process and performs, identically on every
party, each aggregation the leader broadcasts::

    leader: close requested -> broadcast ("close", round)   followers: await the broadcast
    all:    CLOSING (mark "closing") -> exchange views -> agree_client_set -> subtract
            dropped -> AGGREGATING (mark "revealing") -> sum share [+ ledger, + noise]
            -> reveal_sum -> DONE        (any failure -> FAILED, nothing revealed)

Fail closed (docs/design.md, "Fail closed"): everything between "the sums are fixed" and the
reveal happens in :meth:`Aggregator._sum_share`, whose *return value* is the only array the
reveal ever sends. It returns a share with its noise added, or raises; on any exception the
party sends the abort marker and the round fails at every party. Round ids are single-use
(:class:`~mpc_agg.storage.round_index.RoundIndex`), and a round whose journal says it was
closing or revealing comes back FAILED after a restart, never open.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mpc_agg.config.schema import Topology
from mpc_agg.core import codec, field
from mpc_agg.core.field import FieldArray
from mpc_agg.core.rounds import (
    TERMINAL,
    PartyView,
    Round,
    RoundState,
    agree_client_set,
    upload_digest,
)
from mpc_agg.core.sharing import Share, ShareKind
from mpc_agg.dp.accountant import PrivacyLedger
from mpc_agg.errors import (
    AgreementFailed,
    BudgetExceeded,
    ConfigError,
    InvalidRequest,
    NotLeader,
    PartyLinkLost,
    PartyNetworkDown,
    ResultExpired,
    ResultNotReady,
    RoundAborted,
    RoundConflict,
    RoundEnded,
    RoundFull,
    RoundIdUsed,
    StateError,
    StorageFailure,
    UnknownRound,
)
from mpc_agg.mpc.network import PartyNetwork
from mpc_agg.mpc.reveal import reveal_sum
from mpc_agg.storage.round_index import RoundIndex
from mpc_agg.transport.journal import RoundJournal
from mpc_agg.transport.ledger import LedgerFile

log = logging.getLogger("mpc_agg.aggregator")

LEADER = 0

INGEST_THREADS = max(1, min(4, os.cpu_count() or 1))
"""Threads doing the O(d) work of uploads at one aggregator."""


def plan_summary(plan: Any) -> dict[str, Any] | None:
    """What every party must agree on about a round's noise (None without DP): journaled
    when the round opens and compared in the exchange of views."""
    if plan is None:
        return None
    return {
        "mechanism": plan.mechanism,
        "epsilon": plan.epsilon,
        "delta": plan.delta,
        "d": plan.d,
        "honest": plan.honest,
        "sigma2": plan.sigma2,
        "trials": plan.trials,
    }


class Aggregator:
    """Aggregator ``index`` of ``topology``; ``network`` links it to the other parties.

    ``clock`` (seconds, monotonic) is injected so tests can control timings;
    ``noise_stream`` makes the keystream that DP noise is drawn from (default: a fresh
    :class:`~mpc_agg.dp.discrete_gaussian.NoiseStream` keyed from the OS per round).
    """

    def __init__(
        self,
        topology: Topology,
        index: int,
        network: PartyNetwork,
        *,
        clock: Callable[[], float] = time.monotonic,
        reveal_delay_s: float = 0.0,
        noise_stream: Callable[[], Any] | None = None,
    ) -> None:
        self.topology = topology
        self.index = index
        self.network = network
        self.clock = clock
        self.reveal_delay_s = reveal_delay_s  # fault injection for tests only
        self._noise_stream = noise_stream
        self.round_index = RoundIndex(
            topology.aggregator_dir(index) / "rounds.index", fsync=topology.fsync
        )
        self.rounds: dict[str, Round] = {}
        self._journals: dict[str, RoundJournal] = {}
        self._close_queue: asyncio.Queue[str] = asyncio.Queue()
        self._close_requested: set[str] = set()
        # O(d) upload work runs here: numpy, OpenSSL and file I/O release the GIL.
        self._ingest_pool = ThreadPoolExecutor(
            max_workers=INGEST_THREADS, thread_name_prefix=f"ingest-{index}"
        )
        self._ingesting: set[asyncio.Future[None]] = set()
        self._results: list[str] = []  # rounds holding a total, in the order they ended
        self._expired: set[str] = set()  # ended rounds whose total was dropped
        self._plans: dict[str, Any] = {}  # round id -> NoisePlan, with DP only
        self._privacy: dict[str, dict[str, Any]] = {}  # round id -> privacy fields of its result
        self.ledger: PrivacyLedger | None = None
        self._ledger_file: LedgerFile | None = None
        if topology.dp is not None:
            self._ledger_file = LedgerFile(topology.ledger_path(index), fsync=topology.fsync)
            self.ledger = self._ledger_file.load(
                topology.dp.budget_epsilon, topology.dp.budget_delta
            )
            self._check_ledger_against_index()
        self.metrics: dict[str, int] = {
            "uploads_accepted": 0,
            "uploads_retried": 0,
            "uploads_refused": 0,
            "bytes_accepted": 0,
            "rounds_opened": 0,
            "rounds_done": 0,
            "rounds_failed": 0,
        }

    def _check_ledger_against_index(self) -> None:
        """The ledger must hold every round the index says was revealed with DP; a new
        index starts with every round id the ledger holds (they were used before it)."""
        assert self.ledger is not None
        charged = {e.round_id for e in self.ledger.events}
        if not self.round_index.existed:
            for round_id in sorted(charged):  # ids spent before round indexes existed
                self.round_index.record(round_id, "failed")
            return
        missing = sorted(set(self.round_index.revealed_with_dp()) - charged)
        if missing:
            raise StateError(
                f"aggregator {self.index}: the privacy ledger {self._ledger_file} lacks "
                f"{len(missing)} round(s) that were revealed with DP (e.g. {missing[0]!r}); "
                "refusing to start with a budget that forgot them. Restore the ledger; only "
                "to start a new privacy budget on purpose, remove both it and rounds.index"
            )

    @property
    def is_leader(self) -> bool:
        return self.index == LEADER

    # -- requests from clients and the collector ----------------------------------------

    def open_round(self, round_id: str, dim: int, min_clients: int | None = None) -> bool:
        """Open a round of vectors of length ``dim``; True if created, False if it exists
        with the same parameters (idempotent). ``min_clients`` may raise the topology's."""
        codec.check_id("round", round_id)
        policy = self.topology.rounds
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= policy.max_dim:
            raise InvalidRequest(f"dim must be an integer in 1..{policy.max_dim}, got {dim!r}")
        if min_clients is None:
            min_clients = policy.min_clients
        if (
            isinstance(min_clients, bool)
            or not isinstance(min_clients, int)
            or not policy.min_clients <= min_clients <= policy.max_clients
        ):
            raise InvalidRequest(
                f"min_clients must be an integer in {policy.min_clients}..{policy.max_clients} "
                f"(the topology's bounds), got {min_clients!r}"
            )
        existing = self.rounds.get(round_id)
        if existing is not None and existing.state is RoundState.OPEN:
            if (existing.dim, existing.min_clients) == (dim, min_clients):
                return False
            raise RoundConflict(
                f"round {round_id!r} exists with dim={existing.dim}, "
                f"min_clients={existing.min_clients}"
            )
        used = self.round_index.state(round_id)
        if existing is not None or used is not None:
            state = existing.state.value if existing is not None else used
            raise RoundIdUsed(
                f"round id {round_id!r} was used before at aggregator {self.index} "
                f"({state}); round ids are single-use: open the round under a new id"
            )
        path = self._journal_path(round_id)
        if path.exists():
            raise RoundIdUsed(
                f"round id {round_id!r} was used before at aggregator {self.index} "
                f"(journal {path} exists); use a new round id"
            )
        plan = self._plan(round_id, dim)
        header = {
            "round": round_id,
            "dim": dim,
            "min_clients": min_clients,
            "plan": plan_summary(plan),
        }
        try:
            journal = RoundJournal.create(path, header, fsync=self.topology.fsync)
            try:
                self.round_index.record(round_id, "open", dp=self.topology.dp is not None)
            except OSError:
                journal.discard()
                raise
        except OSError as exc:
            self._plans.pop(round_id, None)
            log.error("round %s: cannot open (%s)", round_id, exc)
            raise StorageFailure(
                f"aggregator {self.index} could not record round {round_id!r} durably "
                f"({exc.strerror or exc}); nothing was created, retry later"
            ) from None
        self._journals[round_id] = journal
        self.rounds[round_id] = Round(round_id, dim, min_clients, opened_at=self.clock())
        self.metrics["rounds_opened"] += 1
        log.info("round %s opened: dim=%d min_clients=%d", round_id, dim, min_clients)
        return True

    def recover(self) -> int:
        """Rebuild the open rounds from their journals (after a restart); returns how many.

        Running sums, accepted-client sets (so duplicate detection survives) and round
        parameters come back; a torn or corrupt tail is truncated and logged; journals of
        rounds that had ended are deleted.
        """
        directory = self.topology.aggregator_dir(self.index)
        recovered = 0
        seen: set[str] = set()
        for path in sorted(directory.glob("round-*.journal")):
            try:
                journal, contents = RoundJournal.recover(path, fsync=self.topology.fsync)
            except (OSError, ValueError) as exc:
                log.error("cannot recover %s (%s); moving it aside", path, exc)
                path.rename(path.with_suffix(".unreadable"))
                lost = path.name[len("round-") : -len(".journal")]
                if self.round_index.state(lost) in (None, "open"):
                    self._record_end(lost, "failed")  # its id is used up all the same
                continue
            if contents.torn is not None:
                log.warning(
                    "%s: %s; dropped the tail after byte %d",
                    path,
                    contents.torn,
                    contents.valid_bytes,
                )
            h = contents.header
            round_id = str(h["round"])
            seen.add(round_id)
            if contents.end_state is not None or contents.mark is not None:
                # Ended, or stopped mid-aggregation: it never comes back open. A round the
                # other parties saw closing has failed (or been revealed) there; here, it fails.
                state = contents.end_state or "failed"
                if contents.end_state is None:
                    log.warning(
                        "round %s was %s when this aggregator stopped: it is failed, "
                        "nothing of it will be revealed",
                        round_id,
                        contents.mark,
                    )
                self._forget_journal(round_id, journal, state)
                continue
            if self.round_index.state(round_id) not in (None, "open"):
                log.warning("round %s ended before this restart; journal discarded", round_id)
                journal.discard()
                continue
            mismatch = self._plan_mismatch(round_id, int(h["dim"]), h.get("plan"))
            if mismatch is not None:
                log.error("round %s cannot be recovered: %s; it is failed", round_id, mismatch)
                self._forget_journal(round_id, journal, "failed")
                continue
            if round_id not in self.round_index:  # a journal from before the index
                try:
                    self.round_index.record(round_id, "open")
                except OSError as exc:  # the journal itself still keeps the id from reuse
                    log.error("round %s: cannot add it to the round index (%s)", round_id, exc)
            rnd = Round(round_id, int(h["dim"]), int(h["min_clients"]), opened_at=self.clock())
            for rec in contents.shares:  # one body in memory at a time
                body = journal.read(rec.ref)
                share = codec.decode_share(body, aggregator=self.index, dim=rnd.dim)
                if rec.client_id in rnd.accepted:
                    # A record written whose fsync then failed (the upload was refused and
                    # retried): the first record of the client is the one acknowledged.
                    log.warning(
                        "round %s: second journal record of client %s ignored",
                        rnd.round_id,
                        rec.client_id,
                    )
                    continue
                rnd.reserve(rec.client_id)
                rnd.accept(
                    rec.client_id,
                    share,
                    upload_digest(body),
                    share.expand(rnd.round_id, rec.client_id),
                    ref=rec.ref,
                )
            self.rounds[rnd.round_id] = rnd
            self._plan(rnd.round_id, rnd.dim)
            self._journals[rnd.round_id] = journal
            recovered += 1
            log.info(
                "round %s recovered from its journal: %d clients, dim=%d",
                rnd.round_id,
                len(rnd.accepted),
                rnd.dim,
            )
        for round_id in self.round_index.open_ids():
            if round_id not in seen:  # its journal was removed when it ended
                self._record_end(round_id, "failed")
        return recovered

    def _plan_mismatch(self, round_id: str, dim: int, recorded: Any) -> str | None:
        """Why a journal's recorded noise plan does not match what this topology would add
        now (None if it matches): a round opened under one DP setting is never revealed
        under another, or without noise."""
        try:
            current = plan_summary(self._plan(round_id, dim))
        except InvalidRequest as exc:
            return exc.detail
        if recorded != current:
            return f"it was opened with noise plan {recorded}, the topology now gives {current}"
        return None

    def _journal_path(self, round_id: str) -> Path:
        return self.topology.aggregator_dir(self.index) / f"round-{round_id}.journal"

    def _record_end(self, round_id: str, state: str) -> None:
        """Note in the round index how ``round_id`` ended (best effort: the index already
        holds the id, which is what keeps it from being reused)."""
        try:
            self.round_index.record(round_id, state)
        except OSError as exc:
            log.error("round %s: cannot record its end in the round index (%s)", round_id, exc)

    def _forget_journal(self, round_id: str, journal: RoundJournal, state: str) -> None:
        """End ``round_id``'s journal: an END record, then the file goes. If the record cannot
        be written (disk full), the file goes anyway, so it can never be read as open."""
        try:
            journal.append_end(state)
        except OSError as exc:
            log.error(
                "round %s: cannot write the END record (%s); deleting the journal", round_id, exc
            )
        try:
            journal.discard()
        except OSError as exc:
            log.error("round %s: cannot delete its journal (%s)", round_id, exc)
        self._record_end(round_id, state)

    def _plan(self, round_id: str, dim: int) -> Any:
        """Calibrate the round's noise (with DP) and prove that clients plus noise cannot
        wrap around p/2; raises InvalidRequest for an unsafe round."""
        dp = self.topology.dp
        if dp is None:
            return None
        from mpc_agg.dp.planning import plan_noise

        try:
            plan = plan_noise(dp, self.topology.encoding, dim, self.topology.m)
            self.topology.encoding.check_headroom(
                self.topology.rounds.max_clients, noise_tail=plan.tail
            )
        except ConfigError as exc:
            raise InvalidRequest(f"unsafe round of dimension {dim}: {exc.detail}") from None
        self._plans[round_id] = plan
        if plan.mechanism == "binomial":
            log.info(
                "round %s: joint binomial noise, %d trials per coordinate, %d secret bits "
                "(about %.1f s of MPC), noise std %.4g",
                round_id,
                plan.trials,
                plan.secure_bits,
                plan.estimated_seconds,
                plan.noise_stddev,
            )
        return plan

    def _round(self, round_id: str) -> Round:
        rnd = self.rounds.get(round_id)
        if rnd is None:
            used = self.round_index.state(round_id)
            if used is not None:
                raise RoundEnded(
                    f"round {round_id!r} ended ({used}) before aggregator {self.index} last "
                    "restarted; its result is no longer held"
                )
            raise UnknownRound(f"round {round_id!r} is unknown at aggregator {self.index}")
        return rnd

    def max_body_bytes(self) -> int:
        """Largest upload body of any round (a FULL share of ``max_dim``)."""
        return codec.share_body_length(ShareKind.FULL, self.topology.rounds.max_dim)

    def upload_limit(self, round_id: str, client_id: str) -> int:
        """Checks that need no body (ids, round known): the largest body worth reading.

        Called before the body is read, so a bad request costs no upload bandwidth.
        """
        codec.check_id("client", client_id)
        return codec.share_body_length(ShareKind.FULL, self._round(round_id).dim)

    def receive_share(self, round_id: str, client_id: str, body: bytes | bytearray) -> bool:
        """Validate, journal and accumulate one upload, all in the calling thread.

        Returns True when accepted (201), False for an identical retry (200). Raises a
        :class:`~mpc_agg.errors.PeerError` otherwise; a refused upload changes nothing.
        The party serves uploads with :meth:`receive_share_async`; this is its blocking twin
        (recovery, tests).
        """
        rnd, share, digest = self._admit(round_id, client_id, body)
        if share is None:
            return False
        try:
            vector, ref = self._ingest(self._journals[round_id], rnd, client_id, share, body)
        except BaseException:
            self._refuse(rnd, client_id)
            raise
        self._settle(rnd, client_id, share, digest, vector, ref, len(body))
        return True

    async def receive_share_async(
        self, round_id: str, client_id: str, body: bytes | bytearray
    ) -> bool:
        """:meth:`receive_share` with the O(d) work (value check, seed expansion, journal
        write and fsync) on the ingest threads, so the event loop, shared with MPyC, keeps
        serving other requests and the party network meanwhile.

        The bookkeeping stays on the loop: the upload is reserved before the threads start
        and settled after, so a close waits for it (see :meth:`aggregate`). Once reserved,
        the upload is finished even if the request is cancelled.
        """
        rnd, share, digest = self._admit(round_id, client_id, body)
        if share is None:
            return False
        loop = asyncio.get_running_loop()
        journal = self._journals[round_id]  # the thread writes here even if the round ends

        async def work() -> None:
            try:
                vector, ref = await loop.run_in_executor(
                    self._ingest_pool, self._ingest, journal, rnd, client_id, share, body
                )
                if rnd.state not in (RoundState.OPEN, RoundState.CLOSING):
                    raise RoundEnded(
                        f"round {round_id!r} ended ({rnd.state.value}) while this upload was "
                        "being processed; it was not counted"
                    )
            except BaseException:
                self._refuse(rnd, client_id)
                raise
            self._settle(rnd, client_id, share, digest, vector, ref, len(body))

        task = asyncio.ensure_future(work())
        self._ingesting.add(task)
        task.add_done_callback(self._ingesting.discard)
        await asyncio.shield(task)
        return True

    def _admit(
        self, round_id: str, client_id: str, body: bytes | bytearray
    ) -> tuple[Round, Share | None, bytes]:
        """The checks that need no O(d) work besides the digest: ids, round, header, length,
        retry or conflict, capacity. Returns the share (None for an identical retry) and
        reserves it in the round."""
        try:
            codec.check_id("client", client_id)
            rnd = self._round(round_id)
            share = codec.decode_share(body, aggregator=self.index, dim=rnd.dim, check_values=False)
            digest = upload_digest(body)
            if not rnd.check_upload(client_id, share, digest):
                self.metrics["uploads_retried"] += 1
                return rnd, None, digest
            if rnd.occupancy >= self.topology.rounds.max_clients:
                raise RoundFull(
                    f"round {round_id!r} already holds max_clients = "
                    f"{self.topology.rounds.max_clients} clients"
                )
        except Exception:
            self.metrics["uploads_refused"] += 1
            raise
        rnd.reserve(client_id)
        return rnd, share, digest

    def _ingest(
        self,
        journal: RoundJournal,
        rnd: Round,
        client_id: str,
        share: Share,
        body: bytes | bytearray,
    ) -> tuple[FieldArray, object]:
        """The O(d) part of accepting a reserved upload (any thread): check the values,
        expand a seed, journal the body durably. Touches no round state."""
        codec.check_share_values(share)
        vector = share.expand(rnd.round_id, client_id)
        ref = journal.append_share(client_id, body)
        return vector, ref

    def _refuse(self, rnd: Round, client_id: str) -> None:
        rnd.release(client_id)
        self.metrics["uploads_refused"] += 1

    def _settle(
        self,
        rnd: Round,
        client_id: str,
        share: Share,
        digest: bytes,
        vector: FieldArray,
        ref: object,
        nbytes: int,
    ) -> None:
        rnd.accept(client_id, share, digest, vector, ref=ref)
        self.metrics["uploads_accepted"] += 1
        self.metrics["bytes_accepted"] += nbytes

    def round_status(self, round_id: str) -> dict[str, Any]:
        """JSON-ready status of a round."""
        status = self._round(round_id).status()
        status["aggregator"] = self.index
        plan = self._plans.get(round_id)
        if plan is not None:
            status["dp"] = {
                "mechanism": plan.mechanism,
                "epsilon": plan.epsilon,
                "delta": plan.delta,
                "noise_stddev": plan.noise_stddev,
            }
            if plan.mechanism == "binomial":
                status["dp"].update(
                    trials=plan.trials,
                    secure_bits=plan.secure_bits,
                    estimated_seconds=round(plan.estimated_seconds, 2),
                )
        return status

    def request_close(self, round_id: str) -> None:
        """Collector asks the leader to close and aggregate ``round_id`` (idempotent)."""
        if not self.is_leader:
            leader = self.topology.leader
            raise NotLeader(
                f"aggregator {self.index} is not the leader; send close requests to "
                f"aggregator 0 at {leader.url}"
            )
        rnd = self._round(round_id)
        if rnd.state in TERMINAL or round_id in self._close_requested:
            return
        if not self.network.connected:
            raise PartyNetworkDown(
                f"the party network is down (waiting for aggregator(s) "
                f"{self.network.missing()}); the round stays open, retry the close later"
            )
        self._close_requested.add(round_id)
        self._close_queue.put_nowait(round_id)
        log.info("round %s: close requested", round_id)

    def result(self, round_id: str) -> bytes:
        """The encoded result of a DONE round (see :func:`mpc_agg.core.codec.encode_result`)."""
        rnd = self._round(round_id)
        if rnd.state is RoundState.FAILED:
            raise RoundAborted(rnd.failure or "unknown reason")
        if round_id in self._expired:
            raise ResultExpired(
                f"round {round_id!r} ended and its total was dropped to bound memory "
                f"(rounds.keep_results = {self.topology.rounds.keep_results}); fetch results "
                "promptly or raise keep_results"
            )
        if rnd.state is not RoundState.DONE or rnd.total is None:
            raise ResultNotReady(f"round {round_id!r} is {rnd.state.value}; no result yet")
        meta = {
            "round": round_id,
            "num_clients": rnd.num_clients,
            "dropped_clients": len(rnd.dropped_clients),
            "epsilon": None,
            "delta": None,
            **self._privacy.get(round_id, {}),
            "frac_bits": self.topology.encoding.frac_bits,
            "timings": rnd.timings,
        }
        return codec.encode_result(rnd.total, meta)

    # -- the command loop run by every party ----------------------------------------------

    async def serve_commands(self) -> None:
        """Forever: receive the leader's next command and execute it with all parties.

        Starts with :meth:`reconcile` (run each time the links come up)."""
        try:
            failed = await self.reconcile()
        except PartyLinkLost as exc:
            log.error("reconciling rounds with the other parties: %s", exc)
            raise
        if failed:
            log.warning("%d round(s) failed here because they had ended elsewhere", failed)
        while True:
            if self.is_leader:
                round_id = await self._close_queue.get()
                try:
                    command = await self.network.broadcast(("close", round_id), sender=LEADER)
                except PartyLinkLost as exc:
                    self._close_requested.discard(round_id)
                    rnd = self.rounds.get(round_id)
                    self._fail(rnd, f"cannot close: {exc}")
                    if rnd is not None and rnd.state in TERMINAL:
                        self._wind_up(rnd)  # ended for good; reconcile tells the others
                    continue
                except BaseException:
                    self._close_requested.discard(round_id)  # a later close may try again
                    raise
            else:
                try:
                    command = await self.network.broadcast(None, sender=LEADER)
                except PartyLinkLost as exc:
                    log.error("waiting for the leader: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
            if not (isinstance(command, tuple) and len(command) == 2 and command[0] == "close"):
                log.error("ignoring malformed command from the leader: %r", type(command))
                continue
            await self.aggregate(str(command[1]))

    async def aggregate(self, round_id: str) -> None:
        """Close, agree on the client set, and reveal ``round_id``; every party runs this.

        Every party makes the same exchanges whatever happens locally (views, then a readiness
        vote, then the sum shares; a local failure after agreement is announced in the vote),
        so the parties never fall out of step, every party reaches the same verdict, and no
        share of the total leaves any party unless every party holds its noised share.
        """
        t0 = self.clock()
        rnd = self.rounds.get(round_id)
        if rnd is not None and rnd.state is RoundState.OPEN:
            rnd.close()
        try:
            if rnd is not None:
                await self._drain(rnd)  # inside the try: a cancellation here fails the round
            live = rnd is not None and rnd.state is RoundState.CLOSING
            plan = self._plans.get(round_id)
            refusal = self._refusal(round_id, rnd, plan) if live else None
            view = (
                round_id,
                rnd.dim if live and rnd else None,
                rnd.min_clients if live and rnd else 0,
                sorted(rnd.accepted) if live and rnd else [],
                refusal,
                plan_summary(plan),
            )
            try:
                raw_views = await self.network.exchange(view)  # exchange 1: client sets
                views = [PartyView(v[0], v[1], frozenset(v[3])) for v in raw_views]
                agreement = agree_client_set(views, max(int(v[2]) for v in raw_views))
                refusals = [v[4] for v in raw_views if v[4]]
                if refusals:  # any aggregator refuses: nobody adds noise or reveals
                    raise AgreementFailed(refusals[0])
                plans = [v[5] if len(v) > 5 else "missing" for v in raw_views]
                if any(p != plans[0] for p in plans):  # each must add what the others assume
                    listing = "; ".join(f"aggregator {j}: {p}" for j, p in enumerate(plans))
                    raise AgreementFailed(
                        f"the aggregators disagree on the noise plan of round {round_id!r} "
                        f"({listing}); nothing is revealed"
                    )
            except AgreementFailed as exc:  # same views everywhere: same verdict everywhere
                self._fail(rnd, str(exc))
                return
            assert rnd is not None  # agree_client_set fails if any party lacks the round
            # The only array the reveal sends: with DP it carries its noise, or it is None
            # (the abort marker) because some step failed. There is no other path.
            share: FieldArray | None = None
            try:
                share = self._sum_share(rnd, agreement, plan)
            except Exception:  # noqa: BLE001 - announced to all parties in exchange 2
                log.exception("round %s: cannot compute this aggregator's sum share", round_id)
            t_agreed = self.clock()
            if self.reveal_delay_s:
                await asyncio.sleep(self.reveal_delay_s)
            try:
                ready = await self._vote_ready(share)  # exchange 2: all or nothing
                if plan is not None and plan.mechanism == "binomial":
                    total = await self.network.joint_binomial_sum(ready, plan.trials)
                else:
                    total = await reveal_sum(self.network, ready, rnd.dim)  # exchange 3: sums
            except AgreementFailed as exc:
                self._fail(rnd, str(exc))
                return
            rnd.reveal(total)
            t_done = self.clock()
            rnd.timings.update(
                {
                    "open_s": round(t0 - rnd.opened_at, 6),
                    "agree_s": round(t_agreed - t0, 6),
                    "reveal_s": round(t_done - t_agreed, 6),
                }
            )
            self.metrics["rounds_done"] += 1
            log.info(
                "round %s done: %d clients (%d dropped), agree %.3fs, reveal %.3fs",
                round_id,
                rnd.num_clients,
                len(rnd.dropped_clients),
                t_agreed - t0,
                t_done - t_agreed,
            )
        except asyncio.CancelledError:
            self._fail(rnd, "the party network was lost during aggregation; nothing revealed")
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a party link lost: the round must end
            log.exception("round %s: aggregation error", round_id)
            detail = str(exc) if isinstance(exc, PartyLinkLost) else "see the aggregators' logs"
            self._fail(rnd, f"aggregation error at aggregator {self.index}: {detail}")
        finally:
            self._close_requested.discard(round_id)
            if rnd is not None and rnd.state in TERMINAL:
                self._wind_up(rnd)

    def _wind_up(self, rnd: Round) -> None:
        """An ended round keeps only its total (DONE); its journal ends and goes."""
        rnd.free_sum()
        if rnd.total is not None:
            self._results.append(rnd.round_id)
            self._expire_results()
        journal = self._journals.pop(rnd.round_id, None)
        if journal is not None:
            self._end_journal(rnd, journal)

    async def reconcile(self) -> int:
        """Every party, each time the party links come up: a round that has ended at any
        party ends at every party (e.g. one this party got back open after it crashed before
        it could mark the close). Two exchanges, the same at every party; returns how many
        rounds this party failed."""
        mine = sorted(r for r, rnd in self.rounds.items() if rnd.state not in TERMINAL)
        opened = await self.network.exchange(mine)
        union = sorted(
            {r for ids in opened if isinstance(ids, list) for r in ids if isinstance(r, str)}
        )
        ended = [r for r in union if self._ended_here(r)]
        verdicts = await self.network.exchange(ended)
        failed = 0
        for j, rounds in enumerate(verdicts):
            for round_id in rounds if isinstance(rounds, list) else []:
                rnd = self.rounds.get(round_id) if isinstance(round_id, str) else None
                if rnd is None or rnd.state in TERMINAL or j == self.index:
                    continue
                self._fail(rnd, f"round {round_id!r} had ended at aggregator {j}; nothing revealed")
                self._wind_up(rnd)
                failed += 1
        return failed

    def _ended_here(self, round_id: str) -> bool:
        rnd = self.rounds.get(round_id)
        if rnd is not None:
            return rnd.state in TERMINAL
        return round_id in self.round_index  # known here, and not live: it has ended

    def _end_journal(self, rnd: Round, journal: RoundJournal) -> None:
        """Record the end of ``rnd`` and delete its journal, once no ingest thread can still
        write to it (uploads reserved before a cancelled close are refused as they finish)."""
        if not rnd.pending:
            self._forget_journal(rnd.round_id, journal, rnd.state.value)
            return

        async def when_drained() -> None:
            await self._drain(rnd)
            self._forget_journal(rnd.round_id, journal, rnd.state.value)

        task = asyncio.ensure_future(when_drained())
        self._ingesting.add(task)
        task.add_done_callback(self._ingesting.discard)

    def _expire_results(self) -> None:
        """Keep the totals of the ``rounds.keep_results`` most recently ended rounds only
        (each holds 8·d bytes); older rounds stay known (retries, status) without it."""
        while len(self._results) > self.topology.rounds.keep_results:
            rnd = self.rounds[self._results.pop(0)]
            rnd.total = None
            self._expired.add(rnd.round_id)
            log.info("round %s: total dropped (rounds.keep_results)", rnd.round_id)

    async def _drain(self, rnd: Round) -> None:
        """Wait for the uploads reserved before the close (local work only: value checks,
        expansion, journal), so that the client set this party reports is final."""
        if rnd.pending:
            log.info("round %s: finishing %d upload(s) in progress", rnd.round_id, len(rnd.pending))
        while rnd.pending:
            await asyncio.sleep(0.002)

    def _refusal(self, round_id: str, rnd: Round | None, plan: Any) -> str | None:
        """Why this aggregator refuses to aggregate ``round_id`` (sent in exchange 1), or None.

        The round's ledger check comes first; then the ``closing`` mark must be durable, so
        that after a restart this round can only come back failed.
        """
        if plan is not None:
            if self.ledger is None:
                return f"aggregator {self.index} has no privacy ledger for a DP round"
            try:
                self.ledger.check(plan.event(round_id))
            except BudgetExceeded as exc:
                return str(exc)
            except Exception as exc:  # noqa: BLE001 - refused in step with the others
                log.exception("round %s: the privacy ledger cannot check the round", round_id)
                return f"aggregator {self.index} cannot check its privacy budget ({exc})"
        elif self.topology.dp is not None:
            return f"aggregator {self.index} has no noise plan for round {round_id!r}"
        try:
            self._journals[round_id].append_mark("closing")
        except (OSError, KeyError) as exc:
            log.error("round %s: cannot mark the close durably (%s)", round_id, exc)
            return (
                f"aggregator {self.index} could not record the close of round {round_id!r} "
                "durably; nothing is revealed"
            )
        return None

    def _sum_share(self, rnd: Round, agreement: Any, plan: Any) -> FieldArray:
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
        self._journals[rnd.round_id].append_mark("revealing")
        if self.topology.dp is None:
            return rnd.local_sum()
        if plan is None:
            raise AgreementFailed(f"round {rnd.round_id!r} has DP but no noise plan")
        return self._noisy(rnd.round_id, plan, rnd.local_sum())

    def _noisy(self, round_id: str, plan: Any, local: FieldArray) -> FieldArray:
        """Charge the release in the ledger durably, then return ``local`` plus this
        aggregator's discrete Gaussian noise (docs/design.md, "Differential privacy"); for
        joint binomial noise the share is returned as is (the noise is made inside MPyC).
        Every release attempt is charged, before any noisy share leaves the party."""
        from mpc_agg.dp.discrete_gaussian import NoiseStream, sample_discrete_gaussian

        if self.ledger is None or self._ledger_file is None:
            raise AgreementFailed(f"aggregator {self.index} has no privacy ledger")
        event = plan.event(round_id)
        cumulative = self.ledger.commit(event, persist=self._ledger_file.append)
        self._privacy[round_id] = {
            "mechanism": plan.mechanism,
            "epsilon": plan.epsilon,
            "delta": plan.delta,
            "noise_stddev": plan.noise_stddev,
            "cumulative_epsilon": cumulative,
            "cumulative_delta": self.ledger.budget_delta,
        }
        if plan.mechanism == "binomial":
            return local
        stream = (self._noise_stream or NoiseStream)()
        noise = sample_discrete_gaussian(plan.sigma2, plan.d, stream)
        if noise.shape != local.shape:
            raise AgreementFailed(f"noise of shape {noise.shape} for a share of {local.shape}")
        return field.add(local, field.from_signed(noise))

    async def _vote_ready(self, share: FieldArray | None) -> FieldArray:
        """Exchange 2, a readiness vote: every party says whether it holds its share of the
        total (noised, with DP). Any "no" fails the round at every party before a single
        share is sent; otherwise returns ``share`` for the reveal."""
        ready = await self.network.exchange(share is not None)
        not_ready = [j for j, ok in enumerate(ready) if ok is not True]
        if not_ready or share is None:
            raise AgreementFailed(
                f"aggregator(s) {not_ready} could not compute their share of the total; "
                "nothing is revealed"
            )
        return share

    def _fail(self, rnd: Round | None, reason: str) -> None:
        if rnd is None:
            log.warning("close of an unknown round failed: %s", reason)
            return
        if rnd.state not in TERMINAL:
            rnd.fail(reason)
            self.metrics["rounds_failed"] += 1
        log.warning("round %s failed: %s", rnd.round_id, reason)

    def _share_vector(self, rnd: Round, client_id: str) -> FieldArray:
        """The expanded share of an accepted client (re-read from the journal if FULL)."""
        accepted = rnd.accepted[client_id]
        if accepted.kind is ShareKind.SEED:
            assert accepted.seed is not None
            return Share(self.index, ShareKind.SEED, rnd.dim, seed=accepted.seed).expand(
                rnd.round_id, client_id
            )
        body = self._journals[rnd.round_id].read(accepted.ref)  # type: ignore[arg-type]
        return codec.decode_share(body, aggregator=self.index, dim=rnd.dim).expand(
            rnd.round_id, client_id
        )

    def close_journals(self) -> None:
        """Close every open journal file (on shutdown; files stay for recovery)."""
        self._ingest_pool.shutdown(wait=True)
        for journal in self._journals.values():
            journal.close()
