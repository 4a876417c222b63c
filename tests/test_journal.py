"""The round journal: records written, scanned back one at a time, torn tails cut."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mpc_agg.storage.journal import RoundJournal, read_journal

HEADER = {"round": "r", "dim": 3, "min_clients": 2}


def write(path: Path, bodies: dict[str, bytes]) -> dict[str, tuple[int, int]]:
    journal = RoundJournal.create(path, HEADER, fsync=False)
    refs = {cid: journal.append_share(cid, body) for cid, body in bodies.items()}
    journal.close()
    return refs


def test_recover_lists_every_share_and_reads_each_body_back(tmp_path: Path) -> None:
    path = tmp_path / "round-r.journal"
    bodies = {"alice": b"A" * 100, "bob": bytearray(b"B" * 7), "carol": b""}
    refs = write(path, bodies)
    journal, contents = RoundJournal.recover(path, fsync=False)
    assert contents.header == HEADER and contents.torn is None and contents.end_state is None
    assert contents.valid_bytes == path.stat().st_size
    assert [(s.client_id, s.ref) for s in contents.shares] == list(refs.items())
    assert {s.client_id: journal.read(s.ref) for s in contents.shares} == {
        k: bytes(v) for k, v in bodies.items()
    }
    assert read_journal(path.read_bytes()) == contents  # the in-memory parser agrees
    journal.close()


@pytest.mark.parametrize("cut", [1, 8, 20])
def test_a_torn_tail_is_reported_and_truncated(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "round-r.journal"
    write(path, {"alice": b"A" * 50, "bob": b"B" * 50})
    size = path.stat().st_size
    os.truncate(path, size - cut)
    journal, contents = RoundJournal.recover(path, fsync=False)
    journal.close()
    assert [s.client_id for s in contents.shares] == ["alice"]
    assert contents.torn is not None and "record" in contents.torn
    assert path.stat().st_size == contents.valid_bytes < size - cut


def test_a_flipped_byte_stops_the_scan_at_its_record(tmp_path: Path) -> None:
    path = tmp_path / "round-r.journal"
    refs = write(path, {"alice": b"A" * 50, "bob": b"B" * 50, "carol": b"C" * 50})
    data = bytearray(path.read_bytes())
    data[refs["bob"][0] + 10] ^= 0x01
    path.write_bytes(bytes(data))
    journal, contents = RoundJournal.recover(path, fsync=False)
    journal.close()
    assert [s.client_id for s in contents.shares] == ["alice"]
    assert "checksum mismatch" in (contents.torn or "")


def test_a_journal_without_a_valid_open_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "round-r.journal"
    path.write_bytes(b"\x05\x00\x00\x00garbage-garbage")
    with pytest.raises(ValueError, match="no valid OPEN record"):
        RoundJournal.recover(path, fsync=False)
