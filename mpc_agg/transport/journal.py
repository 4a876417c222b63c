"""Append-only journal of accepted uploads, one file per round.

DESIGN.md, "Rounds": each accepted share is journaled (append-only, fsync'd) before it is
acknowledged, and a FULL share's bytes are read back from here if its client must be
dropped at agreement time, so memory stays O(d). Record layout (little-endian)::

    u32 length of (type .. payload)   u8 type   payload   u32 CRC-32 of (type .. payload)

Type 1 (share): ``u16 len(client_id) || client_id || upload body``. The CRC lets a later
reader (crash recovery) tell a torn tail from a complete record.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

RECORD_SHARE = 1
_LEN = struct.Struct("<I")
_CRC = struct.Struct("<I")


class RoundJournal:
    """The journal file of one round at one aggregator. Not thread-safe."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)

    def __repr__(self) -> str:
        return f"RoundJournal({str(self.path)!r})"

    def append_share(self, client_id: str, body: bytes) -> tuple[int, int]:
        """Append one accepted upload; return ``(offset, length)`` of ``body`` in the file."""
        cid = client_id.encode("utf-8")
        head = bytes([RECORD_SHARE]) + struct.pack("<H", len(cid)) + cid
        crc = zlib.crc32(body, zlib.crc32(head))
        record_len = len(head) + len(body)
        start = os.lseek(self._fd, 0, os.SEEK_END)  # the true end, even after a failed append
        parts = [_LEN.pack(record_len), head, body, _CRC.pack(crc)]
        written = os.writev(self._fd, parts)
        if written != sum(len(x) for x in parts):
            # A short write leaves a torn record (its CRC tells a reader); refuse the upload.
            raise OSError(f"short write to journal {self.path}: {written} bytes")
        if self.fsync:
            os.fsync(self._fd)
        return start + _LEN.size + len(head), len(body)

    def read(self, ref: tuple[int, int]) -> bytes:
        """The body stored at ``ref`` (as returned by :meth:`append_share`)."""
        offset, length = ref
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise OSError(f"journal {self.path} is truncated at offset {offset}")
        return data

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Close and delete the file, once its round has ended."""
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
