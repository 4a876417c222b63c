"""Durability helpers: a created or deleted file is durable only once its directory is
fsync'd as well (POSIX: the directory entry is separate data). Also the one way private
files (keys, tokens, client secrets) are created and read: mode 0600, exclusively, and
refused once group or others can read them."""

from __future__ import annotations

import os
from pathlib import Path

from mpc_agg.errors import ConfigError


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


def create_private(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data`` durably (mode 0600, exclusively: an existing file or
    link is never overwritten, FileExistsError instead); its directory is not fsync'd."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_private(path: Path, key: str, *, missing: str = "", max_bytes: int = 1 << 16) -> bytes:
    """The first ``max_bytes`` of the private file ``path``. :class:`ConfigError` at
    ``key`` when it is missing (the message ends with ``missing``), unreadable, or
    accessible to group or others (the message says ``chmod 600``)."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(max_bytes)
    except FileNotFoundError:
        raise ConfigError(key, f"{str(path)!r} does not exist{missing}") from None
    except OSError as exc:
        raise ConfigError(key, f"cannot read {str(path)!r}: {exc.strerror}") from None
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(
            key,
            f"{str(path)!r} is accessible to group or others (mode {mode & 0o777:04o}); "
            f"run `chmod 600 {path}`",
        )
    return data
