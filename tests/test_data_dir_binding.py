"""A data directory bound to one topology (mpc_agg/storage/binding.py): the decision table,
every (directory, flag) pair, the marker's exact codec and its durable write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpc_agg.errors import StateError
from mpc_agg.storage.binding import (
    MARKER,
    MARKER_FORMAT,
    Action,
    DataDirListing,
    DataDirRefused,
    Marker,
    MarkerError,
    decide_binding,
    inspect_data_dir,
    write_marker,
)

SECTIONS = {"format": "a" * 64, "aggregators": "b" * 64, "dp": "c" * 64}
OURS = Marker("t", 1, "1" * 64, SECTIONS, "2030-01-01T00:00:00+00:00")
OTHER_SECTIONS = {**SECTIONS, "dp": "d" * 64}
THEIRS = Marker("t", 1, "2" * 64, OTHER_SECTIONS, "2029-01-01T00:00:00+00:00")
OTHER_INDEX = Marker("t", 2, "1" * 64, SECTIONS)

LISTINGS = {
    "missing": DataDirListing(exists=False),
    "empty": DataDirListing.of(True, []),
    "lock only": DataDirListing.of(True, ["LOCK"]),
    "ours": DataDirListing.of(True, ["LOCK", MARKER, "rounds.index"], OURS.to_json()),
    "another index": DataDirListing.of(True, [MARKER], OTHER_INDEX.to_json()),
    "another topology": DataDirListing.of(True, [MARKER, "rounds.index"], THEIRS.to_json()),
    "another topology, open round": DataDirListing.of(
        True, [MARKER, "rounds.index", "round-r1.journal"], THEIRS.to_json()
    ),
    "unreadable marker": DataDirListing.of(True, [MARKER], b"{not json"),
    "unmarked ledger": DataDirListing.of(True, ["LOCK", "privacy-ledger.jsonl", "rounds.index"]),
    "unmarked journal": DataDirListing.of(True, ["round-r1.journal"]),
    "unknown file": DataDirListing.of(True, ["notes.txt"]),
}
FLAGS = {
    "none": {},
    "new": {"new_data_dir": True},
    "adopt": {"adopt_data_dir": True},
}
# The module docstring's table: an Action, or the words the refusal must contain.
TABLE: dict[tuple[str, str], Action | str] = {
    ("missing", "none"): "--new-data-dir",
    ("missing", "new"): Action.CREATE,
    ("missing", "adopt"): "nothing to adopt",
    ("empty", "none"): "never silently starts a fresh privacy ledger",
    ("empty", "new"): Action.CREATE,
    ("empty", "adopt"): "nothing to adopt",
    ("lock only", "none"): "--new-data-dir",
    ("lock only", "new"): Action.CREATE,
    ("lock only", "adopt"): "nothing to adopt",
    ("ours", "none"): Action.USE,
    ("ours", "new"): Action.USE,
    ("ours", "adopt"): Action.USE,
    ("another index", "none"): "belongs to aggregator 2, not 1",
    ("another index", "new"): "belongs to aggregator 2, not 1",
    ("another index", "adopt"): "belongs to aggregator 2, not 1",
    ("another topology", "none"): "--adopt-data-dir",
    ("another topology", "new"): "--adopt-data-dir",
    ("another topology", "adopt"): Action.REBIND,
    ("another topology, open round", "none"): "--adopt-data-dir",
    ("another topology, open round", "new"): "--adopt-data-dir",
    ("another topology, open round", "adopt"): "1 journal(s) of rounds opened under",
    ("unreadable marker", "none"): "unreadable",
    ("unreadable marker", "new"): "unreadable",
    ("unreadable marker", "adopt"): Action.ADOPT,
    ("unmarked ledger", "none"): "privacy-ledger.jsonl, rounds.index",
    ("unmarked ledger", "new"): "--adopt-data-dir",
    ("unmarked ledger", "adopt"): Action.ADOPT,
    ("unmarked journal", "none"): "--adopt-data-dir",
    ("unmarked journal", "new"): "--adopt-data-dir",
    ("unmarked journal", "adopt"): Action.ADOPT,
    ("unknown file", "none"): "notes.txt",
    ("unknown file", "new"): "--adopt-data-dir",
    ("unknown file", "adopt"): Action.ADOPT,
}


def test_the_table_covers_every_pair():
    assert set(TABLE) == {(listing, flag) for listing in LISTINGS for flag in FLAGS}


@pytest.mark.parametrize(("listing", "flag"), sorted(TABLE))
def test_decision(listing: str, flag: str):
    expected = TABLE[(listing, flag)]
    decide = lambda: decide_binding(  # noqa: E731
        LISTINGS[listing], OURS, directory="/d/aggregator-1", **FLAGS[flag]
    )
    if isinstance(expected, str):
        with pytest.raises(DataDirRefused) as refused:
            decide()
        text = str(refused.value)
        assert expected in text and "/d/aggregator-1" in text and "\n" not in text
        assert isinstance(refused.value, StateError)  # the party's exit status 3
        return
    binding = decide()
    assert binding.action is expected
    assert binding.marker == OURS and binding.marker.sections == SECTIONS
    if expected is Action.USE:
        assert binding.warning is None
    else:
        assert binding.warning is not None and "\n" not in binding.warning


def test_a_refused_rebind_names_both_fingerprints_and_the_differing_sections():
    with pytest.raises(DataDirRefused) as refused:
        decide_binding(LISTINGS["another topology"], OURS)
    text = str(refused.value)
    assert "1" * 64 in text and "2" * 64 in text
    assert "differing sections: dp)" in text


def test_warnings_say_what_happens_to_the_ledger():
    create = decide_binding(LISTINGS["missing"], OURS, new_data_dir=True)
    assert "new, empty privacy ledger" in str(create.warning)
    assert create.marker.adopted_from is None
    rebind = decide_binding(LISTINGS["another topology"], OURS, adopt_data_dir=True)
    assert "carries over" in str(rebind.warning) and "dp" in str(rebind.warning)
    assert rebind.marker.adopted_from == THEIRS.fingerprint
    adopt = decide_binding(LISTINGS["unmarked ledger"], OURS, adopt_data_dir=True)
    assert "carry over" in str(adopt.warning) and adopt.marker.adopted_from == "unmarked"


def test_both_flags_at_once_are_refused():
    with pytest.raises(DataDirRefused, match="exclude each other"):
        decide_binding(LISTINGS["ours"], OURS, new_data_dir=True, adopt_data_dir=True)


def test_the_marker_round_trips_exactly():
    marker = Marker("t", 1, "1" * 64, SECTIONS, "2030-01-01T00:00:00+00:00", "unmarked")
    data = marker.to_json()
    again = Marker.from_json(data)
    assert again == marker
    assert (again.sections, again.bound_at, again.adopted_from) == (
        SECTIONS,
        marker.bound_at,
        "unmarked",
    )
    assert again.to_json() == data
    assert json.loads(data)["format"] == MARKER_FORMAT and data.endswith(b"\n")


def _doc(**change: object) -> bytes:
    doc = json.loads(OURS.to_json())
    doc.update(change)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\xff", "not JSON"),
        (b"[]", "not a marker"),
        (_doc(format="mpc_agg/data-dir-marker/v0"), "not a marker"),
        (_doc(extra=1), "expected the keys"),
        (_doc(index=True), "index"),
        (_doc(index=-1), "index"),
        (_doc(fingerprint="ABC"), "fingerprint"),
        (_doc(fingerprint="A" * 64), "fingerprint"),
        (_doc(sections=["x"]), "sections"),
        (_doc(sections={"dp": 1}), "sections"),
        (_doc(topology=3), "topology"),
        (_doc(adopted_from=5), "adopted_from"),
    ],
)
def test_a_malformed_marker_is_refused(data: bytes, words: str):
    with pytest.raises(MarkerError, match=words):
        Marker.from_json(data)


def test_inspect_creates_nothing_and_write_marker_replaces_durably(tmp_path: Path):
    directory = tmp_path / "aggregator-1"
    assert inspect_data_dir(directory) == DataDirListing(exists=False)
    assert not directory.exists()
    directory.mkdir()
    (directory / "LOCK").touch()
    (directory / "rounds.index").write_text("")
    write_marker(directory, THEIRS)
    write_marker(directory, OURS)  # replaces it
    listing = inspect_data_dir(directory)
    assert listing.marker == OURS and listing.state == ("rounds.index",)
    assert sorted(p.name for p in directory.iterdir()) == ["LOCK", MARKER, "rounds.index"]


def test_fresh_is_what_only_new_data_dir_may_use():
    fresh = {name for name, listing in LISTINGS.items() if listing.fresh}
    assert fresh == {"missing", "empty", "lock only"}
    assert fresh == {name for name in LISTINGS if TABLE[(name, "new")] is Action.CREATE}
