"""An aggregator's rounds and what keeps them: journals, the round index, recovery, retention.

docs/design.md, "Durable state". :class:`RoundStore` holds the rounds this aggregator knows,
creates a round's journal and index entry together (or neither), rebuilds open rounds from
their journals after a restart (a round whose journal says it was closing or revealing
comes back failed, never open), ends a round's journal when it ends, and keeps the totals of
the last ``rounds.keep_results`` ended rounds only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpc_agg.config.schema import Topology
from mpc_agg.core import codec
from mpc_agg.core.rounds import TERMINAL, Round, RoundState, upload_digest
from mpc_agg.errors import (
    ResultExpired,
    RoundConflict,
    RoundEnded,
    RoundIdUsed,
    StorageFailure,
    UnknownRound,
)
from mpc_agg.storage.journal import RoundJournal
from mpc_agg.storage.round_index import RoundIndex

log = logging.getLogger("mpc_agg.aggregator")

PlanCheck = Callable[[str, int, Any], "str | None"]
"""``(round_id, dim, recorded plan summary) -> why it does not match now, or None``."""


class RoundStore:
    """The rounds of aggregator ``index`` and their files under its data directory."""

    def __init__(self, topology: Topology, index: int, clock: Callable[[], float]) -> None:
        self.topology = topology
        self.index = index
        self.clock = clock
        self.directory = topology.aggregator_dir(index)
        self.round_index = RoundIndex(self.directory / "rounds.index", fsync=topology.fsync)
        self.rounds: dict[str, Round] = {}
        self.journals: dict[str, RoundJournal] = {}
        self._results: list[str] = []  # rounds holding a total, in the order they ended

    def journal_path(self, round_id: str) -> Path:
        """Where ``round_id``'s journal lives."""
        return self.directory / f"round-{round_id}.journal"

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

    # -- life -----------------------------------------------------------------------------

    def create(self, round_id: str, dim: int, min_clients: int, plan: Any, dp: bool) -> Round:
        """Create the round's journal, then its index entry, durably; on any failure neither
        remains and :class:`StorageFailure` is raised (the id stays usable)."""
        header = {"round": round_id, "dim": dim, "min_clients": min_clients, "plan": plan}
        path = self.journal_path(round_id)
        try:
            journal = RoundJournal.create(path, header, fsync=self.topology.fsync)
            try:
                self.round_index.record(round_id, "open", dp=dp)
            except OSError:
                journal.discard()
                raise
        except OSError as exc:
            log.error("round %s: cannot open (%s)", round_id, exc)
            raise StorageFailure(
                f"aggregator {self.index} could not record round {round_id!r} durably "
                f"({exc.strerror or exc}); nothing was created, retry later"
            ) from None
        self.journals[round_id] = journal
        rnd = Round(round_id, dim, min_clients, opened_at=self.clock())
        self.rounds[round_id] = rnd
        return rnd

    def record_end(self, round_id: str, state: str) -> None:
        """Note in the round index how ``round_id`` ended (best effort: the index already
        holds the id, which is what keeps it from being reused)."""
        try:
            self.round_index.record(round_id, state)
        except OSError as exc:
            log.error("round %s: cannot record its end in the round index (%s)", round_id, exc)

    def forget_journal(self, round_id: str, journal: RoundJournal, state: str) -> None:
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
        """
        recovered: list[Round] = []
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
                self.forget_journal(round_id, journal, contents.end_state or "failed")
                continue
            if self.round_index.state(round_id) not in (None, "open"):
                log.warning("round %s ended before this restart; journal discarded", round_id)
                journal.discard()
                continue
            mismatch = plan_mismatch(round_id, int(h["dim"]), h.get("plan"))
            if mismatch is not None:
                log.error("round %s cannot be recovered: %s; it is failed", round_id, mismatch)
                self.forget_journal(round_id, journal, "failed")
                continue
            if round_id not in self.round_index:  # a journal from before the index
                try:
                    self.round_index.record(round_id, "open")
                except OSError as exc:  # the journal itself still keeps the id from reuse
                    log.error("round %s: cannot add it to the round index (%s)", round_id, exc)
            rnd = self._replay(round_id, int(h["dim"]), int(h["min_clients"]), journal, contents)
            self.rounds[round_id] = rnd
            self.journals[round_id] = journal
            recovered.append(rnd)
            log.info(
                "round %s recovered from its journal: %d clients, dim=%d",
                round_id,
                len(rnd.accepted),
                rnd.dim,
            )
        for round_id in self.round_index.open_ids():
            if round_id not in seen:  # its journal was removed when it ended
                self.record_end(round_id, "failed")
        return recovered

    def _replay(
        self, round_id: str, dim: int, min_clients: int, journal: RoundJournal, contents: Any
    ) -> Round:
        rnd = Round(round_id, dim, min_clients, opened_at=self.clock())
        for rec in contents.shares:  # one body in memory at a time
            body = journal.read(rec.ref)
            share = codec.decode_share(body, aggregator=self.index, dim=dim)
            if rec.client_id in rnd.accepted:
                # A record written whose fsync then failed (the upload was refused and
                # retried): the first record of the client is the one acknowledged.
                log.warning(
                    "round %s: second journal record of client %s ignored",
                    round_id,
                    rec.client_id,
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
        return rnd

    def close(self) -> None:
        """Close every open journal file (on shutdown; files stay for recovery)."""
        for journal in self.journals.values():
            journal.close()
