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
