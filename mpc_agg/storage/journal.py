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

A record is valid only if it is complete and its checksum matches (XXH3-64 rather than
CRC-32: it runs at memory speed, 20x faster than zlib's CRC-32 here, and detects torn or
garbled tails at least as well): :func:`read_journal` stops at
the first invalid record (a torn tail left by a crash) and reports where, so the caller can
truncate the file there and log what was dropped.
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

RECORD_OPEN = 1
RECORD_SHARE = 2
RECORD_END = 3
RECORD_MARK = 4
MARKS = ("closing", "revealing")
_LEN = struct.Struct("<I")
_CHECK = struct.Struct("<Q")
_CID = struct.Struct("<H")
MAX_RECORD = 1 << 31


@dataclass(frozen=True, repr=False)
class JournalShare:
    """A SHARE record: the client and where its upload body lies in the file (the body is
    read back one record at a time with :meth:`RoundJournal.read`, so recovering a round
    costs O(d) memory, not O(clients x d))."""

    client_id: str
    ref: tuple[int, int]

    def __repr__(self) -> str:
        return f"JournalShare({self.client_id!r}, {self.ref[1]} bytes)"


@dataclass(frozen=True)
class JournalContents:
    """What :func:`read_journal` found: the OPEN header, shares in order, the END state if
    any, the length of the valid prefix, why reading stopped early (None if clean), and
    the last MARK (None if none)."""

    header: dict[str, Any]
    shares: list[JournalShare]
    end_state: str | None
    valid_bytes: int
    torn: str | None
    mark: str | None = None


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
            torn = f"checksum mismatch in the record at byte {pos}"
            break
        rtype, payload = record[0], record[1:]
        if header is None:
            if rtype != RECORD_OPEN:
                raise ValueError("journal does not start with an OPEN record")
            header = json.loads(bytes(payload))
        elif rtype == RECORD_SHARE:
            (n,) = _CID.unpack_from(payload)
            cid = bytes(payload[_CID.size : _CID.size + n]).decode("utf-8")
            body_start = pos + _LEN.size + 1 + _CID.size + n
            shares.append(JournalShare(cid, (body_start, length - 1 - _CID.size - n)))
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
    return JournalContents(header, shares, end_state, pos, torn, mark)


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


class RoundJournal:
    """The journal file of one round at one aggregator.

    It holds no file descriptor between calls: each append (and each read) opens the file,
    does its work and closes it again, so open rounds cost no descriptors (an aggregator
    may hold ``rounds.max_open`` of them, and recover as many after a restart). An append
    never creates the file: once the round has ended and its journal is deleted, a late
    append fails instead of leaving a stray journal behind.

    Appends may come from several ingest threads: each record is written whole under a
    lock; the fsync that follows runs outside it (an fsync makes every earlier write of the
    file durable, whichever descriptor wrote it, so concurrent uploads share the disk's
    flushes). The 201 of an upload still comes only after its own record's fsync.
    """

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RoundJournal({str(self.path)!r})"

    @classmethod
    def create(cls, path: Path, header: dict[str, Any], *, fsync: bool = True) -> RoundJournal:
        """A new journal whose first record is OPEN with ``header``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        journal = cls(path, fsync=fsync)
        try:
            journal._append(RECORD_OPEN, [json.dumps(header, sort_keys=True).encode()])
            if fsync:
                fsync_directory(path.parent)  # the file itself survives a crash
        except OSError:
            journal.discard()  # an open that fails leaves no journal behind
            raise
        return journal

    @classmethod
    def recover(cls, path: Path, *, fsync: bool = True) -> tuple[RoundJournal, JournalContents]:
        """Open an existing journal, truncating a torn tail; return it and its contents."""
        fd = os.open(path, os.O_RDONLY)
        try:
            contents = scan_journal(lambda offset, n: os.pread(fd, n, offset), os.fstat(fd).st_size)
        finally:
            os.close(fd)
        if contents.torn is not None:
            os.truncate(path, contents.valid_bytes)
        return cls(path, fsync=fsync), contents

    def _append(self, rtype: int, payload_parts: list[bytes | bytearray]) -> int:
        """Append one record; return the file offset of its payload."""
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
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return start + _LEN.size + 1

    def append_share(self, client_id: str, body: bytes | bytearray) -> tuple[int, int]:
        """Append one accepted upload; return ``(offset, length)`` of ``body`` in the file."""
        cid = client_id.encode("utf-8")
        payload_at = self._append(RECORD_SHARE, [_CID.pack(len(cid)), cid, body])
        return payload_at + _CID.size + len(cid), len(body)

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
        """Delete the file, once its round has ended. ``sync_directory=False`` leaves the
        directory fsync to the caller (one for many deletions, at recovery)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        if self.fsync and sync_directory:
            fsync_directory(self.path.parent)
