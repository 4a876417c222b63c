"""Every round id an aggregator ever opened, and how each ended: single-use round ids.

docs/design.md, "Durable state". Journals of ended rounds are deleted, so they cannot tell
that an id was used; this index can. One JSON line per event, appended and fsync'd (and the
directory fsync'd when the file is created)::

    {"round": "r1", "state": "open", "dp": true}   once its journal exists ("dp" with DP)
    {"round": "r1", "state": "done"}               once it ended ("failed" likewise)

An id present in any state is never opened again. A torn last line (a crash mid-append) is
dropped on load: the open it described never completed, so its round never existed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mpc_agg.storage.durable import append_line

log = logging.getLogger("mpc_agg.storage")

STATES = ("open", "done", "failed")


class RoundIndex:
    """The append-only index file at ``path``, with its contents in memory."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        self._states: dict[str, str] = {}
        self._dp: set[str] = set()
        self.existed = path.exists()
        """Whether the file was there when this index was loaded (False: a new index)."""
        self._load()

    def __repr__(self) -> str:
        return f"RoundIndex({str(self.path)!r}, {len(self._states)} rounds)"

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        good = 0
        for n, line in enumerate(lines):
            if n == len(lines) - 1:
                if line:  # no newline: torn by a crash
                    log.warning("%s: dropped a torn last line", self.path)
                break
            try:
                record = json.loads(line)
                round_id, state = str(record["round"]), str(record["state"])
                if state not in STATES:
                    raise ValueError(f"unknown state {state!r}")
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{self.path}, line {n + 1}: {exc}") from None
            self._states[round_id] = state
            if record.get("dp"):
                self._dp.add(round_id)
            good += len(line) + 1
        if good != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def state(self, round_id: str) -> str | None:
        """``open``, ``done`` or ``failed`` (the last recorded), or None if never opened."""
        return self._states.get(round_id)

    def __contains__(self, round_id: object) -> bool:
        return round_id in self._states

    def open_ids(self) -> list[str]:
        """Ids recorded as opened and never as ended."""
        return [r for r, s in self._states.items() if s == "open"]

    def revealed_with_dp(self) -> list[str]:
        """Ids of rounds opened with DP that ended ``done``: each must be in the ledger."""
        return [r for r in self._dp if self._states.get(r) == "done"]

    def record(self, round_id: str, state: str, *, dp: bool = False) -> None:
        """Append ``(round_id, state)`` durably (``dp``: the round has DP noise); raises
        OSError and records nothing in memory if the write or fsync fails."""
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        entry: dict[str, object] = {"round": round_id, "state": state}
        if dp:
            entry["dp"] = True
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        append_line(self.path, line, fsync=self.fsync)
        self._states[round_id] = state
        if dp:
            self._dp.add(round_id)

    def record_many(self, events: list[tuple[str, str]]) -> None:
        """Append every ``(round_id, state)`` of ``events`` (ended rounds, no ``dp`` flag)
        in one write and one fsync; raises OSError and records nothing in memory if it
        fails. Recovery ends many rounds at once with it."""
        if not events:
            return
        for _, state in events:
            if state not in STATES:
                raise ValueError(f"state must be one of {STATES}, got {state!r}")
        lines = b"".join(
            (json.dumps({"round": r, "state": s}, sort_keys=True) + "\n").encode()
            for r, s in events
        )
        append_line(self.path, lines, fsync=self.fsync)
        for round_id, state in events:
            self._states[round_id] = state
