"""An aggregator's data directory is bound to one topology: it never silently starts a fresh
privacy ledger, nor spends one under another topology.

docs/design.md, "Durable state"; README, "Running aggregators". On first use a party writes
``TOPOLOGY.json`` into its data directory (``<data_dir>/aggregator-<i>/``): the topology's
fingerprint, its section digests, its name and the party's index. Each start compares the
directory with the topology it is given. The decision is one pure function,
:func:`decide_binding`, over what the directory holds (:class:`DataDirListing`) and the two
operator flags; the I/O (:func:`inspect_data_dir`, :func:`write_marker`) is at the edge.

=================================  =========  ===============  ==========================
the directory holds                no flag    --new-data-dir   --adopt-data-dir
=================================  =========  ===============  ==========================
marker: this topology, this index  use        use              use
marker of another index            refuse     refuse           refuse
marker of another topology         refuse     refuse           rebind (*)
unreadable marker                  refuse     refuse           adopt
no marker; journals/ledger/index   refuse     refuse           adopt
nothing (missing, or only LOCK)    refuse     create           refuse
=================================  =========  ===============  ==========================

``create`` starts a new, empty privacy ledger and round index (logged as a WARNING);
``adopt`` binds state an older version left without a marker, or replaces an unreadable
marker; ``rebind`` moves a directory to a changed topology, keeping its ledger (what was
spent under the old topology counts against the new budget: conservative) and its used
round ids. (*) Not while the directory holds journals of open rounds: their uploads were
made under the old topology. Every change of binding is logged as a WARNING. A file the
directory should not hold counts as state (it is never taken for an empty directory).
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from mpc_agg.errors import StateError
from mpc_agg.storage.durable import fsync_directory

MARKER = "TOPOLOGY.json"
MARKER_FORMAT = "mpc_agg/data-dir-marker/v1"
LOCK = "LOCK"
NEW_FLAG = "--new-data-dir"
ADOPT_FLAG = "--adopt-data-dir"
_NOT_STATE = frozenset({LOCK, MARKER, MARKER + ".tmp"})
_JOURNAL = re.compile(r"round-.*\.journal")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEYS = ("format", "topology", "index", "fingerprint", "sections", "bound_at", "adopted_from")


class DataDirRefused(StateError):
    """The data directory does not belong to this topology and party, or holds nothing
    while no new one was asked for; one line naming the directory and the flag that
    overrides (if any)."""


class MarkerError(ValueError):
    """A marker file that does not decode exactly (wrong format, keys or values)."""


@dataclass(frozen=True)
class Marker:
    """What ``TOPOLOGY.json`` records: the topology a data directory serves.

    ``sections``: the topology's section digests (:func:`~mpc_agg.config.fingerprint.
    section_digests`), so a refusal can name what differs. ``bound_at``: UTC time of the
    binding (ISO 8601; informational). ``adopted_from``: the fingerprint the directory was
    bound to before a rebind, ``"unmarked"`` after an adoption, else None.
    """

    topology: str
    index: int
    fingerprint: str
    sections: Mapping[str, str] = field(compare=False)
    bound_at: str = field(default="", compare=False)
    adopted_from: str | None = field(default=None, compare=False)

    def to_json(self) -> bytes:
        """The file's bytes: one JSON object with sorted keys and a final newline."""
        doc = {
            "format": MARKER_FORMAT,
            "topology": self.topology,
            "index": self.index,
            "fingerprint": self.fingerprint,
            "sections": dict(self.sections),
            "bound_at": self.bound_at,
            "adopted_from": self.adopted_from,
        }
        return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Marker:
        """Decode a marker file exactly; raises :class:`MarkerError`."""
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise MarkerError(f"not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != MARKER_FORMAT:
            raise MarkerError(f"not a marker of format {MARKER_FORMAT}")
        if sorted(doc) != sorted(_KEYS):
            raise MarkerError(f"expected the keys {', '.join(_KEYS)}, got {', '.join(doc)}")
        index, fingerprint, sections = doc["index"], doc["fingerprint"], doc["sections"]
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise MarkerError(f"index: expected an integer >= 0, got {index!r}")
        if not isinstance(fingerprint, str) or not _HEX64.fullmatch(fingerprint):
            raise MarkerError("fingerprint: expected 64 lowercase hex characters")
        if not isinstance(sections, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in sections.items()
        ):
            raise MarkerError("sections: expected a mapping of section names to digests")
        for key in ("topology", "bound_at"):
            if not isinstance(doc[key], str):
                raise MarkerError(f"{key}: expected a string")
        adopted = doc["adopted_from"]
        if adopted is not None and not isinstance(adopted, str):
            raise MarkerError("adopted_from: expected a string or null")
        return cls(doc["topology"], index, fingerprint, sections, doc["bound_at"], adopted)


@dataclass(frozen=True)
class DataDirListing:
    """What a data directory holds, as far as the binding is concerned.

    ``exists``: the directory is there. ``marker``: its decoded marker, or None;
    ``marker_problem``: why a marker file present could not be decoded. ``state``: the
    names of the files that hold (or may hold) state: journals, ``rounds.index``,
    ``privacy-ledger.jsonl``, and anything else not the lock or the marker.
    ``open_journals``: how many of them are journals of open rounds.
    """

    exists: bool
    marker: Marker | None = None
    marker_problem: str | None = None
    state: tuple[str, ...] = ()

    @classmethod
    def of(
        cls, exists: bool, names: Iterable[str], marker_bytes: bytes | None = None
    ) -> DataDirListing:
        """The listing of a directory holding ``names`` with marker file ``marker_bytes``."""
        marker = problem = None
        if marker_bytes is not None:
            try:
                marker = Marker.from_json(marker_bytes)
            except MarkerError as exc:
                problem = str(exc)
        state = tuple(sorted(n for n in names if n not in _NOT_STATE))
        return cls(exists, marker, problem, state)

    @property
    def fresh(self) -> bool:
        """True for a directory that is missing or holds nothing (no marker, no state):
        only ``--new-data-dir`` may use it."""
        return self.marker is None and self.marker_problem is None and not self.state

    @property
    def open_journals(self) -> int:
        """Journals of rounds still open (ended rounds' journals are deleted)."""
        return sum(1 for n in self.state if _JOURNAL.fullmatch(n))


class Action(enum.Enum):
    """What binding a data directory does (the table in the module docstring)."""

    USE = "use"
    CREATE = "create"
    ADOPT = "adopt"
    REBIND = "rebind"


@dataclass(frozen=True)
class Binding:
    """The decision: ``action`` and the ``marker`` the directory holds afterwards (to be
    written unless ``action`` is USE); ``warning`` is what the party must log loudly."""

    action: Action
    marker: Marker
    warning: str | None = None


def _sections_differing(mine: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    names = list(mine) + [n for n in theirs if n not in mine]
    return [n for n in names if mine.get(n) != theirs.get(n)]


def decide_binding(
    listing: DataDirListing,
    expected: Marker,
    *,
    new_data_dir: bool = False,
    adopt_data_dir: bool = False,
    directory: str = "the data directory",
) -> Binding:
    """Whether a party may use a data directory holding ``listing`` for the topology and
    index of ``expected`` (the module docstring's table). Returns the :class:`Binding`;
    raises :class:`DataDirRefused` (one line, naming ``directory``) otherwise. Pure."""
    if new_data_dir and adopt_data_dir:
        raise DataDirRefused(f"{NEW_FLAG} and {ADOPT_FLAG} exclude each other")
    where = f"data directory {directory!r}"
    ours = f"topology {expected.topology!r} {expected.fingerprint}"
    found = listing.marker
    if found is not None:
        if found.index != expected.index:
            raise DataDirRefused(
                f"{where} belongs to aggregator {found.index}, not {expected.index}: another "
                "party's state is never taken over; give this party its own --data-dir"
            )
        if found == expected:
            return Binding(Action.USE, found)
        theirs = f"topology {found.topology!r} {found.fingerprint}"
        differing = ", ".join(_sections_differing(expected.sections, found.sections))
        if not adopt_data_dir:
            raise DataDirRefused(
                f"{where} is bound to {theirs}, not to this {ours} (differing sections: "
                f"{differing or 'unknown'}); start the party with the topology it was bound "
                f"to, or give it another --data-dir; {ADOPT_FLAG} rebinds it, keeping its "
                "privacy ledger and used round ids"
            )
        if listing.open_journals:
            raise DataDirRefused(
                f"{where} holds {listing.open_journals} journal(s) of rounds opened under "
                f"{theirs}; they cannot continue under this {ours}: end them under the old "
                f"topology (or remove them, losing their uploads), then {ADOPT_FLAG}"
            )
        return Binding(
            Action.REBIND,
            replace(expected, adopted_from=found.fingerprint),
            f"REBINDING {where} from {theirs} to this {ours} (differing sections: "
            f"{differing or 'unknown'}): its privacy ledger carries over, so what was spent "
            "under the old topology counts against this topology's budget",
        )
    if listing.marker_problem is not None or listing.state:
        what = (
            f"an unreadable {MARKER} ({listing.marker_problem})"
            if listing.marker_problem is not None
            else f"state but no {MARKER} ({', '.join(listing.state[:4])}"
            + (", ..." if len(listing.state) > 4 else "")
            + ")"
        )
        if not adopt_data_dir:
            raise DataDirRefused(
                f"{where} holds {what}: it was made by an older version, or for another "
                f"topology; if it is this party's own state under this {ours}, {ADOPT_FLAG} "
                "binds it (its privacy ledger and used round ids carry over)"
            )
        return Binding(
            Action.ADOPT,
            replace(expected, adopted_from="unmarked"),
            f"ADOPTING {where}, which holds {what}, for this {ours}: its privacy ledger and "
            "used round ids carry over",
        )
    if adopt_data_dir:
        raise DataDirRefused(
            f"{where} {'is empty' if listing.exists else 'does not exist'}: there is nothing "
            f"to adopt (is it the right directory?); {NEW_FLAG} starts a new one"
        )
    if not new_data_dir:
        raise DataDirRefused(
            f"{where} {'is empty' if listing.exists else 'does not exist'}; a party never "
            "silently starts a fresh privacy ledger: check the path (a relative data_dir "
            f"resolves against the topology file's directory), or pass {NEW_FLAG} to start "
            "a new one"
        )
    return Binding(
        Action.CREATE,
        expected,
        f"NEW {where} for this {ours}: a new, empty privacy ledger and round index start "
        "here; no spending before this moment is known to this party",
    )


# --------------------------------------------------------------------------- I/O at the edge


def inspect_data_dir(directory: Path) -> DataDirListing:
    """What ``directory`` holds (creates nothing). Raises OSError if it cannot be read."""
    if not directory.exists():
        return DataDirListing(exists=False)
    names = [p.name for p in directory.iterdir()]
    marker = directory / MARKER
    return DataDirListing.of(True, names, marker.read_bytes() if MARKER in names else None)


def write_marker(directory: Path, marker: Marker) -> None:
    """Write ``directory/TOPOLOGY.json`` durably: a temporary file, fsync'd, renamed over
    the marker, then the directory fsync'd (a crash leaves the old marker or the new)."""
    tmp = directory / (MARKER + ".tmp")
    # A stale temporary file (a crash) is removed, not reopened: the new one is created
    # exclusively, so a link left in its place is never followed.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        data = marker.to_json()
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {tmp}")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / MARKER)
    fsync_directory(directory)
