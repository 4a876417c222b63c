"""The round journal: records written, scanned back one at a time, torn tails cut."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from mpc_agg.storage.journal import RECORD_SHARE, RoundJournal, read_journal

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


def test_a_flipped_byte_in_the_middle_is_corruption_not_a_torn_tail(tmp_path: Path) -> None:
    # Whole records follow the damaged one (pages lost after a failed fsync, a bad disk):
    # cutting there would drop them, acknowledged ones included. The journal is reported
    # corrupt (the round must fail) and nothing is truncated.
    path = tmp_path / "round-r.journal"
    refs = write(path, {"alice": b"A" * 50, "bob": b"B" * 50, "carol": b"C" * 50})
    data = bytearray(path.read_bytes())
    data[refs["bob"][0] + 10] ^= 0x01
    path.write_bytes(bytes(data))
    journal, contents = RoundJournal.recover(path, fsync=False)
    journal.close()
    assert [s.client_id for s in contents.shares] == ["alice"]
    assert contents.torn is None
    assert "checksum mismatch" in (contents.corrupt or "")
    assert "whole records after it" in (contents.corrupt or "")
    assert path.read_bytes() == bytes(data)


def test_a_flipped_byte_in_the_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "round-r.journal"
    refs = write(path, {"alice": b"A" * 50, "bob": b"B" * 50})
    data = bytearray(path.read_bytes())
    data[refs["bob"][0] + 10] ^= 0x01
    path.write_bytes(bytes(data))
    journal, contents = RoundJournal.recover(path, fsync=False)
    journal.close()
    assert [s.client_id for s in contents.shares] == ["alice"]
    assert "checksum mismatch" in (contents.torn or "") and contents.corrupt is None


def test_a_journal_without_a_valid_open_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "round-r.journal"
    path.write_bytes(b"\x05\x00\x00\x00garbage-garbage")
    with pytest.raises(ValueError, match="no valid OPEN record"):
        RoundJournal.recover(path, fsync=False)


class RecordingSync:
    """An fsync that records, per call, the file size when it started (every record
    written whole by then is covered) and whether it has returned; slow enough that
    concurrent appends pile up behind it. ``fail_next``: the next call raises EIO."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.calls: list[dict[str, int | bool]] = []
        self.fail_next = False

    def __call__(self, fd: int) -> None:
        call = {"covers": os.fstat(fd).st_size, "done": False}
        with self.lock:
            self.calls.append(call)
            fail, self.fail_next = self.fail_next, False
        time.sleep(self.seconds)
        os.fsync(fd)
        if fail:
            raise OSError(5, "Input/output error")
        with self.lock:
            call["done"] = True

    def covered(self, end: int) -> bool:
        """True if an fsync that started once ``end`` bytes were written has returned."""
        with self.lock:
            return any(c["done"] and int(c["covers"]) >= end for c in self.calls)


def test_concurrent_appends_share_fsyncs_and_none_is_acknowledged_before_its_own(
    tmp_path: Path,
) -> None:
    """Group commit: N appends at once are each acknowledged only after an fsync that
    started after their record was written whole has returned, with fewer fsyncs than
    appends."""
    sync = RecordingSync()
    path = tmp_path / "r.journal"
    journal = RoundJournal.create(path, HEADER, fsync=True, sync=sync)
    opened = len(sync.calls)
    n = 16
    start = threading.Barrier(n)
    acked: dict[str, tuple[tuple[int, int], bool]] = {}
    errors: list[BaseException] = []

    def append(i: int) -> None:
        try:
            start.wait()
            ref = journal.append_share(f"c{i}", bytes([i]) * 1000)
            # The record ends after the body and its 8-byte checksum.
            acked[f"c{i}"] = (ref, sync.covered(ref[0] + ref[1] + 8))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(acked) == n
    assert all(covered for _, covered in acked.values()), acked
    appends_fsyncs = len(sync.calls) - opened
    assert 1 <= appends_fsyncs < n
    _, contents = RoundJournal.recover(path, fsync=False)
    assert sorted(s.client_id for s in contents.shares) == sorted(acked)


def test_a_failed_fsync_fails_every_append_it_covered_and_a_later_one_syncs_again(
    tmp_path: Path,
) -> None:
    sync = RecordingSync(seconds=0.0)
    journal = RoundJournal.create(tmp_path / "r.journal", HEADER, fsync=True, sync=sync)
    sync.fail_next = True
    with pytest.raises(OSError, match="Input/output error"):
        journal.append_share("c1", b"x" * 10)
    calls = len(sync.calls)
    ref = journal.append_share("c2", b"y" * 10)
    assert len(sync.calls) == calls + 1  # not taken for durable by the failed fsync
    assert sync.covered(ref[0] + ref[1] + 8)


def test_without_fsync_no_sync_is_called(tmp_path: Path) -> None:
    sync = RecordingSync(seconds=0.0)
    journal = RoundJournal.create(tmp_path / "r.journal", HEADER, fsync=False, sync=sync)
    journal.append_share("c1", b"x")
    assert sync.calls == []


def test_a_whole_record_that_does_not_parse_is_corrupt_not_a_torn_tail(tmp_path: Path) -> None:
    """A SHARE record whose checksum is valid but whose client id is not UTF-8 was written
    so: the scan reports the journal corrupt and goes on past it, and recovery truncates
    nothing (the records acknowledged after it stay)."""
    path = tmp_path / "round-r.journal"
    journal = RoundJournal.create(path, HEADER, fsync=False)
    journal.append_share("alice", b"A" * 10)
    cid = b"\xff\xfe"
    journal._append(RECORD_SHARE, [len(cid).to_bytes(2, "little"), cid, b"x"])  # noqa: SLF001
    journal.append_share("bob", b"B" * 10)
    size = path.stat().st_size
    _, contents = RoundJournal.recover(path, fsync=False)
    assert contents.torn is None
    assert contents.corrupt is not None and "malformed share record at byte" in contents.corrupt
    assert [s.client_id for s in contents.shares] == ["alice", "bob"]
    assert path.stat().st_size == size == contents.valid_bytes
