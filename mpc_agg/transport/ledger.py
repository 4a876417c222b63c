"""The privacy ledger on disk: one JSON line per revealed round, appended and fsync'd before
the round's noisy total is revealed, so a restart never resets the spent budget."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mpc_agg.dp.accountant import PrivacyEvent, PrivacyLedger

log = logging.getLogger("mpc_agg.ledger")


class LedgerFile:
    """Append-only file backing a :class:`PrivacyLedger`."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"LedgerFile({str(self.path)!r})"

    def load(self, budget_epsilon: float, budget_delta: float) -> PrivacyLedger:
        """The ledger as recorded; a torn last line (a crash mid-append) is dropped.

        The round it described was never revealed: its noisy total is only opened after
        the line is complete and fsync'd.
        """
        events: list[PrivacyEvent] = []
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            for n, line in enumerate(lines):
                try:
                    if not line.endswith("\n"):
                        raise ValueError("incomplete line")
                    events.append(PrivacyEvent.from_json(line))
                except (ValueError, KeyError, TypeError) as exc:
                    if n != len(lines) - 1:
                        raise ValueError(f"{self.path}, line {n + 1}: {exc}") from None
                    log.warning("%s: dropped a torn last line (%s)", self.path, exc)
                    with open(self.path, "r+b") as f:
                        f.truncate(sum(len(x.encode("utf-8")) for x in lines[:n]))
        return PrivacyLedger(budget_epsilon, budget_delta, events)

    def append(self, event: PrivacyEvent) -> None:
        """Record ``event`` durably."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            data = (event.to_json() + "\n").encode("utf-8")
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {self.path}")
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
