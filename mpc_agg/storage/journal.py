"""Append-only journal of a round, one file per round, and its replay after a crash.

docs/design.md, "Durable state": each accepted share is journaled (append-only, fsync'd) before
it is
acknowledged; a restarted aggregator rebuilds its rounds (running sums, accepted clients,
duplicate detection) from the journals; a FULL share's bytes are read back from here if its
client must be dropped at agreement time, so memory stays O(d). Record layout
(little-endian)::

    u32 length of (type .. payload)   u8 type   payload   u64 XXH3-64 of (type .. payload)

* type 1, OPEN  (first record): JSON ``{"round", "dim", "min_clients", "plan",
  "opened_unix"}`` (the wall-clock time of the opening, from which the round's deadline
  counts; absent in journals written before deadlines)
* type 2, SHARE: ``u16 len(client_id) || client_id || upload body``
* type 3, END: JSON ``{"state"}``; the round ended and the file is about to be deleted.
* type 4, MARK: JSON ``{"state"}``, ``closing`` (written when the round closes) or
  ``revealing`` (written before this aggregator's share of the total is computed). A round
  whose journal holds a MARK but no END was mid-aggregation when the party stopped: recovery
  fails it, so it never comes back open (docs/design.md, "Durable state").
* type 5, SPOOL: ``u16 len(client_id) || client_id || u16 len(name) || name || u64 length
  || 16-byte XXH3-128 digest``: a streamed upload whose body is the file ``name`` of the
  round's spool (:mod:`mpc_agg.storage.spool`), written and fsync'd before this record, so
  no record is ever limited by :data:`MAX_RECORD` (docs/design.md, "Streamed uploads").

A record is valid only if it is complete and its checksum matches (XXH3-64 rather than
CRC-32: it runs at memory speed, 20x faster than zlib's CRC-32 here, and detects torn or
garbled tails at least as well): :func:`read_journal` stops at
the first invalid record (a torn tail left by a crash) and reports where, so the caller can
truncate the file there and log what was dropped. A SHARE or SPOOL record that is whole and
has its checksum but does not parse was never torn by a crash: the journal is *corrupt*
(:attr:`JournalContents.corrupt`), the scan goes on past it (nothing acknowledged after it
is cut off), and the caller must fail the round rather than replay part of it.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from mpc_agg.storage.durable import fsync_directory
from mpc_agg.storage.spool import DIGEST_BYTES, SPOOL_SUFFIX, RoundSpool, SpoolRef

RECORD_OPEN = 1
RECORD_SHARE = 2
RECORD_END = 3
RECORD_MARK = 4
RECORD_SPOOL = 5
MARKS = ("closing", "revealing")
_LEN = struct.Struct("<I")
_CHECK = struct.Struct("<Q")
_CID = struct.Struct("<H")
_SPOOLED = struct.Struct("<Q16s")
MAX_RECORD = 1 << 31


@dataclass(frozen=True, repr=False)
class JournalShare:
    """A SHARE or SPOOL record: the client and where its upload body lies, ``(offset,
    length)`` in the journal file or a :class:`~mpc_agg.storage.spool.SpoolRef` (the body is
    read back one record at a time with :meth:`RoundJournal.read`, or block by block from
    the spool, so recovering a round costs O(d) memory, not O(clients x d))."""

    client_id: str
    ref: tuple[int, int] | SpoolRef

    def __repr__(self) -> str:
        size = self.ref.length if isinstance(self.ref, SpoolRef) else self.ref[1]
        return f"JournalShare({self.client_id!r}, {size} bytes)"


@dataclass(frozen=True)
class JournalContents:
    """What :func:`read_journal` found: the OPEN header, shares in order, the END state if
    any, the length of the valid prefix, why reading stopped early (None if clean), the
    last MARK (None if none), and why the journal is corrupt (the first whole record with
    a valid checksum that does not parse), or None."""

    header: dict[str, Any]
    shares: list[JournalShare]
    end_state: str | None
    valid_bytes: int
    torn: str | None
    mark: str | None = None
    corrupt: str | None = None


def _frame(rtype: int, payload_parts: list[bytes | bytearray]) -> list[bytes | bytearray]:
    head = bytes([rtype])
    check = xxhash.xxh3_64(head)
    for part in payload_parts:
        check.update(part)
    length = 1 + sum(len(p) for p in payload_parts)
    return [_LEN.pack(length), head, *payload_parts, _CHECK.pack(check.intdigest())]


def read_journal(data: bytes) -> JournalContents:
    """Parse journal bytes (sans I/O). Raises ValueError if even the OPEN record is bad."""
    return scan_journal(lambda offset, n: data[offset : offset + n], len(data))


def _whole_record_at(read_at: Callable[[int, int], bytes], pos: int, size: int) -> bool:
    """True if a whole record with a valid checksum starts at ``pos``."""
    if size - pos < _LEN.size + 1 + _CHECK.size:
        return False
    (length,) = _LEN.unpack(read_at(pos, _LEN.size))
    if length < 1 or length > MAX_RECORD or pos + _LEN.size + length + _CHECK.size > size:
        return False
    framed = read_at(pos + _LEN.size, length + _CHECK.size)
    (check,) = _CHECK.unpack_from(framed, length)
    return bool(xxhash.xxh3_64_intdigest(memoryview(framed)[:length]) == check)


def scan_journal(read_at: Callable[[int, int], bytes], size: int) -> JournalContents:
    """Parse a journal of ``size`` bytes read through ``read_at(offset, n)``, one record at a
    time (a record is checked whole, then dropped). Raises ValueError if even the OPEN
    record is bad."""
    pos = 0
    header: dict[str, Any] | None = None
    shares: list[JournalShare] = []
    end_state: str | None = None
    mark: str | None = None
    torn: str | None = None
    corrupt: str | None = None
    while pos < size:
        if size - pos < _LEN.size + 1 + _CHECK.size:
            torn = f"incomplete record header at byte {pos}"
            break
        (length,) = _LEN.unpack(read_at(pos, _LEN.size))
        end = pos + _LEN.size + length + _CHECK.size
        if length < 1 or length > MAX_RECORD or end > size:
            torn = f"incomplete record at byte {pos} ({length} bytes announced)"
            break
        framed = read_at(pos + _LEN.size, length + _CHECK.size)
        record = memoryview(framed)[:length]
        (check,) = _CHECK.unpack_from(framed, length)
        if xxhash.xxh3_64_intdigest(record) != check:
            if _whole_record_at(read_at, end, size):
                # Whole records follow: not a tail torn by a crash but damage in the middle
                # (lost pages after a failed fsync, a bad disk). Cutting here would drop
                # them, acknowledged ones included; the round must fail instead.
                corrupt = (
                    corrupt
                    or f"checksum mismatch in the record at byte {pos}, with whole records after it"
                )
            else:
                torn = f"checksum mismatch in the record at byte {pos}"
            break
        rtype, payload = record[0], record[1:]
        if header is None:
            if rtype != RECORD_OPEN:
                raise ValueError("journal does not start with an OPEN record")
            header = json.loads(bytes(payload))
        elif rtype in (RECORD_SHARE, RECORD_SPOOL):
            try:
                if rtype == RECORD_SHARE:
                    shares.append(_share_record(payload, pos + _LEN.size + 1))
                else:
                    shares.append(_spool_record(payload))
            except (ValueError, struct.error):  # UnicodeDecodeError is a ValueError
                # Whole, with its checksum: written so, not torn by a crash. Cutting here
                # would drop acknowledged records after it; the round must fail instead.
                kind = "share" if rtype == RECORD_SHARE else "spool"
                corrupt = corrupt or f"malformed {kind} record at byte {pos}"
        elif rtype == RECORD_END:
            end_state = json.loads(bytes(payload))["state"]
        elif rtype == RECORD_MARK:
            mark = json.loads(bytes(payload))["state"]
        else:
            torn = f"unknown record type {rtype} at byte {pos}"
            break
        record.release()
        pos = end
    if header is None:
        raise ValueError(f"journal has no valid OPEN record ({torn or 'empty file'})")
    return JournalContents(header, shares, end_state, pos, torn, mark, corrupt)


def _share_record(payload: memoryview, offset: int) -> JournalShare:
    """A SHARE record's payload starting at file ``offset`` (see the module docstring);
    ValueError or struct.error if malformed."""
    (n,) = _CID.unpack_from(payload)
    if not n or _CID.size + n > len(payload):
        raise ValueError("share record with a client id of the wrong length")
    cid = bytes(payload[_CID.size : _CID.size + n]).decode("utf-8")
    return JournalShare(cid, (offset + _CID.size + n, len(payload) - _CID.size - n))


def _spool_record(payload: memoryview) -> JournalShare:
    """A SPOOL record's payload (see the module docstring); ValueError if malformed."""
    (n,) = _CID.unpack_from(payload)
    pos = _CID.size
    cid = bytes(payload[pos : pos + n]).decode("utf-8")
    pos += n
    (k,) = _CID.unpack_from(payload, pos)
    pos += _CID.size
    name = bytes(payload[pos : pos + k]).decode("ascii")
    pos += k
    length, digest = _SPOOLED.unpack_from(payload, pos)
    if pos + _SPOOLED.size != len(payload) or not cid or len(name) != k:
        raise ValueError("spool record of the wrong length")
    return JournalShare(cid, SpoolRef(name, length, digest))


def _write_all(fd: int, parts: list[bytes | bytearray], total: int) -> int:
    """``writev`` until all ``total`` bytes are written or the OS writes nothing more
    (Linux writes at most about 2 GiB per call); returns the bytes written."""
    written = os.writev(fd, parts)
    while 0 < written < total:
        rest = b"".join(parts)[written:] if len(parts) > 1 else memoryview(parts[0])[written:]
        step = os.write(fd, rest)
        if step <= 0:
            break
        written += step
    return written


MAX_FLUSHES = 2
"""fsyncs of one journal in progress at once. Two, not one: the kernel overlaps (and merges)
concurrent fsyncs of a file, so a writer whose record the fsync in progress does not cover
starts the next at once instead of queueing behind it; beyond two, writers wait and share."""


@dataclass
class _Flush:
    """One fsync of a journal: it covers records ``1..upto`` (written whole before it
    started); ``done`` once it returned, ``error`` if it failed."""

    upto: int
    done: bool = False
    error: OSError | None = None


class RoundJournal:
    """The journal file of one round at one aggregator.

    It holds no file descriptor between calls: each append (and each read) opens the file,
    does its work and closes it again, so open rounds cost no descriptors (an aggregator
    may hold ``rounds.max_open`` of them, and recover as many after a restart). An append
    never creates the file: once the round has ended and its journal is deleted, a late
    append fails instead of leaving a stray journal behind.

    Appends may come from several threads: each record is written whole under a lock and
    numbered in file order. Its durability is a **group commit** (:meth:`commit`): an fsync
    makes every write of the file completed before it started durable, whichever descriptor
    wrote it, so a writer whose record an fsync already in progress covers waits for that
    one; otherwise it starts one (at most :data:`MAX_FLUSHES` at once; beyond, it waits for
    one to end, then follows or leads the next, which covers every record written
    meanwhile). Concurrent uploads share fsyncs, and
    each append returns only after an fsync that started after its record was written
    completed; a failed fsync fails every append it covered. ``sync``: the fsync function
    (``os.fsync``; tests inject one that counts and records).
    """

    def __init__(
        self, path: Path, *, fsync: bool = True, sync: Callable[[int], None] = os.fsync
    ) -> None:
        self.path = path
        self.fsync = fsync
        self._sync = sync
        self._lock = threading.Lock()  # one record written at a time, numbered in file order
        self._commit_cond = threading.Condition(threading.Lock())
        self._spool = RoundSpool(path.with_suffix(SPOOL_SUFFIX), fsync=fsync)
        self._written = 0  # number of the last record written whole
        self._durable = 0  # every record up to this number is durable
        self._flushes: list[_Flush] = []  # the fsyncs in progress, oldest first

    def __repr__(self) -> str:
        return f"RoundJournal({str(self.path)!r})"

    @classmethod
    def create(
        cls,
        path: Path,
        header: dict[str, Any],
        *,
        fsync: bool = True,
        sync: Callable[[int], None] = os.fsync,
    ) -> RoundJournal:
        """A new journal whose first record is OPEN with ``header``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        journal = cls(path, fsync=fsync, sync=sync)
        try:
            journal._append(RECORD_OPEN, [json.dumps(header, sort_keys=True).encode()])
            if fsync:
                fsync_directory(path.parent)  # the file itself survives a crash
        except OSError:
            journal.discard()  # an open that fails leaves no journal behind
            raise
        return journal

    @classmethod
    def recover(
        cls, path: Path, *, fsync: bool = True, sync: Callable[[int], None] = os.fsync
    ) -> tuple[RoundJournal, JournalContents]:
        """Open an existing journal, truncating a torn tail; return it and its contents."""
        fd = os.open(path, os.O_RDONLY)
        try:
            contents = scan_journal(lambda offset, n: os.pread(fd, n, offset), os.fstat(fd).st_size)
        finally:
            os.close(fd)
        if contents.torn is not None:
            os.truncate(path, contents.valid_bytes)
        return cls(path, fsync=fsync, sync=sync), contents

    def _append(self, rtype: int, payload_parts: list[bytes | bytearray]) -> int:
        """Append one record durably; return the file offset of its payload."""
        start, seq = self._write(rtype, payload_parts)
        self.commit(seq)
        return start + _LEN.size + 1

    def _write(self, rtype: int, payload_parts: list[bytes | bytearray]) -> tuple[int, int]:
        """Write one record whole (not yet durable): ``(file offset of the record, its
        number)`` for :meth:`commit`. Raises OSError leaving the file as it was."""
        parts = _frame(rtype, payload_parts)
        total = sum(len(x) for x in parts)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)  # never O_CREAT: see the class
        try:
            with self._lock:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    written = _write_all(fd, parts, total)
                except OSError:
                    written = -1
                if written != total:
                    # Cut the partial record off, so records acknowledged later are not
                    # stranded behind a torn one (a reader stops at the first bad record).
                    os.ftruncate(fd, start)
                    raise OSError(
                        f"failed write to journal {self.path}: {max(written, 0)} of {total} bytes"
                    )
                with self._commit_cond:
                    self._written += 1
                    seq = self._written
        finally:
            os.close(fd)
        return start, seq

    def commit(self, seq: int) -> None:
        """Return once record ``seq`` (from :meth:`_write`) is durable: after an fsync that
        started after it was written has completed (group commit, see the class). Raises
        OSError if the fsync covering it failed. Without ``fsync``, returns at once."""
        if not self.fsync:
            return
        cond = self._commit_cond
        with cond:
            while True:
                if self._durable >= seq:
                    return
                covering = next((f for f in self._flushes if f.upto >= seq), None)
                if covering is not None:  # started after our record was written: follow it
                    while not covering.done:
                        cond.wait()
                    if covering.error is not None:
                        raise OSError(
                            f"fsync of journal {self.path} failed: {covering.error}"
                        ) from covering.error
                    return
                if len(self._flushes) < MAX_FLUSHES:
                    # Lead: this fsync covers every record written whole until now.
                    flush = _Flush(self._written)
                    self._flushes.append(flush)
                    break
                cond.wait()  # for a flush to end; then follow or lead the next
        error: OSError | None = None
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                self._sync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            error = exc
        with cond:
            flush.done, flush.error = True, error
            if error is None:  # it covered every record written before it started
                self._durable = max(self._durable, flush.upto)
            self._flushes.remove(flush)
            cond.notify_all()
        if error is not None:
            raise error

    def append_share(self, client_id: str, body: bytes | bytearray) -> tuple[int, int]:
        """Append one accepted upload durably; return ``(offset, length)`` of ``body`` in
        the file."""
        ref, seq = self.write_share(client_id, body)
        self.commit(seq)
        return ref

    def write_share(self, client_id: str, body: bytes | bytearray) -> tuple[tuple[int, int], int]:
        """Write one upload's record, not yet durable: ``((offset, length) of body, record
        number)``; the upload may be acknowledged only after :meth:`commit` of that number."""
        cid = client_id.encode("utf-8")
        start, seq = self._write(RECORD_SHARE, [_CID.pack(len(cid)), cid, body])
        return (start + _LEN.size + 1 + _CID.size + len(cid), len(body)), seq

    def write_spool(self, client_id: str, ref: SpoolRef) -> int:
        """Write the SPOOL record of a streamed upload whose body ``ref`` names (already
        durable in the spool), not yet durable itself: its record number, to
        :meth:`commit` before the upload is acknowledged."""
        cid = client_id.encode("utf-8")
        name = ref.name.encode("ascii")
        if len(ref.digest) != DIGEST_BYTES:
            raise ValueError(f"a spool digest is {DIGEST_BYTES} bytes")
        parts: list[bytes | bytearray] = [
            _CID.pack(len(cid)),
            cid,
            _CID.pack(len(name)),
            name,
            _SPOOLED.pack(ref.length, ref.digest),
        ]
        _, seq = self._write(RECORD_SPOOL, parts)
        return seq

    def append_spool(self, client_id: str, ref: SpoolRef) -> None:
        """:meth:`write_spool`, then :meth:`commit`."""
        self.commit(self.write_spool(client_id, ref))

    @property
    def spool(self) -> RoundSpool:
        """The round's spool directory (``round-{id}.spool`` beside this file): always the
        same object, so that :meth:`discard` revokes the writers its uploads opened."""
        return self._spool

    def append_end(self, state: str) -> None:
        """Record that the round ended (before the file is deleted)."""
        self._append(RECORD_END, [json.dumps({"state": state}).encode()])

    def append_mark(self, state: str) -> None:
        """Record durably that the round is ``closing`` or ``revealing`` (see the module
        docstring); raises OSError if it could not be made durable."""
        if state not in MARKS:
            raise ValueError(f"mark must be one of {MARKS}, got {state!r}")
        self._append(RECORD_MARK, [json.dumps({"state": state}).encode()])

    def read(self, ref: tuple[int, int]) -> bytes:
        """The body stored at ``ref`` (as returned by :meth:`append_share`)."""
        offset, length = ref
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise OSError(f"journal {self.path} is truncated at offset {offset}")
        return data

    def close(self) -> None:
        """Nothing to close: the journal holds no descriptor between calls (kept so that
        callers written for a journal that did need not change)."""

    def discard(self, *, sync_directory: bool = True) -> None:
        """Delete the round's spool, then the file, once its round has ended (in this
        order: a crash in between leaves a journal whose spool files are gone, never spool
        files nothing references). ``sync_directory=False`` leaves the directory fsync to
        the caller (one for many deletions, at recovery). Raises OSError if the spool
        cannot be deleted whole (the journal goes all the same)."""
        spool_error: OSError | None = None
        try:
            self.spool.discard()
        except OSError as exc:
            spool_error = exc
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        else:
            if self.fsync and sync_directory:
                fsync_directory(self.path.parent)
        if spool_error is not None:
            raise spool_error
