"""Upload admission and the O(d) work of accepting a share, on ingest threads.

README, "How a round works" (step 3). :class:`Ingest` checks an upload's header and reserves
the client in its round on the event loop, runs the value check, seed expansion and journal
write on a thread pool (numpy, OpenSSL and file I/O release the GIL; on the loop itself for
small vectors), waits for the fsync that covers the record on a commit thread (group
commit: uploads arriving together share one fsync), then settles the reservation. A close
waits for the reservations made before it: :meth:`Ingest.drain` awaits an event set when a
round has none left, it does not poll.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mpc_agg.core import codec
from mpc_agg.core.field import FieldArray
from mpc_agg.core.rounds import Round, RoundState, upload_digest
from mpc_agg.core.sharing import Share, ShareKind, full_share_index
from mpc_agg.errors import MalformedUpload, RoundEnded, RoundFull, StorageFailure
from mpc_agg.storage.journal import RoundJournal

from .store import RoundStore


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


def _storage_failure(exc: OSError) -> StorageFailure:
    reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return StorageFailure(
        f"this aggregator could not journal the upload durably ({reason}); nothing was "
        "accepted, retry later"
    )


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
        self._tasks: set[asyncio.Future[None]] = set()
        self._idle: dict[str, asyncio.Event] = {}  # round id -> set while nothing is pending

    def receive_share(self, round_id: str, client_id: str, body: bytes | bytearray) -> bool:
        """Validate, journal and accumulate one upload, all in the calling thread.

        True when accepted (201), False for an identical retry (200); raises a
        :class:`~mpc_agg.errors.PeerError` otherwise, and a refused upload changes nothing.
        """
        rnd, share, digest = self._admit(round_id, client_id, body)
        if share is None:
            return False
        try:
            vector, ref = self._work(self.store.journals[round_id], rnd, client_id, share, body)
        except BaseException:
            self._refuse(rnd, client_id)
            raise
        self._settle(rnd, client_id, share, digest, vector, ref, len(body))
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
        loop, so uploads arriving together share one fsync.
        """
        rnd, share, digest = self._admit(round_id, client_id, body)
        if share is None:
            return False
        loop = asyncio.get_running_loop()
        journal = self.store.journals[round_id]  # the thread writes here even if it ends

        async def work() -> None:
            try:
                if rnd.dim * rnd.ring.itemsize <= INLINE_BYTES:
                    vector, ref, seq = self._write(journal, rnd, client_id, share, body)
                else:
                    vector, ref, seq = await loop.run_in_executor(
                        self._pool, self._write, journal, rnd, client_id, share, body
                    )
                if journal.fsync:
                    await loop.run_in_executor(self._commits, self._commit, journal, seq)
                if rnd.state not in (RoundState.OPEN, RoundState.CLOSING):
                    raise RoundEnded(
                        f"round {round_id!r} ended ({rnd.state.value}) while this upload was "
                        "being processed; it was not counted"
                    )
            except BaseException:
                self._refuse(rnd, client_id)
                raise
            self._settle(rnd, client_id, share, digest, vector, ref, len(body))

        await asyncio.shield(self.track(work()))
        return True

    def track(self, coro: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """Run ``coro`` as a task this object keeps until it is done."""
        task: asyncio.Future[None] = asyncio.ensure_future(coro)
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
            expected = expected_kind(client_id, self.index, self.store.topology.m)
            if share.kind is not expected:
                raise MalformedUpload(
                    f"client {client_id!r} must send a {expected.name.lower()} share to this "
                    f"aggregator (its full share goes to aggregator "
                    f"{full_share_index(client_id, self.store.topology.m)})"
                )
            digest = upload_digest(body)
            if not rnd.check_upload(client_id, share, digest):
                self.counters["uploads_retried"] += 1
                return rnd, None, digest
            if rnd.occupancy >= max_clients:
                raise RoundFull(
                    f"round {round_id!r} already holds max_clients = {max_clients} clients"
                )
        except Exception:
            self.counters["uploads_refused"] += 1
            raise
        rnd.reserve(client_id)
        self._event(round_id).clear()
        return rnd, share, digest

    def _work(
        self,
        journal: RoundJournal,
        rnd: Round,
        client_id: str,
        share: Share,
        body: bytes | bytearray,
    ) -> tuple[FieldArray, tuple[int, int]]:
        """The O(d) part of accepting a reserved upload (any thread): check the values,
        expand a seed, journal the body durably. Touches no round state."""
        vector, ref, seq = self._write(journal, rnd, client_id, share, body)
        self._commit(journal, seq)
        return vector, ref

    def _write(
        self,
        journal: RoundJournal,
        rnd: Round,
        client_id: str,
        share: Share,
        body: bytes | bytearray,
    ) -> tuple[FieldArray, tuple[int, int], int]:
        """:meth:`_work` up to the journal write, not yet durable: the vector, the body's
        place in the journal and the record's number for :meth:`_commit`."""
        codec.check_share_values(share)
        vector = share.expand(rnd.round_id, client_id)
        try:
            ref, seq = journal.write_share(client_id, body)
        except OSError as exc:  # disk full, I/O error: the write left nothing behind
            raise _storage_failure(exc) from exc
        return vector, ref, seq

    @staticmethod
    def _commit(journal: RoundJournal, seq: int) -> None:
        """Wait until record ``seq`` of ``journal`` is durable (blocks: a commit thread)."""
        try:
            journal.commit(seq)
        except OSError as exc:  # the fsync failed: the upload is not acknowledged
            raise _storage_failure(exc) from exc

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
        """Wait for the ingest and commit threads to finish (on shutdown)."""
        self._pool.shutdown(wait=True)
        self._commits.shutdown(wait=True)
