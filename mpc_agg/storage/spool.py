"""A round's spool: one private file per streamed upload, next to the round's journal.

docs/design.md, "Streamed uploads (large vectors)". A FULL share above the aggregator's
streaming threshold is never held whole: its body is written here block by block as it
arrives (:class:`SpoolWriter`), made durable (file and directory fsync'd, :meth:`seal`), and
only then referenced by a small journal record (:class:`SpoolRef`: file name, length,
XXH3-128 digest). Reading it back (:func:`read_back`) checks the length first and the digest
after the last block, so a damaged file is an error, never a silent wrong sum.

Layout: ``round-{id}.spool/`` beside ``round-{id}.journal`` (mode 0700), holding
``{client}-{16 hex}.body`` files (mode 0600, created exclusively). A file no journal record
references is the remains of an upload cut by a crash: recovery deletes it. The directory
goes with the round (:meth:`RoundSpool.discard`).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from mpc_agg.storage.durable import fsync_directory

SPOOL_SUFFIX = ".spool"
"""A round's spool directory is its journal's path with this suffix instead."""

BODY_SUFFIX = ".body"
DIGEST_BYTES = 16
"""Length of an XXH3-128 digest."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}-[0-9a-f]{16}\.body")


def check_name(name: str) -> str:
    """``name`` if it can be a spool file name (a client id, a dash, 16 hex digits,
    ``.body``: never a path), else ValueError."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"not a spool file name: {name[:80]!r}")
    return name


class SpoolDamaged(OSError):
    """A spool file is missing, of the wrong length, or no longer has its digest."""


@dataclass(frozen=True, repr=False)
class SpoolRef:
    """Where a streamed upload's body lies: ``name`` in the round's spool directory, its
    ``length`` in bytes and its XXH3-128 ``digest`` (that of the whole upload body, what
    :func:`mpc_agg.core.rounds.upload_digest` gives)."""

    name: str
    length: int
    digest: bytes

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.length < 0 or len(self.digest) != DIGEST_BYTES:
            raise ValueError("a spool reference has a length >= 0 and a 16-byte digest")

    def __repr__(self) -> str:
        return f"SpoolRef({self.name!r}, {self.length} bytes)"


class SpoolWriter:
    """One upload body being written to its spool file, in order (one thread at a time).

    :meth:`write` appends; :meth:`seal` makes the file and its directory entry durable and
    returns the :class:`SpoolRef`; :meth:`abandon` deletes the file (idempotent). Raises
    OSError (disk full, I/O error) from :meth:`write` and :meth:`seal`; the caller then
    abandons the file.
    """

    def __init__(self, directory: Path, name: str, *, fsync: bool) -> None:
        self.path = directory / check_name(name)
        self.name = name
        self.fsync = fsync
        self.length = 0
        self._digest = xxhash.xxh3_128()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def __repr__(self) -> str:
        return f"SpoolWriter({self.name!r}, {self.length} bytes)"

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` whole (and fold it into the digest), or raise OSError."""
        if self._fd is None:
            raise OSError(f"spool file {self.path} is closed")
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            step = os.write(self._fd, view[done:])
            if step <= 0:  # pragma: no cover - os.write raises rather than writing nothing
                raise OSError(f"write to spool file {self.path} wrote nothing")
            done += step
        self._digest.update(view)
        self.length += len(view)

    def seal(self) -> SpoolRef:
        """fsync the file, close it, fsync its directory; the reference to journal."""
        if self._fd is None:
            raise OSError(f"spool file {self.path} is closed")
        fd, self._fd = self._fd, None
        try:
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if self.fsync:
            fsync_directory(self.path.parent)
        return SpoolRef(self.name, self.length, self._digest.digest())

    def abandon(self) -> None:
        """Close and delete the file; nothing of the upload remains (errors are ignored:
        a file left behind is deleted at the next recovery, no record referencing it)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.path.unlink()
        except OSError:
            pass


class RoundSpool:
    """The spool directory of one round (see the module docstring). ``fsync``: the
    topology's; ``token`` makes the random part of file names (tests inject one)."""

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        token: Callable[[int], str] = secrets.token_hex,
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self._token = token

    def __repr__(self) -> str:
        return f"RoundSpool({str(self.directory)!r})"

    def create(self) -> None:
        """Make the directory (mode 0700) if it does not exist; the caller fsyncs its
        parent (the round's journal is created next to it, with a directory fsync)."""
        self.directory.mkdir(mode=0o700, exist_ok=True)

    def writer(self, client_id: str) -> SpoolWriter:
        """A new, exclusively created file for one upload of ``client_id``. Raises OSError
        (FileNotFoundError once the round has ended and its spool is gone)."""
        return SpoolWriter(
            self.directory, f"{client_id}-{self._token(8)}{BODY_SUFFIX}", fsync=self.fsync
        )

    def path(self, ref: SpoolRef) -> Path:
        return self.directory / check_name(ref.name)

    def read_back(
        self, ref: SpoolRef, block: int, *, head: int = 0
    ) -> Generator[memoryview, None, None]:
        """:func:`read_back` of the file ``ref`` names."""
        return read_back(self.path(ref), ref, block, head=head)

    def names(self) -> set[str]:
        """The body files in the directory now (none if it does not exist)."""
        try:
            return {p.name for p in self.directory.iterdir() if p.name.endswith(BODY_SUFFIX)}
        except FileNotFoundError:
            return set()

    def remove(self, names: set[str]) -> None:
        """Delete the files ``names`` (those that exist), then fsync the directory once."""
        for name in names:
            try:
                (self.directory / check_name(name)).unlink()
            except FileNotFoundError:
                pass
        if names and self.fsync:
            fsync_directory(self.directory)

    def discard(self) -> None:
        """Delete every file of the spool and the directory itself (the round ended).
        Raises OSError if something remains (e.g. a file created meanwhile)."""
        if not self.directory.exists():
            return
        for entry in self.directory.iterdir():
            try:
                entry.unlink()
            except FileNotFoundError:
                pass
        self.directory.rmdir()


def read_back(
    path: Path, ref: SpoolRef, block: int, *, head: int = 0
) -> Generator[memoryview, None, None]:
    """The bytes of the spool file at ``path`` in order: first ``head`` bytes as one piece
    (if ``head`` > 0), then ``block`` bytes at a time (the last piece shorter). Each piece
    is a view of one reused buffer, valid until the next is asked for.

    Raises :class:`SpoolDamaged` before the first piece if the file is missing or not
    ``ref.length`` bytes long, and after the last one (when the iterator is exhausted) if
    its XXH3-128 digest is not ``ref.digest``: a consumer that reads to the end never
    mistakes a damaged file for a good one. Other OSErrors (I/O) pass through.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1 byte, got {block}")
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SpoolDamaged(f"spool file {path} is missing") from None
    try:
        size = os.fstat(fd).st_size
        if size != ref.length:
            raise SpoolDamaged(f"spool file {path} has {size} bytes, its record says {ref.length}")
        digest = xxhash.xxh3_128()
        buf = bytearray(max(min(block, size), head, 1))
        view = memoryview(buf)
        pos = 0
        first = min(head, size)
        while pos < size:
            n = first if pos == 0 and first else min(block, size - pos)
            got = os.preadv(fd, [view[:n]], pos)
            if got != n:
                raise SpoolDamaged(f"spool file {path} ended at byte {pos + max(got, 0)}")
            piece = view[:n]
            digest.update(piece)
            pos += n
            yield piece
        if digest.digest() != ref.digest:
            raise SpoolDamaged(f"spool file {path} does not have the digest its record holds")
    finally:
        os.close(fd)
