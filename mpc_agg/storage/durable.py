"""Durability helpers: a created or deleted file is durable only once its directory is
fsync'd as well (POSIX: the directory entry is separate data)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """fsync the directory ``path`` (its entries: files created, renamed or deleted)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: Path, line: bytes, *, fsync: bool = True) -> None:
    """Append one complete line (ending in a newline) to the file at ``path`` durably, or
    raise OSError leaving the file as it was.

    A partial write (short write, failed fsync) is cut off again, so a later line is never
    glued to a torn one (a reader drops a torn last line); a file that does not end in a
    newline is refused rather than appended to. Creating the file also fsyncs its directory.
    """
    if not line.endswith(b"\n"):
        raise ValueError("a line must end with a newline")
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        if start and os.pread(fd, 1, start - 1) != b"\n":
            raise OSError(f"{path} does not end with a complete line; not appending")
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
            if fsync:
                os.fsync(fd)
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)
    if created and fsync:
        fsync_directory(path.parent)
