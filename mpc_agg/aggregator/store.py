"""An aggregator's rounds and what keeps them: journals, the round index, recovery, retention.

docs/design.md, "Durable state" and "Round deadlines". :class:`RoundStore` holds the rounds
this aggregator knows, creates a round's journal and index entry together (or neither),
refuses a round beyond ``rounds.max_open`` live ones, rebuilds open rounds from their
journals after a restart (a round whose journal says it was closing or revealing comes back
failed, never open; so does one past its deadline, and any beyond ``rounds.max_open``),
ends a round's journal when it ends, and keeps the totals of the last
``rounds.keep_results`` ended rounds only.

Large rounds (docs/design.md, "Streamed uploads"): a round whose vectors take more than the
party's streaming threshold (:attr:`RoundStore.stream_above`) keeps a spool directory beside
its journal; its shares are read back, re-expanded and replayed block by block
(:meth:`RoundStore.share_blocks`), never as whole vectors, and a spool file that is missing
or damaged at recovery fails its round (fail closed).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mpc_agg.config.schema import (
    STREAM_ABOVE_MB,
    STREAM_BLOCK_BYTES,
    Topology,
    stream_above_bytes,
)
from mpc_agg.core import codec
from mpc_agg.core.ring import Ring, RingArray
from mpc_agg.core.rounds import TERMINAL, AcceptedShare, Round, RoundState, upload_digest
from mpc_agg.core.sharing import ShareKind
from mpc_agg.core.xof import share_context
from mpc_agg.errors import (
    MalformedUpload,
    ResultExpired,
    RoundConflict,
    RoundEnded,
    RoundIdUsed,
    StorageFailure,
    TooManyRounds,
    UnknownRound,
)
from mpc_agg.storage.durable import fsync_directory
from mpc_agg.storage.journal import JournalContents, JournalShare, RoundJournal
from mpc_agg.storage.round_index import RoundIndex
from mpc_agg.storage.spool import SPOOL_SUFFIX, RoundSpool, SpoolRef

log = logging.getLogger("mpc_agg.aggregator")

PlanCheck = Callable[[str, int, Any], "str | None"]
"""``(round_id, dim, recorded plan summary) -> why it does not match now, or None``."""


class RoundStore:
    """The rounds of aggregator ``index`` and their files under its data directory.

    ``clock`` (monotonic seconds) times rounds and their deadlines while the process runs;
    ``wall_clock`` (Unix seconds) is what a journal records as the round's opening time, so
    that a restarted aggregator knows how much of each round's ``rounds.max_open_s`` is
    left. ``stream_above`` (bytes, a party-local setting) is the streaming threshold: a
    round whose vectors take more is large (:meth:`streamed`); ``stream_block`` is the bytes
    of a large round's share handled at a time (rounded down to whole elements).
    """

    def __init__(
        self,
        topology: Topology,
        index: int,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        *,
        stream_above: int = stream_above_bytes(STREAM_ABOVE_MB),
        stream_block: int = STREAM_BLOCK_BYTES,
    ) -> None:
        if stream_above < 0 or stream_block < 1:
            raise ValueError(
                f"stream_above must be >= 0 and stream_block >= 1 byte, got {stream_above} "
                f"and {stream_block}"
            )
        self.stream_above = stream_above
        self.stream_block = stream_block
        self.topology = topology
        self.index = index
        self.clock = clock
        self.wall_clock = wall_clock
        self.directory = topology.aggregator_dir(index)
        self.round_index = RoundIndex(self.directory / "rounds.index", fsync=topology.fsync)
        self.rounds: dict[str, Round] = {}
        self.journals: dict[str, RoundJournal] = {}
        self._results: list[str] = []  # rounds holding a total, in the order they ended
        self._live: dict[str, Round] = {}  # rounds not known to have ended, in opening order

    def journal_path(self, round_id: str) -> Path:
        """Where ``round_id``'s journal lives."""
        return self.directory / f"round-{round_id}.journal"

    # -- large rounds ---------------------------------------------------------------------

    def streamed(self, dim: int, ring: Ring) -> bool:
        """Whether a round of dimension ``dim`` in ``ring`` is large here: its vectors take
        more than :attr:`stream_above` bytes, so its shares are never held whole."""
        return dim * ring.itemsize > self.stream_above

    def block_elements(self, ring: Ring) -> int:
        """Elements of ``ring`` handled at a time in a large round (>= 1)."""
        return max(1, self.stream_block // ring.itemsize)

    def spool(self, round_id: str) -> RoundSpool:
        """The spool directory of ``round_id`` (streamed uploads of a large round): its
        journal's own object while the round is live here (so that ending the round revokes
        the writers of uploads still arriving), else a new one."""
        journal = self.journals.get(round_id)
        if journal is not None:
            return journal.spool
        return RoundSpool(
            self.journal_path(round_id).with_suffix(SPOOL_SUFFIX), fsync=self.topology.fsync
        )

    def seed_blocks(self, rnd: Round, client_id: str, seed: bytes) -> Iterator[RingArray]:
        """The expansion of ``client_id``'s seed share in ``rnd``, block by block (each a
        view of the stream's buffer, valid until the next); raises MalformedUpload at a
        block holding a rejected word (GF(p): a seed an honest client never sends)."""
        ring = rnd.ring
        n = self.block_elements(ring)
        stream = ring.blocks(seed, share_context(rnd.round_id, client_id, self.index), n)
        for start in range(0, rnd.dim, n):
            words = stream.next_block(min(n, rnd.dim - start))
            if words is None:
                raise MalformedUpload(
                    f"the seed's stream holds a rejected word in the block at coordinate "
                    f"{start}: not a seed an honest client sends"
                )
            yield words

    def spooled_blocks(self, rnd: Round, ref: SpoolRef) -> Iterator[RingArray]:
        """The values of the streamed FULL share ``ref`` names, read back block by block
        from the round's spool (page cache), each checked to be canonical, after its header
        is checked; the file's length is checked first and its digest after the last block
        (:func:`~mpc_agg.storage.spool.read_back`). Raises OSError (SpoolDamaged) or
        MalformedUpload on any defect."""
        ring = rnd.ring
        block = self.block_elements(ring) * ring.itemsize
        with contextlib.closing(
            self.spool(rnd.round_id).read_back(ref, block, head=codec.SHARE_HEADER.size)
        ) as pieces:
            header = next(pieces, b"")
            kind = codec.decode_share_header(
                header, aggregator=self.index, dim=rnd.dim, ring=ring, length=ref.length
            )
            if kind is not ShareKind.FULL:
                raise MalformedUpload(f"spool file {ref.name} holds a seed share")
            start = 0
            for piece in pieces:
                values = ring.from_wire(piece, 0, len(piece) // ring.itemsize)
                codec.check_share_block(values, ring, start)
                start += len(values)
                yield values

    def share_blocks(
        self, rnd: Round, client_id: str, accepted: AcceptedShare
    ) -> Iterator[RingArray] | RingArray:
        """The expanded share of an accepted client of ``rnd``: block by block for a
        streamed FULL share (read back from the spool) and for a SEED share of a large
        round (re-expanded); else the whole vector (a FULL share re-read from the journal,
        a seed expanded)."""
        if isinstance(accepted.ref, SpoolRef):
            return self.spooled_blocks(rnd, accepted.ref)
        if accepted.kind is ShareKind.SEED:
            assert accepted.seed is not None
            if self.streamed(rnd.dim, rnd.ring):
                return self.seed_blocks(rnd, client_id, accepted.seed)
            context = share_context(rnd.round_id, client_id, self.index)
            return rnd.ring.expand(accepted.seed, context, rnd.dim)
        assert isinstance(accepted.ref, tuple)
        body = self.journals[rnd.round_id].read(accepted.ref)
        share = codec.decode_share(body, aggregator=self.index, dim=rnd.dim, ring=rnd.ring)
        return share.expand(rnd.round_id, client_id)

    # -- lookup ---------------------------------------------------------------------------

    def lookup(self, round_id: str) -> Round:
        """The round, or :class:`UnknownRound` (never opened here) / :class:`RoundEnded`
        (ended before the last restart)."""
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

    def ended_here(self, round_id: str) -> bool:
        """True if ``round_id`` is known here and no longer live."""
        rnd = self.rounds.get(round_id)
        if rnd is not None:
            return rnd.state in TERMINAL
        return round_id in self.round_index

    def check_new(self, round_id: str, dim: int, min_clients: int) -> bool:
        """False if the round is open with these parameters (an idempotent open); True if
        it may be created; raises :class:`RoundConflict` / :class:`RoundIdUsed` otherwise."""
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
        path = self.journal_path(round_id)
        if path.exists():
            raise RoundIdUsed(
                f"round id {round_id!r} was used before at aggregator {self.index} "
                f"(journal {path} exists); use a new round id"
            )
        return True

    def live_rounds(self) -> list[Round]:
        """The rounds open, closing or aggregating here, in the order they were opened."""
        for round_id in [r for r, rnd in self._live.items() if rnd.state in TERMINAL]:
            del self._live[round_id]
        return list(self._live.values())

    def check_capacity(self) -> None:
        """Raise :class:`TooManyRounds` if ``rounds.max_open`` rounds are live here."""
        policy = self.topology.rounds
        live = len(self.live_rounds())
        if live >= policy.max_open:
            raise TooManyRounds(
                f"aggregator {self.index} already holds {live} live rounds (rounds.max_open "
                f"= {policy.max_open}); close or abort one (DELETE /v1/rounds/{{round}}) or "
                f"wait until one passes its deadline (rounds.max_open_s = "
                f"{policy.max_open_s:g} s)"
            )

    # -- life -----------------------------------------------------------------------------

    def create(self, round_id: str, dim: int, min_clients: int, plan: Any, dp: bool) -> Round:
        """Create the round's journal, then its index entry, durably; on any failure neither
        remains and :class:`StorageFailure` is raised (the id stays usable). The journal
        records the wall-clock time of the opening, from which the round's deadline
        (``rounds.max_open_s``) is counted, also after a restart."""
        opened_unix = self.wall_clock()
        header = {
            "round": round_id,
            "dim": dim,
            "min_clients": min_clients,
            "plan": plan,
            "opened_unix": opened_unix,
        }
        path = self.journal_path(round_id)
        ring = self.topology.encoding.ring
        try:
            if self.streamed(dim, ring):  # before the journal, whose creation fsyncs the dir
                self.directory.mkdir(parents=True, exist_ok=True)
                self.spool(round_id).create()
            journal = RoundJournal.create(path, header, fsync=self.topology.fsync)
            try:
                self.round_index.record(round_id, "open", dp=dp)
            except OSError:
                journal.discard()
                raise
        except OSError as exc:
            log.error("round %s: cannot open (%s)", round_id, exc)
            with contextlib.suppress(OSError):
                self.spool(round_id).discard()
            raise StorageFailure(
                f"aggregator {self.index} could not record round {round_id!r} durably "
                f"({exc.strerror or exc}); nothing was created, retry later"
            ) from None
        max_open_s = self.topology.rounds.max_open_s
        now = self.clock()
        rnd = Round(
            round_id,
            dim,
            min_clients,
            opened_at=now,
            deadline_at=now + max_open_s,
            opened_unix=opened_unix,
            deadline_unix=opened_unix + max_open_s,
            ring=ring,
        )
        self._register(rnd, journal)
        return rnd

    def _register(self, rnd: Round, journal: RoundJournal) -> None:
        self.journals[rnd.round_id] = journal
        self.rounds[rnd.round_id] = rnd
        self._live[rnd.round_id] = rnd

    def record_end(self, round_id: str, state: str) -> None:
        """Note in the round index how ``round_id`` ended (best effort: the index already
        holds the id, which is what keeps it from being reused)."""
        try:
            self.round_index.record(round_id, state)
        except OSError as exc:
            log.error("round %s: cannot record its end in the round index (%s)", round_id, exc)

    def forget_journal(self, round_id: str, journal: RoundJournal, state: str) -> None:
        """End ``round_id``'s journal: an END record, then its spool files and the file go.
        If the record cannot be written (disk full), the files go anyway, so the round can
        never be read as open."""
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
        self.record_end(round_id, state)

    def keep_result(self, rnd: Round) -> None:
        """An ended round keeps only its total (DONE), and only the last ``keep_results``
        of those are kept (each holds 8·d bytes); older rounds stay known without it."""
        rnd.free_sum()
        if rnd.total is None:
            return
        self._results.append(rnd.round_id)
        while len(self._results) > self.topology.rounds.keep_results:
            old = self.rounds[self._results.pop(0)]
            old.expire()
            log.info("round %s: total dropped (rounds.keep_results)", old.round_id)

    def result_of(self, rnd: Round) -> None:
        """Raise :class:`ResultExpired` if ``rnd``'s total was dropped."""
        if rnd.expired:
            raise ResultExpired(
                f"round {rnd.round_id!r} ended and its total was dropped to bound memory "
                f"(rounds.keep_results = {self.topology.rounds.keep_results}); fetch results "
                "promptly or raise keep_results"
            )

    # -- recovery -------------------------------------------------------------------------

    def recover(self, plan_mismatch: PlanCheck) -> list[Round]:
        """Rebuild the open rounds from their journals (after a restart); returns them.

        Running sums, accepted-client sets (so duplicate detection survives) and round
        parameters come back; a torn or corrupt tail is truncated and logged; journals of
        rounds that had ended, or were mid-aggregation, end (those rounds are failed).
        Deadlines and the cap hold across the restart: a round past its deadline
        (``rounds.max_open_s`` after the opening its journal records) fails at once, and of
        the rest at most ``rounds.max_open`` come back open, those opened earliest (ties by
        id); the others fail (docs/design.md, "Round deadlines"). Every round failed here
        is recorded in the round index with one write, and its journal deleted after it,
        so a restart after thousands of junk rounds costs one fsync, not thousands. Only
        the rounds that come back open are replayed; none of them holds a descriptor.
        """
        policy = self.topology.rounds
        now_wall, now = self.wall_clock(), self.clock()
        ended: list[tuple[str, str]] = []  # (round id, state) for the round index
        doomed: list[RoundJournal] = []  # journals to delete once the index says so
        candidates: list[tuple[float, str, RoundJournal, JournalContents]] = []
        seen: set[str] = set()
        for path in sorted(self.directory.glob("round-*.journal")):
            try:
                journal, contents = RoundJournal.recover(path, fsync=self.topology.fsync)
            except (OSError, ValueError) as exc:
                log.error("cannot recover %s (%s); moving it aside", path, exc)
                path.rename(path.with_suffix(".unreadable"))
                lost = path.name[len("round-") : -len(".journal")]
                if self.round_index.state(lost) in (None, "open"):
                    self.record_end(lost, "failed")  # its id is used up all the same
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
                if contents.end_state is None:
                    log.warning(
                        "round %s was %s when this aggregator stopped: it is failed, "
                        "nothing of it will be revealed",
                        round_id,
                        contents.mark,
                    )
                ended.append((round_id, contents.end_state or "failed"))
                doomed.append(journal)
                continue
            if self.round_index.state(round_id) not in (None, "open"):
                log.warning("round %s ended before this restart; journal discarded", round_id)
                doomed.append(journal)
                continue
            mismatch = plan_mismatch(round_id, int(h["dim"]), h.get("plan"))
            if mismatch is not None:
                log.error("round %s cannot be recovered: %s; it is failed", round_id, mismatch)
                ended.append((round_id, "failed"))
                doomed.append(journal)
                continue
            opened = h.get("opened_unix")
            if isinstance(opened, (int, float)) and not isinstance(opened, bool):
                opened_unix = float(opened)
            else:  # a journal from before deadlines: its deadline counts from now
                opened_unix = now_wall
            if now_wall >= opened_unix + policy.max_open_s:
                log.warning(
                    "round %s passed its deadline (rounds.max_open_s = %g s) while this "
                    "aggregator was down: it is failed (expired), nothing of it is revealed",
                    round_id,
                    policy.max_open_s,
                )
                ended.append((round_id, "failed"))
                doomed.append(journal)
                continue
            candidates.append((opened_unix, round_id, journal, contents))
        candidates.sort(key=lambda c: (c[0], c[1]))
        excess = candidates[policy.max_open :]
        if excess:
            log.warning(
                "%d open rounds found, more than rounds.max_open = %d: the %d opened last "
                "are failed, nothing of them is revealed (the first of them: %s)",
                len(candidates),
                policy.max_open,
                len(excess),
                excess[0][1],
            )
        for _, round_id, journal, _ in excess:
            ended.append((round_id, "failed"))
            doomed.append(journal)
        for round_id in self.round_index.open_ids():
            if round_id not in seen:  # its journal was removed when it ended
                ended.append((round_id, "failed"))
        self._end_many(ended, doomed)
        recovered: list[Round] = []
        for opened_unix, round_id, journal, contents in candidates[: policy.max_open]:
            h = contents.header
            if round_id not in self.round_index:  # a journal from before the index
                try:
                    self.round_index.record(round_id, "open")
                except OSError as exc:  # the journal itself still keeps the id from reuse
                    log.error("round %s: cannot add it to the round index (%s)", round_id, exc)
            rnd = Round(
                round_id,
                int(h["dim"]),
                int(h["min_clients"]),
                opened_at=self.clock(),
                ring=self.topology.encoding.ring,
            )
            try:
                self._replay(rnd, journal, contents)
            except (OSError, ValueError, MalformedUpload) as exc:
                self._fail_unreplayable(rnd, journal, exc)
                continue
            rnd.opened_unix = opened_unix
            rnd.deadline_unix = opened_unix + policy.max_open_s
            rnd.deadline_at = now + (rnd.deadline_unix - now_wall)
            self._register(rnd, journal)
            recovered.append(rnd)
            log.info(
                "round %s recovered from its journal: %d clients, dim=%d, %.0f s to its deadline",
                round_id,
                len(rnd.accepted),
                rnd.dim,
                rnd.deadline_at - now,
            )
        self._sweep_spools()
        return recovered

    def _fail_unreplayable(self, rnd: Round, journal: RoundJournal, exc: BaseException) -> None:
        """Recovery: ``rnd`` cannot be rebuilt from its journal (a spool file missing or
        damaged, a body that no longer decodes, a corrupt record, two different shares of
        one client): the round fails here, nothing of it is revealed (reconciliation fails
        it at the others), its journal and spool go."""
        reason = (
            f"round {rnd.round_id!r} could not be rebuilt from its journal at recovery "
            f"({type(exc).__name__}: {exc}); nothing is revealed"
        )
        log.error("round %s failed: %s", rnd.round_id, reason)
        rnd.fail(reason, "storage_failure")
        rnd.free_sum()
        self.rounds[rnd.round_id] = rnd  # known here as failed, not live
        self.forget_journal(rnd.round_id, journal, "failed")

    def _sweep_spools(self) -> None:
        """Recovery: delete spool directories whose journal is gone (their round ended, or a
        crash came between deleting a journal and its spool)."""
        for spool in self.directory.glob(f"round-*{SPOOL_SUFFIX}"):
            if spool.with_suffix(".journal").exists():
                continue
            log.warning("%s: no journal refers to it; deleted", spool)
            shutil.rmtree(spool, ignore_errors=True)

    def _end_many(self, ended: list[tuple[str, str]], doomed: list[RoundJournal]) -> None:
        """Recovery: record every ended round in the round index (one write, one fsync),
        then delete the journals (one directory fsync). In this order a crash in between
        leaves journals whose index entry says they ended, which the next recovery
        discards; if the index cannot be written, the journals go all the same (their ids
        are in the index as opened, so they stay used)."""
        try:
            self.round_index.record_many(ended)
        except OSError as exc:
            log.error("cannot record %d ended round(s) in the round index (%s)", len(ended), exc)
        for journal in doomed:
            try:
                journal.discard(sync_directory=False)
            except OSError as exc:
                log.error("cannot delete %s (%s)", journal.path, exc)
        if doomed and self.topology.fsync:
            try:
                fsync_directory(self.directory)
            except OSError as exc:
                log.error("cannot fsync %s (%s)", self.directory, exc)

    def _replay(self, rnd: Round, journal: RoundJournal, contents: JournalContents) -> None:
        """Rebuild ``rnd``'s running sum and accepted clients from its journal's records, one
        body in memory at a time; a streamed share (a spool file) and, in a large round, a
        seed's expansion are added block by block. Spool files no record refers to (uploads
        cut by the crash) are deleted. Raises OSError, ValueError or MalformedUpload if a
        share cannot be read back, a record is corrupt, or the journal holds two different
        shares of one client (the caller fails the round)."""
        round_id, dim, ring = rnd.round_id, rnd.dim, rnd.ring
        if contents.corrupt is not None:
            raise ValueError(f"its journal is corrupt ({contents.corrupt})")
        large = self.streamed(dim, ring)
        spool = journal.spool
        referenced = {r.ref.name for r in contents.shares if isinstance(r.ref, SpoolRef)}
        if large or referenced:
            if not spool.directory.exists():
                spool.create()
                if self.topology.fsync:
                    fsync_directory(self.directory)
            cut = spool.names() - referenced
            if cut:
                log.warning(
                    "round %s: %d spool file(s) of uploads cut by the restart deleted",
                    round_id,
                    len(cut),
                )
                spool.remove(cut)
        for rec in contents.shares:
            previous = rnd.accepted.get(rec.client_id)
            if previous is not None:
                # A record whose fsync failed (the upload was answered 507, the round
                # poisoned), then the client's retry. The same body again: one share. A
                # different one: which of the two the client's other shares match is
                # unknown, so no total may be revealed (fail closed).
                if self._record_digest(journal, rec) != previous.digest:
                    raise ValueError(
                        f"the journal holds two different shares of client "
                        f"{rec.client_id!r} (a record whose commit failed, then another "
                        "upload)"
                    )
                log.warning(
                    "round %s: second, identical journal record of client %s ignored",
                    round_id,
                    rec.client_id,
                )
                continue
            if isinstance(rec.ref, SpoolRef):
                rnd.reserve(rec.client_id)
                rnd.sum.add_blocks(self.spooled_blocks(rnd, rec.ref))
                rnd.accept_summed(rec.client_id, ShareKind.FULL, rec.ref.digest, ref=rec.ref)
                continue
            body = journal.read(rec.ref)
            share = codec.decode_share(body, aggregator=self.index, dim=dim, ring=ring)
            if large and share.kind is ShareKind.SEED:
                assert share.seed is not None
                rnd.reserve(rec.client_id)
                rnd.sum.add_blocks(self.seed_blocks(rnd, rec.client_id, share.seed))
                rnd.accept_summed(
                    rec.client_id, share.kind, upload_digest(body), share.seed, ref=rec.ref
                )
                continue
            rnd.reserve(rec.client_id)
            rnd.accept(
                rec.client_id,
                share,
                upload_digest(body),
                share.expand(round_id, rec.client_id),
                ref=rec.ref,
            )

    @staticmethod
    def _record_digest(journal: RoundJournal, rec: JournalShare) -> bytes:
        """The :func:`~mpc_agg.core.rounds.upload_digest` of the body ``rec`` holds (a
        SPOOL record carries it; a SHARE record's body is read back)."""
        if isinstance(rec.ref, SpoolRef):
            return rec.ref.digest
        return upload_digest(journal.read(rec.ref))

    def close(self) -> None:
        """Close every open journal file (on shutdown; files stay for recovery)."""
        for journal in self.journals.values():
            journal.close()
