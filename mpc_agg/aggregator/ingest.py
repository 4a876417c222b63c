"""Upload admission and the O(d) work of accepting a share, on ingest threads.

README, "How a round works" (step 3). :class:`Ingest` checks an upload's header and reserves
the client in its round on the event loop, runs the value check, seed expansion and journal
write on a thread pool (numpy, OpenSSL and file I/O release the GIL; on the loop itself for
small vectors), waits for the fsync that covers the record on a commit thread (group
commit: uploads arriving together share one fsync), then settles the reservation. A close
waits for the reservations made before it: :meth:`Ingest.drain` awaits an event set when a
round has none left, it does not poll.

Large rounds (vectors above the party's streaming threshold; docs/design.md, "Streamed
uploads"): a FULL share is received block by block (:meth:`Ingest.receive_stream_async`):
header first, then each block value-checked, digested and written to a spool file on an
ingest thread; once the body is whole and durable the upload is reserved, a small journal
record referencing the file is committed, and only then is the share added to the running
sum, read back block by block. A SEED share's stream is validated block by block before it
is journaled and added block by block after. Nothing in the path holds a d-vector, and a cut
upload changes nothing. Block-wise additions to running sums run on one thread of their own
(they serialise on the sum's lock anyway), so they never hold up the ingest threads.

A journal record written whose upload is then refused (its commit failed) may be durable
all the same: a restart would replay it, though the client was told otherwise and may have
sent a different share since. The round is then *poisoned* (it fails at its close with
``storage_failure``, nothing revealed), and recovery fails a round whose journal holds two
different shares of one client.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import xxhash

from mpc_agg.core import codec
from mpc_agg.core.accumulator import Accumulator
from mpc_agg.core.field import FieldArray
from mpc_agg.core.ring import Ring, RingArray
from mpc_agg.core.rounds import Round, RoundState, upload_digest
from mpc_agg.core.sharing import Share, ShareKind, full_share_index
from mpc_agg.errors import (
    ConflictingShare,
    MalformedUpload,
    PeerError,
    RoundEnded,
    RoundFull,
    RoundNotOpen,
    StorageFailure,
    UploadInProgress,
)
from mpc_agg.storage.journal import RoundJournal
from mpc_agg.storage.spool import RoundSpool, SpoolRef, SpoolWriter
from mpc_agg.transport.upload_limits import UploadBody

from .store import RoundStore

log = logging.getLogger("mpc_agg.aggregator")

T = TypeVar("T")


def expected_kind(client_id: str, index: int, m: int) -> ShareKind:
    """The kind of share aggregator ``index`` accepts from ``client_id``: FULL at the one
    :func:`~mpc_agg.core.sharing.full_share_index` designates, SEED everywhere else."""
    return ShareKind.FULL if full_share_index(client_id, m) == index else ShareKind.SEED


INGEST_THREADS = max(1, min(4, os.cpu_count() or 1))
"""Threads doing the O(d) work of uploads at one aggregator."""

INLINE_BYTES = 256 * 1024
"""Uploads of vectors of at most this many bytes (d times the ring's element size: d <=
32768 in GF(p), 65536 in Z_2^32) do their O(d) work on
the event loop (at most ~0.1 ms there): below this, handing it to a thread and back costs
more than the work (README, "Cost model and performance")."""

COMMIT_THREADS = 32
"""Threads waiting for journal fsyncs (group commit): they only wait, and as many uploads
as wait at once share one fsync."""


def _reason(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _storage_failure(exc: OSError) -> StorageFailure:
    return StorageFailure(
        f"this aggregator could not journal the upload durably ({_reason(exc)}); nothing "
        "was accepted, retry later"
    )


def _commit_failure(exc: OSError) -> StorageFailure:
    return StorageFailure(
        f"this aggregator wrote the upload's journal record but could not make it durable "
        f"({_reason(exc)}); the record may survive, so this round can no longer reveal a "
        "total: it will fail at its close"
    )


_LIVE = (RoundState.OPEN, RoundState.CLOSING)
"""The states in which a reserved upload may still be settled."""

_ENDED = (RoundState.DONE, RoundState.FAILED)


def _ended(rnd: Round) -> RoundEnded:
    return RoundEnded(
        f"round {rnd.round_id!r} ended ({rnd.state.value}) while this upload was "
        "being processed; it was not counted"
    )


def _check_open(rnd: Round) -> None:
    """Raise unless ``rnd`` is OPEN (before each block of a streamed body): RoundEnded once
    it ended, RoundNotOpen once it closed. A body still arriving then is not counted."""
    if rnd.state in _ENDED:
        raise _ended(rnd)
    if rnd.state is not RoundState.OPEN:
        raise RoundNotOpen(
            f"round {rnd.round_id!r} is {rnd.state.value}: uploads closed while this one "
            "was arriving; it was not counted"
        )


class _WholeBody:
    """An :class:`~mpc_agg.transport.upload_limits.UploadBody` over a body already in
    memory (a whole FULL share of a large round handed to :meth:`Ingest.receive_share_async`)."""

    def __init__(self, body: bytes | bytearray) -> None:
        self._view = memoryview(body)
        self._pos = 0

    @property
    def length(self) -> int:
        return len(self._view)

    async def read(self, n: int) -> bytearray:
        if self._pos + n > len(self._view):
            raise MalformedUpload(f"body ended after {len(self._view)} bytes")
        self._pos += n
        return bytearray(self._view[self._pos - n : self._pos])

    async def finish(self) -> None:
        return None


def _may_reject(ring: Ring) -> bool:
    """Whether seed streams in ``ring`` can hold a rejected word: only when its modulus
    leaves some words of its width that are not elements (GF(p): the word p; in Z_(2^32)
    every word is an element, so its seeds need no validation pass)."""
    return ring.modulus < 1 << (8 * ring.itemsize)


class Ingest:
    """Uploads into the rounds of ``store``; ``counters`` receives the upload metrics."""

    def __init__(self, store: RoundStore, counters: dict[str, int]) -> None:
        self.store = store
        self.index = store.index
        self.counters = counters
        self._pool = ThreadPoolExecutor(
            max_workers=INGEST_THREADS, thread_name_prefix=f"ingest-{store.index}"
        )
        self._commits = ThreadPoolExecutor(
            max_workers=COMMIT_THREADS, thread_name_prefix=f"commit-{store.index}"
        )
        self._sums = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sum-{store.index}")
        """Block-wise additions to running sums (:meth:`_add_blocks`): they serialise on
        the sum's lock anyway, and on a thread of their own they never take an ingest
        thread from spool writes."""
        self._tasks: set[asyncio.Future[Any]] = set()
        self._idle: dict[str, asyncio.Event] = {}  # round id -> set while nothing is pending
        self._arriving: dict[str, set[str]] = {}
        """Round id -> clients whose streamed body is arriving (not yet reserved)."""

    # -- whole bodies ---------------------------------------------------------------------

    def receive_share(self, round_id: str, client_id: str, body: bytes | bytearray) -> bool:
        """Validate, journal and accumulate one upload, all in the calling thread.

        True when accepted (201), False for an identical retry (200); raises a
        :class:`~mpc_agg.errors.PeerError` otherwise, and a refused upload changes nothing
        (but a record whose commit failed poisons the round: see the module docstring).

        In a large round nothing is held or journaled whole, as in
        :meth:`receive_share_async`: a FULL share is written to the spool block by block
        (values checked) and journaled as a SPOOL record; a SEED share is validated, then
        added, block by block.
        """
        rnd, share, digest = self._admit(round_id, client_id, body)
        if share is None:
            return False
        journal = self.store.journals[round_id]
        if share.kind is ShareKind.FULL and self.store.streamed(rnd.dim, rnd.ring):
            return self._receive_spooled(rnd, journal, client_id, body)
        large_seed = self._large_seed(rnd, share)
        vector: FieldArray | None = None
        written = False
        try:
            if large_seed:
                ref, seq = self._write_seed(journal, rnd, client_id, share, body)
            else:
                vector, ref, seq = self._write(journal, rnd, client_id, share, body)
            written = True
            self._commit(journal, seq)
            if rnd.state not in _LIVE:
                raise _ended(rnd)
            acc = rnd.sum
        except BaseException as exc:
            self._undo(rnd, client_id, exc, written=written)
            raise
        if vector is not None:
            self._settle(rnd, client_id, share, digest, vector, ref, len(body))
            return True
        error = self._add_blocks(rnd, acc, self._seed_blocks(rnd, client_id, share))
        self._settle_summed(rnd, client_id, share.kind, digest, share.seed, ref, len(body), error)
        return True

    def _receive_spooled(
        self, rnd: Round, journal: RoundJournal, client_id: str, body: bytes | bytearray
    ) -> bool:
        """:meth:`receive_share` of a FULL share of a large round, reserved (blocking): its
        body goes to a spool file block by block (each block's values checked), then it is
        journaled, committed and added as a streamed upload would be."""
        ring = rnd.ring
        head = codec.SHARE_HEADER.size
        block = self.store.block_elements(ring) * ring.itemsize
        spool = self.store.spool(rnd.round_id)
        writer: SpoolWriter | None = None
        written = False
        try:
            writer = self._open_spool(spool, client_id, bytes(body[:head]), len(body))
            view = memoryview(body)
            for pos in range(head, len(body), block):
                piece = view[pos : pos + block]
                self._spool_block(writer, ring, piece, (pos - head) // ring.itemsize)
            ref = self._seal(writer)
            seq = self._journal_spool(journal, client_id, ref)
            written = True
            self._commit(journal, seq)
            if rnd.state not in _LIVE:
                raise _ended(rnd)
            acc = rnd.sum
        except BaseException as exc:
            self._undo(rnd, client_id, exc, written=written, writer=writer)
            raise
        error = self._add_blocks(rnd, acc, self.store.spooled_blocks(rnd, ref))
        self._settle_summed(rnd, client_id, ShareKind.FULL, ref.digest, None, ref, len(body), error)
        return True

    async def receive_share_async(
        self, round_id: str, client_id: str, body: bytes | bytearray
    ) -> bool:
        """:meth:`receive_share` without blocking the event loop for long. Once reserved,
        the upload is finished even if the request is cancelled.

        The O(d) work (value check, seed expansion, journal write) runs on the ingest
        threads, or on the loop itself for a vector of at most :data:`INLINE_BYTES` (where
        a thread hop costs more than the work); the wait for the fsync covering the record
        (group commit, :meth:`RoundJournal.commit`) runs on a commit thread, never on the
        loop, so uploads arriving together share one fsync. A SEED share of a large round is
        validated block by block, journaled, then added block by block (never expanded
        whole); a FULL share of a large round goes through :meth:`receive_stream_async`
        (into the spool: the journal never holds it).
        """
        if self._streamed(round_id, client_id):
            return await self.receive_stream_async(round_id, client_id, _WholeBody(body))
        rnd, share, digest = self._admit(round_id, client_id, body)
        if share is None:
            return False
        loop = asyncio.get_running_loop()
        journal = self.store.journals[round_id]  # the thread writes here even if it ends
        large_seed = self._large_seed(rnd, share)

        async def work() -> None:
            vector: FieldArray | None = None
            written = False
            try:
                if large_seed:
                    ref, seq = await loop.run_in_executor(
                        self._pool, self._write_seed, journal, rnd, client_id, share, body
                    )
                elif rnd.dim * rnd.ring.itemsize <= INLINE_BYTES:
                    vector, ref, seq = self._write(journal, rnd, client_id, share, body)
                else:
                    vector, ref, seq = await loop.run_in_executor(
                        self._pool, self._write, journal, rnd, client_id, share, body
                    )
                written = True
                if journal.fsync:
                    await loop.run_in_executor(self._commits, self._commit, journal, seq)
                if rnd.state not in _LIVE:
                    raise _ended(rnd)
                acc = rnd.sum
            except BaseException as exc:
                self._undo(rnd, client_id, exc, written=written)
                raise
            if vector is not None:
                self._settle(rnd, client_id, share, digest, vector, ref, len(body))
                return
            blocks = self._seed_blocks(rnd, client_id, share)
            error = await loop.run_in_executor(self._sums, self._add_blocks, rnd, acc, blocks)
            self._settle_summed(
                rnd, client_id, share.kind, digest, share.seed, ref, len(body), error
            )

        await asyncio.shield(self.track(work()))
        return True

    def track(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``coro`` as a task this object keeps until it is done."""
        task: asyncio.Future[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _admit(
        self, round_id: str, client_id: str, body: bytes | bytearray
    ) -> tuple[Round, Share | None, bytes]:
        """The checks that need no O(d) work besides the digest: ids, round, header, length,
        retry or conflict, capacity. Returns the share (None for an identical retry) and
        reserves it in the round."""
        max_clients = self.store.topology.rounds.max_clients
        try:
            codec.check_id("client", client_id)
            rnd = self.store.lookup(round_id)
            share = codec.decode_share(
                body, aggregator=self.index, dim=rnd.dim, ring=rnd.ring, check_values=False
            )
            self._check_kind(client_id, share.kind)
            digest = upload_digest(body)
            if not rnd.check_upload(client_id, share, digest):
                self.counters["uploads_retried"] += 1
                return rnd, None, digest
            self._check_not_arriving(rnd, client_id)
            # A streamed body took its seat when its header was admitted: count it, or it
            # could be refused RoundFull after its whole body arrived.
            arriving = self._arriving_seats(rnd)
            if rnd.occupancy + arriving >= max_clients:
                raise RoundFull(
                    f"round {round_id!r} already holds max_clients = {max_clients} clients "
                    "(uploads arriving included)"
                )
        except Exception:
            self.counters["uploads_refused"] += 1
            raise
        rnd.reserve(client_id)
        self._event(round_id).clear()
        return rnd, share, digest

    def _check_kind(self, client_id: str, kind: ShareKind) -> None:
        expected = expected_kind(client_id, self.index, self.store.topology.m)
        if kind is not expected:
            raise MalformedUpload(
                f"client {client_id!r} must send a {expected.name.lower()} share to this "
                f"aggregator (its full share goes to aggregator "
                f"{full_share_index(client_id, self.store.topology.m)})"
            )

    def _write(
        self,
        journal: RoundJournal,
        rnd: Round,
        client_id: str,
        share: Share,
        body: bytes | bytearray,
    ) -> tuple[FieldArray, tuple[int, int], int]:
        """The O(d) part of accepting a reserved upload up to the journal write (any thread;
        touches no round state): check the values, expand a seed, write the record (not
        yet durable). The vector, the body's place in the journal and the record's number
        for :meth:`_commit`."""
        codec.check_share_values(share)
        vector = share.expand(rnd.round_id, client_id)
        return (vector, *self._journal_body(journal, client_id, body))

    @staticmethod
    def _journal_body(
        journal: RoundJournal, client_id: str, body: bytes | bytearray
    ) -> tuple[tuple[int, int], int]:
        try:
            return journal.write_share(client_id, body)
        except OSError as exc:  # disk full, I/O error: the write left nothing behind
            raise _storage_failure(exc) from exc

    @staticmethod
    def _commit(journal: RoundJournal, seq: int) -> None:
        """Wait until record ``seq`` of ``journal`` is durable (blocks: a commit thread).
        StorageFailure if the fsync failed: the caller refuses the upload and poisons the
        round (:meth:`_poison_uncommitted`), for the record may be durable all the same."""
        try:
            journal.commit(seq)
        except OSError as exc:
            raise _commit_failure(exc) from exc

    def _undo(
        self,
        rnd: Round,
        client_id: str,
        exc: BaseException,
        *,
        written: bool,
        writer: SpoolWriter | None = None,
        reserved: bool = True,
    ) -> None:
        """What every upload path does when ``client_id``'s upload is refused by ``exc``
        (on the loop, or the thread of the blocking API): a spool ``writer`` whose record
        was not ``written`` is abandoned (its file goes); a ``written`` journal record may
        be durable, so the round is poisoned (:meth:`_poison_uncommitted`); the reservation,
        if ``reserved`` (a streamed body arriving has none yet), is released; the refusal
        is counted."""
        if writer is not None and not written:
            writer.abandon()
        if written:
            self._poison_uncommitted(rnd, client_id, exc)
        if reserved:
            self._refuse(rnd, client_id)
        else:
            self.counters["uploads_refused"] += 1

    def _poison_uncommitted(self, rnd: Round, client_id: str, exc: BaseException) -> None:
        """``client_id``'s upload is refused after its journal record was written (its
        commit failed, or it was stopped): the record may be durable, and a restart would
        replay it although the client was refused (and may have sent a different share
        since). Unless the round has ended anyway, it is poisoned: it fails at its close
        (``storage_failure``) and reveals nothing (on the loop)."""
        if rnd.state in _ENDED:
            return
        cause = exc.__cause__ if isinstance(exc, StorageFailure) else exc
        rnd.poison(
            f"the journal record of client {client_id!r} was written but its upload was "
            f"refused ({type(cause).__name__}: {cause}); the journal may hold a share the "
            "running sum does not"
        )
        log.error("round %s: %s; the round will fail at its close", rnd.round_id, rnd.poisoned)

    # -- large rounds ---------------------------------------------------------------------

    def stream_block(self, round_id: str, client_id: str) -> int | None:
        """Bytes of ``client_id``'s upload to ``round_id`` to hold at a time: None when the
        body is taken whole, else (a FULL share of a large round) the block size its body
        is received in (:meth:`receive_stream_async`). Raises what the round's lookup does."""
        rnd = self.store.lookup(round_id)
        if expected_kind(client_id, self.index, self.store.topology.m) is not ShareKind.FULL:
            return None
        if not self.store.streamed(rnd.dim, rnd.ring):
            return None
        return self.store.block_elements(rnd.ring) * rnd.ring.itemsize

    def _streamed(self, round_id: str, client_id: str) -> bool:
        """Whether this upload goes through :meth:`receive_stream_async` (False also when
        the round or id is refused: :meth:`_admit` then says why)."""
        try:
            codec.check_id("client", client_id)
            return self.stream_block(round_id, client_id) is not None
        except PeerError:
            return False

    def _large_seed(self, rnd: Round, share: Share) -> bool:
        return share.kind is ShareKind.SEED and self.store.streamed(rnd.dim, rnd.ring)

    def _seed_blocks(self, rnd: Round, client_id: str, share: Share) -> Iterator[RingArray]:
        assert share.seed is not None
        return self.store.seed_blocks(rnd, client_id, share.seed)

    def _write_seed(
        self,
        journal: RoundJournal,
        rnd: Round,
        client_id: str,
        share: Share,
        body: bytes | bytearray,
    ) -> tuple[tuple[int, int], int]:
        """A SEED share of a large round, before it is journaled (any thread): in a ring
        whose streams can hold a rejected word, run the seed's stream once block by block,
        adding nothing (MalformedUpload at a rejected word), then write its record."""
        if _may_reject(rnd.ring):
            for _ in self._seed_blocks(rnd, client_id, share):
                pass
        return self._journal_body(journal, client_id, body)

    @staticmethod
    def _add_blocks(rnd: Round, acc: Accumulator, blocks: Iterator[RingArray]) -> str | None:
        """Add a durable share to the running sum ``acc`` of ``rnd`` block by block (any
        thread); None, or what stopped it part way (``acc`` is then damaged)."""
        try:
            acc.add_blocks(blocks)
        except Exception as exc:  # noqa: BLE001 - the round is poisoned: it fails closed
            log.error(
                "round %s: an accepted share could not be added to the running sum (%s: %s); "
                "the round will fail at its close",
                rnd.round_id,
                type(exc).__name__,
                exc,
            )
            return f"{type(exc).__name__}: {exc}"
        return None

    def _settle_summed(
        self,
        rnd: Round,
        client_id: str,
        kind: ShareKind,
        digest: bytes,
        seed: bytes | None,
        ref: object,
        nbytes: int,
        error: str | None,
    ) -> None:
        """Settle a reservation whose share is journaled and was added block by block (on
        the loop); RoundEnded if the round ended meanwhile (its sum no longer matters).

        ``error``: what stopped the addition part way (:meth:`_add_blocks`), or None. The
        share is journaled, so it is accepted all the same (as a restart would), but the
        round is poisoned (it fails at its close, nothing revealed) and the client is
        answered :class:`StorageFailure` (a retry is then answered as identical).
        """
        if rnd.state not in _LIVE:
            self._refuse(rnd, client_id)
            raise _ended(rnd)
        if error is not None:
            rnd.poison(f"an accepted share could not be added to the running sum ({error})")
        rnd.accept_summed(client_id, kind, digest, seed, ref)
        self.counters["uploads_accepted"] += 1
        self.counters["bytes_accepted"] += nbytes
        self._maybe_idle(rnd)
        if error is not None:
            raise StorageFailure(
                f"the upload is journaled, but this aggregator could not add it to the "
                f"round's running sum ({error}); the round will fail at its close and reveal "
                "nothing"
            )

    def _arriving_seats(self, rnd: Round) -> int:
        """Seats held by streamed bodies still arriving in ``rnd``: once reserved (the body
        is whole), a client counts in ``rnd.occupancy`` instead, not twice."""
        arriving = self._arriving.get(rnd.round_id, ())
        return sum(1 for c in arriving if c not in rnd.pending and c not in rnd.accepted)

    def _check_not_arriving(self, rnd: Round, client_id: str) -> None:
        if client_id in self._arriving.get(rnd.round_id, ()):
            raise UploadInProgress(
                f"an upload of client {client_id!r} to round {rnd.round_id!r} is arriving; "
                "retry in a moment"
            )

    async def receive_stream_async(self, round_id: str, client_id: str, body: UploadBody) -> bool:
        """Receive a FULL share of a large round from ``body`` block by block; True when
        accepted (201), False for an identical retry (200); raises a
        :class:`~mpc_agg.errors.PeerError` otherwise, and a refused upload changes nothing.

        The header is read and checked first (kind, index, ring, dimension, and the
        announced length against the exact one). A client with an accepted share has its
        body only digested, then compared (200 or 409). Otherwise each block is value
        checked, digested (XXH3-128, the :func:`~mpc_agg.core.rounds.upload_digest` of the
        whole body) and written to a new spool file on an ingest thread; once the body is
        whole, the file is fsync'd, the client reserved, a journal record referencing the
        file committed, and the share read back block by block into the running sum. A
        body cut, slow or malformed anywhere removes its file and changes nothing; a full
        disk is :class:`StorageFailure` with nothing kept. Once the body has arrived, the
        upload is finished even if the request is cancelled.
        """
        header = bytes(await body.read(min(codec.SHARE_HEADER.size, body.length)))
        rnd, new = self._admit_stream(round_id, client_id, header, body.length)
        if not new:
            return await self._digest_retry(rnd, client_id, header, body)
        self._arriving.setdefault(round_id, set()).add(client_id)  # until the task ends
        return await asyncio.shield(self.track(self._stream(rnd, client_id, header, body)))

    def _admit_stream(
        self, round_id: str, client_id: str, header: bytes, length: int
    ) -> tuple[Round, bool]:
        """:meth:`_admit` for a streamed body, on its header and announced ``length``:
        ``(round, True)`` for a new upload (not reserved yet: its body must arrive first),
        ``(round, False)`` for a client with an accepted share (to digest and compare)."""
        max_clients = self.store.topology.rounds.max_clients
        try:
            codec.check_id("client", client_id)
            rnd = self.store.lookup(round_id)
            kind = codec.decode_share_header(
                header, aggregator=self.index, dim=rnd.dim, ring=rnd.ring, length=length
            )
            self._check_kind(client_id, kind)
            if not rnd.check_arrival(client_id, rnd.dim, None):
                return rnd, False
            self._check_not_arriving(rnd, client_id)
            arriving = self._arriving_seats(rnd)
            if rnd.occupancy + arriving >= max_clients:
                raise RoundFull(
                    f"round {round_id!r} already holds max_clients = {max_clients} clients "
                    f"(uploads arriving included)"
                )
        except Exception:
            self.counters["uploads_refused"] += 1
            raise
        return rnd, True

    async def _digest_retry(
        self, rnd: Round, client_id: str, header: bytes, body: UploadBody
    ) -> bool:
        """The body of a client with an accepted share, only digested block by block (no
        spool): False (200) if identical; ConflictingShare or RoundEnded otherwise."""
        loop = asyncio.get_running_loop()
        digest = xxhash.xxh3_128(header)
        block = self.store.block_elements(rnd.ring) * rnd.ring.itemsize
        try:
            remaining = body.length - len(header)
            while remaining:
                data = await body.read(min(block, remaining))
                await loop.run_in_executor(self._pool, digest.update, data)
                remaining -= len(data)
            await body.finish()
            if rnd.check_arrival(client_id, rnd.dim, digest.digest()):
                raise ConflictingShare(  # not reached: the client's share is accepted
                    f"client {client_id!r} uploaded to round {rnd.round_id!r} already"
                )
        except Exception:
            self.counters["uploads_refused"] += 1
            raise
        self.counters["uploads_retried"] += 1
        return False

    async def _stream(self, rnd: Round, client_id: str, header: bytes, body: UploadBody) -> bool:
        """:meth:`receive_stream_async` once admitted (a task: see there); the client is
        no longer arriving once it ends."""
        try:
            accepted = await self._spool_and_sum(rnd, client_id, header, body)
            if accepted:
                self.counters["uploads_streamed"] += 1  # also counted in uploads_accepted
            return accepted
        finally:
            arriving = self._arriving.get(rnd.round_id, set())
            arriving.discard(client_id)
            if not arriving:
                self._arriving.pop(rnd.round_id, None)

    async def _spool_and_sum(
        self, rnd: Round, client_id: str, header: bytes, body: UploadBody
    ) -> bool:
        loop = asyncio.get_running_loop()
        ring = rnd.ring
        spool = self.store.spool(rnd.round_id)
        writer: SpoolWriter | None = None
        journaled = reserved = False
        try:
            _check_open(rnd)
            writer = await loop.run_in_executor(
                self._pool, self._open_spool, spool, client_id, header, body.length
            )
            block = self.store.block_elements(ring) * ring.itemsize
            start, remaining = 0, body.length - len(header)
            while remaining:
                # Before each block, and again once it arrived: a round that closed or
                # ended meanwhile stops the upload here, its file abandoned at once.
                _check_open(rnd)
                data = await body.read(min(block, remaining))
                _check_open(rnd)
                await loop.run_in_executor(self._pool, self._spool_block, writer, ring, data, start)
                start += len(data) // ring.itemsize
                remaining -= len(data)
            await body.finish()
            _check_open(rnd)
            ref = await loop.run_in_executor(self._pool, self._seal, writer)
            # The body is whole and durable: from here on, as a whole upload would be.
            if not self._reserve_arrived(rnd, client_id, ref.digest):
                writer.abandon()
                self.counters["uploads_retried"] += 1
                return False
            reserved = True
            journal = self.store.journals.get(rnd.round_id)
            if journal is None:
                raise _ended(rnd)
            seq = await loop.run_in_executor(
                self._pool, self._journal_spool, journal, client_id, ref
            )
            journaled = True  # the record may be durable: its file stays with it
            if journal.fsync:
                await loop.run_in_executor(self._commits, self._commit, journal, seq)
            if rnd.state not in _LIVE:
                raise _ended(rnd)
            acc = rnd.sum
        except BaseException as exc:
            self._undo(rnd, client_id, exc, written=journaled, writer=writer, reserved=reserved)
            if isinstance(exc, StorageFailure) and rnd.state in _ENDED:
                raise _ended(rnd) from exc  # its spool went with it: not a storage fault
            raise
        blocks = self.store.spooled_blocks(rnd, ref)
        error = await loop.run_in_executor(self._sums, self._add_blocks, rnd, acc, blocks)
        self._settle_summed(
            rnd, client_id, ShareKind.FULL, ref.digest, None, ref, body.length, error
        )
        return True

    def _reserve_arrived(self, rnd: Round, client_id: str, digest: bytes) -> bool:
        """Reserve a streamed upload whose body is durable in its spool file (on the loop):
        True once reserved, False for an identical retry; raises as :meth:`_admit` does
        (RoundNotOpen once the round has closed: an upload still arriving then is refused)."""
        max_clients = self.store.topology.rounds.max_clients
        if not rnd.check_arrival(client_id, rnd.dim, digest):
            return False
        if rnd.occupancy >= max_clients:
            raise RoundFull(
                f"round {rnd.round_id!r} already holds max_clients = {max_clients} clients"
            )
        rnd.reserve(client_id)
        self._event(rnd.round_id).clear()
        return True

    @staticmethod
    def _open_spool(spool: RoundSpool, client_id: str, header: bytes, length: int) -> SpoolWriter:
        """A new spool file for one upload of ``length`` bytes (reserved on disk first: a
        full disk is StorageFailure before any value is read), its header written (any
        thread)."""
        try:
            writer = spool.writer(client_id, length)
        except OSError as exc:
            raise _storage_failure(exc) from exc
        try:
            writer.write(header)
        except OSError as exc:
            writer.abandon()
            raise _storage_failure(exc) from exc
        return writer

    @staticmethod
    def _spool_block(
        writer: SpoolWriter, ring: Ring, data: bytearray | memoryview, start: int
    ) -> None:
        """Check one block of values (coordinates ``start``...) and append it to the spool
        file (any thread); MalformedUpload or StorageFailure (the caller abandons the file)."""
        values = ring.from_wire(data, 0, len(data) // ring.itemsize)
        codec.check_share_block(values, ring, start)
        try:
            writer.write(data)
        except OSError as exc:
            raise _storage_failure(exc) from exc

    @staticmethod
    def _seal(writer: SpoolWriter) -> SpoolRef:
        try:
            return writer.seal()
        except OSError as exc:
            raise _storage_failure(exc) from exc

    @staticmethod
    def _journal_spool(journal: RoundJournal, client_id: str, ref: SpoolRef) -> int:
        try:
            return journal.write_spool(client_id, ref)
        except OSError as exc:  # the write left nothing behind
            raise _storage_failure(exc) from exc

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on an ingest thread (O(d) work of a large round, off the loop)."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- settling -------------------------------------------------------------------------

    def _refuse(self, rnd: Round, client_id: str) -> None:
        rnd.release(client_id)
        self.counters["uploads_refused"] += 1
        self._maybe_idle(rnd)

    def _settle(
        self,
        rnd: Round,
        client_id: str,
        share: Share,
        digest: bytes,
        vector: FieldArray,
        ref: tuple[int, int],
        nbytes: int,
    ) -> None:
        rnd.accept(client_id, share, digest, vector, ref=ref)
        self.counters["uploads_accepted"] += 1
        self.counters["bytes_accepted"] += nbytes
        self._maybe_idle(rnd)

    def _event(self, round_id: str) -> asyncio.Event:
        event = self._idle.get(round_id)
        if event is None:
            event = self._idle[round_id] = asyncio.Event()
            event.set()
        return event

    def _maybe_idle(self, rnd: Round) -> None:
        if not rnd.pending:
            self._event(rnd.round_id).set()

    async def drain(self, rnd: Round) -> None:
        """Wait until the uploads reserved in ``rnd`` are settled (local work only)."""
        while rnd.pending:
            event = self._event(rnd.round_id)
            event.clear()
            if rnd.pending:
                await event.wait()
        self._idle.pop(rnd.round_id, None)

    async def settle_then(self, rnd: Round, then: Callable[[], None]) -> None:
        """Once ``rnd`` has no upload in progress, call ``then()``."""
        await self.drain(rnd)
        then()

    def shutdown(self) -> None:
        """Wait for the ingest, commit and sum threads to finish (on shutdown)."""
        self._pool.shutdown(wait=True)
        self._commits.shutdown(wait=True)
        self._sums.shutdown(wait=True)
