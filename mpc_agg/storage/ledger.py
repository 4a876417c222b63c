"""The privacy ledger on disk: one JSON line per release attempt, appended and fsync'd before
the round's noise is drawn, so a restart never resets the spent budget (docs/design.md,
"Durable state")."""

from __future__ import annotations

import logging
from pathlib import Path

from mpc_agg.dp.accountant import PrivacyEvent, PrivacyLedger
from mpc_agg.storage.durable import append_line

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
        """Record ``event`` durably, or raise OSError leaving the file as it was.

        A partial line (short write, failed fsync) is cut off again, so a later line is never
        glued to it (a reader would drop the pair as one torn line, losing a real charge); a
        file that does not end in a newline is refused rather than appended to. Creating
        the file also fsyncs its directory, so the ledger cannot vanish with a power loss.
        """
        append_line(self.path, (event.to_json() + "\n").encode("utf-8"), fsync=self.fsync)
