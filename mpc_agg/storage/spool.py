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
goes with the round (:meth:`RoundSpool.discard`), also under a writer still open: one
:class:`RoundSpool` object per round knows its open writers, revokes them when it is
discarded and opens no new one afterwards. A writer reserves its upload's length on disk
when it is opened (``posix_fallocate``), so a full disk is found before the body is read.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import threading
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


class SpoolDiscarded(OSError):
    """The spool was discarded (its round ended): no file is opened or written in it."""


_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS})
"""``posix_fallocate`` errors meaning the file system cannot reserve space ahead: the
reservation is skipped (the writes then find a full disk themselves)."""


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

    :meth:`reserve` allocates the body's length on disk; :meth:`write` appends; :meth:`seal`
    makes the file and its directory entry durable and returns the :class:`SpoolRef`;
    :meth:`abandon` deletes the file (idempotent). Raises OSError (disk full, I/O error;
    :class:`SpoolDiscarded` once :meth:`revoke` was called) from :meth:`reserve`,
    :meth:`write` and :meth:`seal`; the caller then abandons the file. ``on_done`` is
    called once the file is sealed or abandoned (its spool stops tracking it).
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        *,
        fsync: bool,
        on_done: Callable[[SpoolWriter], None] | None = None,
    ) -> None:
        self.path = directory / check_name(name)
        self.name = name
        self.fsync = fsync
        self.length = 0
        self._reserved = 0
        self._revoked = False
        self._on_done = on_done
        self._digest = xxhash.xxh3_128()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def __repr__(self) -> str:
        return f"SpoolWriter({self.name!r}, {self.length} bytes)"

    def _open_fd(self) -> int:
        if self._revoked:
            raise SpoolDiscarded(f"spool file {self.path} was discarded with its round")
        if self._fd is None:
            raise OSError(f"spool file {self.path} is closed")
        return self._fd

    def reserve(self, length: int) -> None:
        """Allocate ``length`` bytes (the whole upload body) on disk before anything is
        written, so a full disk is an error now (ENOSPC), not after most of the body was
        received. A file system that cannot reserve space ahead skips it. Raises OSError."""
        fd = self._open_fd()
        if length <= 0:
            return
        try:
            os.posix_fallocate(fd, 0, length)
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE:
                raise
            return
        self._reserved = length

    def revoke(self) -> None:
        """The spool is being discarded under this writer (its round ended): every later
        :meth:`reserve`, :meth:`write` or :meth:`seal` raises :class:`SpoolDiscarded`. The
        descriptor is closed by the writer's owner (:meth:`abandon`), never from another
        thread while a write may be using it."""
        self._revoked = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` whole (and fold it into the digest), or raise OSError."""
        fd = self._open_fd()
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            step = os.write(fd, view[done:])
            if step <= 0:  # pragma: no cover - os.write raises rather than writing nothing
                raise OSError(f"write to spool file {self.path} wrote nothing")
            done += step
        self._digest.update(view)
        self.length += len(view)

    def seal(self) -> SpoolRef:
        """fsync the file, close it, fsync its directory; the reference to journal. A file
        reserved longer than what was written is cut to its length first."""
        fd = self._open_fd()
        self._fd = None
        try:
            if self._reserved > self.length:
                os.ftruncate(fd, self.length)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
            self._done()
        if self.fsync:
            fsync_directory(self.path.parent)
        if self._revoked:  # discarded while it was being sealed: the file is gone
            raise SpoolDiscarded(f"spool file {self.path} was discarded with its round")
        return SpoolRef(self.name, self.length, self._digest.digest())

    def _done(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(self)

    def abandon(self) -> None:
        """Close and delete the file; nothing of the upload remains (errors are ignored:
        a file left behind is deleted at the next recovery, no record referencing it)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass
        self._done()
        try:
            self.path.unlink()
        except OSError:
            pass


class RoundSpool:
    """The spool directory of one round (see the module docstring). ``fsync``: the
    topology's; ``token`` makes the random part of file names (tests inject one).

    The writers opened through one object are tracked, so :meth:`discard` can revoke them;
    a round's uploads and its end must therefore use the same object (its journal's,
    :attr:`mpc_agg.storage.journal.RoundJournal.spool`). Thread-safe."""

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
        self._lock = threading.Lock()
        self._writers: set[SpoolWriter] = set()
        self._discarded = False

    def __repr__(self) -> str:
        return f"RoundSpool({str(self.directory)!r})"

    def create(self) -> None:
        """Make the directory (mode 0700) if it does not exist; the caller fsyncs its
        parent (the round's journal is created next to it, with a directory fsync)."""
        self.directory.mkdir(mode=0o700, exist_ok=True)

    def writer(self, client_id: str, length: int = 0) -> SpoolWriter:
        """A new, exclusively created file for one upload of ``client_id``, with ``length``
        bytes (the whole body, if known) reserved on disk (:meth:`SpoolWriter.reserve`).
        Raises OSError: :class:`SpoolDiscarded` once this spool was discarded,
        FileNotFoundError if its directory is gone, ENOSPC if the length does not fit (the
        file is then deleted)."""
        with self._lock:  # a file is never created once discard has begun
            if self._discarded:
                raise SpoolDiscarded(f"spool {self.directory} was discarded with its round")
            writer = SpoolWriter(
                self.directory,
                f"{client_id}-{self._token(8)}{BODY_SUFFIX}",
                fsync=self.fsync,
                on_done=self._forget,
            )
            self._writers.add(writer)
        try:
            writer.reserve(length)  # outside the lock: it may take a while
        except BaseException:
            writer.abandon()
            raise
        return writer

    def _forget(self, writer: SpoolWriter) -> None:
        with self._lock:
            self._writers.discard(writer)

    @property
    def open_writers(self) -> int:
        """Writers opened here and neither sealed nor abandoned yet."""
        with self._lock:
            return len(self._writers)

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
        """Delete every file of the spool and the directory itself (the round ended). No
        writer opens here afterwards, and writers still open are revoked (their next
        write fails; their owners close them). Raises OSError if something remains."""
        with self._lock:
            self._discarded = True
            writers, self._writers = self._writers, set()
        for writer in writers:
            writer.revoke()
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
