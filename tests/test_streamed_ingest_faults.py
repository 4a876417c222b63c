"""Fail-closed and liveness faults of ingest at the aggregator (docs/design.md, "Streamed
uploads"), with faults injected: a journal commit that fails after its record was written
(every upload path), an upload still arriving when its round closes or ends, seats taken
while a stream arrives, a full disk found by reserving a body's length before it is read,
the blocking API in large rounds, and sum additions off the ingest threads."""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpc_agg import Client
from mpc_agg.aggregator import Aggregator
from mpc_agg.aggregator.ingest import INGEST_THREADS
from mpc_agg.core.accumulator import Accumulator
from mpc_agg.core.ring import GF_P61, Z2_32
from mpc_agg.core.rounds import RoundState, upload_digest
from mpc_agg.core.sharing import full_share_index
from mpc_agg.errors import MalformedUpload, RoundFull, RoundNotOpen, StorageFailure
from mpc_agg.storage.journal import RoundJournal
from mpc_agg.storage.spool import RoundSpool, SpoolDiscarded, SpoolRef, SpoolWriter

from .test_streamed_ingest import (
    Body,
    _journal_shares,
    close_all,
    federation,
    full_client,
    large_round,
    nothing_changed,
    run,
    run_round,
    spool_files,
    topology,
    total_of,
    units,
    upload,
)

LARGE = {"stream_above": 0, "stream_block": 8 * 128}


def seed_client(index: int, skip: int = 0) -> str:
    """A client id whose share at aggregator ``index`` is a seed share."""
    found = [c for c in (f"s{k}" for k in range(200)) if full_share_index(c, 3) != index]
    return found[skip]


def fail_next_fsync(journal: RoundJournal) -> None:
    """The journal's next fsync raises EIO (after its record was written whole)."""
    real = journal._sync  # noqa: SLF001
    armed = {"on": True}

    def sync(fd: int) -> None:
        if armed["on"]:
            armed["on"] = False
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    journal._sync = sync  # noqa: SLF001


# ------------------------------------------------------------- 1. a commit that fails

PATHS = {
    # name: (large round, client whose share goes to aggregator 0, send to aggregator 0)
    "whole": (False, "k-whole", "async"),
    "whole-sync": (False, "k-sync", "sync"),
    "seed": (True, seed_client(0), "async"),
    "seed-sync": (True, seed_client(0, 1), "sync"),
    "stream": (True, full_client(0), "stream"),
    "full-sync": (True, full_client(0, skip=1), "sync"),
}


async def send(agg: Aggregator, how: str, cid: str, body: bytes | bytearray) -> bool:
    if how == "sync":
        return agg.receive_share("r", cid, body)
    if how == "stream":
        return await agg.receive_stream_async("r", cid, Body(body))
    return await agg.receive_share_async("r", cid, body)


async def open_federation(tmp: Path, large: bool, d: int) -> list[Aggregator]:
    aggs = federation(topology(tmp, fsync=True), **(LARGE if large else {}))
    for a in aggs:
        a.open_round("r", d)
        assert a.store.streamed(d, GF_P61) is large
    return aggs


async def upload_all(aggs: list[Aggregator], cid: str, bodies: list[Any]) -> None:
    for i, body in enumerate(bodies):
        assert await upload(aggs[i], "r", cid, body) is True


async def refused_after_written(aggs: list[Aggregator], path: str, x: np.ndarray) -> list[Any]:
    """Aggregator 0's journal commit of ``path``'s client fails after its record was
    written: the client hears 507 saying the round will fail. Returns the refused bodies."""
    _, cid, how = PATHS[path]
    fail_next_fsync(aggs[0].store.journals["r"])
    first = Client(aggs[0].topology, cid).prepare("r", x)
    with pytest.raises(StorageFailure, match="could not make it durable .*fail at its close"):
        await send(aggs[0], how, cid, first[0])
    rnd = aggs[0].rounds["r"]
    assert cid not in rnd.accepted and cid not in rnd.pending
    assert rnd.sum_damaged is not None and cid in rnd.sum_damaged
    assert sum(s.client_id == cid for s in _journal_shares(aggs[0])) == 1  # written
    return first


@pytest.mark.parametrize("path", list(PATHS))
def test_a_commit_that_fails_after_its_record_was_written_fails_the_round(tmp_path, path) -> None:
    """The record may be durable though the client was refused, and the client may send a
    different share (a new vector, new seeds): the round is poisoned, so it fails at its
    close with storage_failure everywhere and reveals nothing, whatever comes after."""
    large, cid, how = PATHS[path]
    d = 1000
    xs = units(3, d, 7, GF_P61)

    async def go() -> None:
        aggs = await open_federation(tmp_path, large, d)
        try:
            topo = aggs[0].topology
            await upload_all(aggs, "other", Client(topo, "other").prepare("r", xs[2]))
            await refused_after_written(aggs, path, xs[0])
            # The refusal was final (507): the client computes a new share and sends it.
            await upload_all(aggs, cid, Client(topo, cid).prepare("r", xs[1]))
            await run_round(aggs, "r")
            for a in aggs:
                rnd = a.rounds["r"]
                assert rnd.state is RoundState.FAILED, rnd.state
                assert rnd.failure_code == "storage_failure"
                assert rnd.total is None
        finally:
            close_all(aggs)

    run(go())


def test_a_write_that_fails_leaves_nothing_and_does_not_poison(tmp_path, monkeypatch) -> None:
    """A record that could not be written (disk full) is cut off: nothing can replay it,
    so the upload is simply refused and the round stays sound."""
    d = 1000
    xs = units(2, d, 8, GF_P61)

    async def go() -> None:
        aggs = await open_federation(tmp_path, False, d)
        try:
            topo = aggs[0].topology
            real = RoundJournal.write_share

            def full(self: RoundJournal, cid: str, body: Any) -> Any:
                raise OSError(errno.ENOSPC, "No space left on device")

            bodies = Client(topo, "k").prepare("r", xs[0])
            monkeypatch.setattr(RoundJournal, "write_share", full)
            with pytest.raises(StorageFailure, match="ENOSPC.*nothing was accepted"):
                await aggs[0].receive_share_async("r", "k", bodies[0])
            monkeypatch.setattr(RoundJournal, "write_share", real)
            assert aggs[0].rounds["r"].sum_damaged is None
            await upload_all(aggs, "k", bodies)
            await upload_all(aggs, "j", Client(topo, "j").prepare("r", xs[1]))
            await run_round(aggs, "r")
            np.testing.assert_array_equal(total_of(aggs[0], "r"), xs.sum(axis=0))
        finally:
            close_all(aggs)

    run(go())


# ------------------------------------------------------- 2. closed while still arriving


def writes_after(monkeypatch: pytest.MonkeyPatch, when: Callable[[], bool]) -> dict[str, int]:
    """Count SpoolWriter.write calls made once ``when()`` is true."""
    seen = {"n": 0}
    real = SpoolWriter.write

    def spy(self: SpoolWriter, data: Any) -> None:
        if when():
            seen["n"] += 1
        real(self, data)

    monkeypatch.setattr(SpoolWriter, "write", spy)
    return seen


@pytest.mark.parametrize("end", ["close", "done"])
def test_an_arriving_upload_stops_at_its_next_block_once_the_round_closes(
    tmp_path, monkeypatch, end
) -> None:
    """Once its round is no longer OPEN, a body still arriving writes no further block: it
    is refused (RoundNotOpen; RoundEnded once the round ended) and its file abandoned at
    once, without reading the rest of the body."""
    d = 1000
    late = full_client(0, skip=5)
    stopped = {"v": False}
    after = writes_after(monkeypatch, lambda: stopped["v"])

    async def go() -> None:
        aggs = await large_round(tmp_path, d)
        agg = aggs[0]
        try:
            topo = agg.topology
            for k in range(2):
                await upload_all(aggs, f"c{k}", Client(topo, f"c{k}").prepare("r", np.ones(d)))
            gate = asyncio.Event()
            body = Client(topo, late).prepare("r", np.ones(d))[0]
            slow = Body(body, hold_at=2000, gate=gate)
            pending = asyncio.ensure_future(agg.receive_stream_async("r", late, slow))
            await slow.held.wait()
            assert agg.store.spool("r").open_writers == 1
            if end == "close":
                agg.rounds["r"].close()  # the leader's close, as exchange 0 applies it
            else:
                await run_round(aggs, "r")
            stopped["v"] = True
            gate.set()
            with pytest.raises(RoundNotOpen, match="closed|ended"):
                await pending
            assert after["n"] == 0
            assert slow.pos < len(body)  # the rest of the body was never read
            assert late not in agg.rounds["r"].accepted
            assert agg.store.spool("r").open_writers == 0
            if end == "close":
                assert spool_files(agg, "r") == {
                    s.ref.name for s in _journal_shares(agg) if isinstance(s.ref, SpoolRef)
                }
            else:
                assert not agg.store.spool("r").directory.exists()
            assert not agg.ingest._arriving  # noqa: SLF001
        finally:
            close_all(aggs)

    run(go())


def test_discarding_a_spool_revokes_its_open_writers_and_opens_no_new_one(tmp_path) -> None:
    """The round's end discards its spool under a writer still open (an upload arriving on
    another thread): its later writes and its seal fail, no new file can be opened in the
    spool, and nothing is left on disk."""
    spool = RoundSpool(tmp_path / "round-r.spool", fsync=False)
    spool.create()
    writer = spool.writer("c1")
    writer.write(b"first block")
    sealing = spool.writer("c2")
    assert spool.open_writers == 2
    spool.discard()
    assert not spool.directory.exists()
    assert spool.open_writers == 0
    with pytest.raises(SpoolDiscarded):
        writer.write(b"second block")
    with pytest.raises(SpoolDiscarded):
        sealing.seal()
    spool.directory.mkdir()  # even if something re-created the directory meanwhile
    with pytest.raises(SpoolDiscarded):
        spool.writer("c3")
    writer.abandon()
    sealing.abandon()
    assert list(spool.directory.iterdir()) == []


def test_a_journal_and_its_store_hand_out_one_spool_per_round(tmp_path) -> None:
    """Uploads and the round's end go through the same spool object (the journal's), so
    the end knows every writer an upload opened."""

    async def go() -> None:
        aggs = await large_round(tmp_path, 100)
        try:
            journal = aggs[0].store.journals["r"]
            assert aggs[0].store.spool("r") is journal.spool is journal.spool
        finally:
            close_all(aggs)

    run(go())


# ------------------------------------------------------------------ 3. seats


def test_an_arriving_stream_holds_its_seat_against_whole_body_uploads(tmp_path) -> None:
    """max_clients = 2, a full share arriving: one seed upload gets the other seat, the next
    is RoundFull, and the stream, once whole, is accepted (not refused RoundFull after
    sending its whole body)."""
    d = 1000

    async def go() -> None:
        aggs = await large_round(tmp_path, d, max_clients=2)
        agg = aggs[0]
        try:
            topo = agg.topology
            streamer = full_client(0)
            gate = asyncio.Event()
            body = Client(topo, streamer).prepare("r", np.ones(d))[0]
            slow = Body(body, hold_at=4000, gate=gate)
            pending = asyncio.ensure_future(agg.receive_stream_async("r", streamer, slow))
            await slow.held.wait()
            seeds = [seed_client(0, k) for k in range(2)]
            bodies = [Client(topo, c).prepare("r", np.ones(d))[0] for c in seeds]
            assert await agg.receive_share_async("r", seeds[0], bodies[0]) is True
            with pytest.raises(RoundFull, match="arriving included"):
                await agg.receive_share_async("r", seeds[1], bodies[1])
            with pytest.raises(RoundFull, match="arriving included"):
                agg.receive_share("r", seeds[1], bodies[1])
            gate.set()
            assert await pending is True
            assert sorted(agg.rounds["r"].accepted) == sorted([streamer, seeds[0]])
        finally:
            close_all(aggs)

    run(go())


# ---------------------------------------------------------- 4. disk space reserved


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_body_that_does_not_fit_on_disk_is_507_before_its_values_are_read(
    tmp_path, monkeypatch, code
) -> None:
    d = 1000
    cid = full_client(0)
    calls: list[tuple[int, int]] = []
    real = os.posix_fallocate

    def no_room(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        raise OSError(code, os.strerror(code))

    async def go() -> None:
        aggs = await large_round(tmp_path, d)
        agg = aggs[0]
        try:
            body = Client(agg.topology, cid).prepare("r", np.ones(d))[0]
            monkeypatch.setattr(os, "posix_fallocate", no_room)
            stream = Body(body)
            with pytest.raises(StorageFailure, match=errno.errorcode[code]):
                await agg.receive_stream_async("r", cid, stream)
            assert stream.pos == 12  # the header only: no value was read
            assert calls == [(0, len(body))]
            nothing_changed(agg, cid)
            with pytest.raises(StorageFailure, match=errno.errorcode[code]):
                agg.receive_share("r", cid, body)  # the blocking API reserves too
            nothing_changed(agg, cid)
            monkeypatch.setattr(os, "posix_fallocate", real)
            assert await agg.receive_stream_async("r", cid, Body(body)) is True
        finally:
            close_all(aggs)

    run(go())


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EINVAL])
def test_a_file_system_that_cannot_reserve_space_skips_the_reservation(
    tmp_path, monkeypatch, code
) -> None:
    d = 1000
    cid = full_client(0)

    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(code, os.strerror(code))

    async def go() -> None:
        aggs = await large_round(tmp_path, d)
        agg = aggs[0]
        try:
            body = Client(agg.topology, cid).prepare("r", np.ones(d))[0]
            monkeypatch.setattr(os, "posix_fallocate", unsupported)
            assert await agg.receive_stream_async("r", cid, Body(body)) is True
            assert agg.rounds["r"].accepted[cid].digest == upload_digest(body)
        finally:
            close_all(aggs)

    run(go())


def test_a_reserved_spool_file_is_cut_to_what_was_written_when_sealed(tmp_path) -> None:
    spool = RoundSpool(tmp_path / "round-r.spool", fsync=True)
    spool.create()
    writer = spool.writer("c1", 4096)
    assert os.stat(writer.path).st_size == 4096  # reserved before anything is written
    writer.write(b"x" * 100)
    ref = writer.seal()
    assert ref.length == os.stat(spool.path(ref)).st_size == 100
    assert b"".join(bytes(p) for p in spool.read_back(ref, 64)) == b"x" * 100


# ------------------------------------------------------- 5. the blocking API, large


def test_the_blocking_api_spools_a_large_full_share_block_by_block(tmp_path) -> None:
    """Aggregator.receive_share in a large round: the full share goes to the spool and a
    SPOOL record (no SHARE record holds it whole), its values are checked block by block;
    retries answer as usual; the round reveals exactly."""
    d = 1000
    xs = units(3, d, 9, GF_P61)

    async def go() -> None:
        aggs = await large_round(tmp_path, d)
        try:
            topo = aggs[0].topology
            cid = full_client(0)
            bodies = Client(topo, cid).prepare("r", xs[0])
            bad = bytearray(bodies[0])
            bad[12 + 8 * 900 : 20 + 8 * 900] = GF_P61.modulus.to_bytes(8, "little")
            with pytest.raises(MalformedUpload, match="value at index 900"):
                aggs[0].receive_share("r", cid, bad)
            nothing_changed(aggs[0], cid)
            for i, body in enumerate(bodies):
                assert aggs[i].receive_share("r", cid, body) is True
            assert aggs[0].receive_share("r", cid, bodies[0]) is False
            (record,) = [s for s in _journal_shares(aggs[0]) if s.client_id == cid]
            assert isinstance(record.ref, SpoolRef) and record.ref.length == len(bodies[0])
            assert aggs[0].rounds["r"].accepted[cid].digest == upload_digest(bodies[0])
            for k in (1, 2):
                for i, body in enumerate(Client(topo, f"o{k}").prepare("r", xs[k])):
                    assert aggs[i].receive_share("r", f"o{k}", body) is True
            await run_round(aggs, "r")
            np.testing.assert_array_equal(total_of(aggs[0], "r"), xs.sum(axis=0))
        finally:
            close_all(aggs)

    run(go())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ring=st.sampled_from([GF_P61, Z2_32]),
    d=st.integers(1, 1200),
    block_elements=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_blocking_ingest_in_large_rounds_equals_whole_body_ingest(
    ring, d, block_elements, seed
) -> None:
    """The blocking API, block-wise (every round large) against whole (the default
    threshold): the same running sums and the same accepted digests at every aggregator."""
    xs = units(3, d, seed, ring)
    with tempfile.TemporaryDirectory() as tmp:
        topo = topology(Path(tmp) / "a", ring)
        large = federation(topo, stream_above=0, stream_block=block_elements * ring.itemsize)
        whole = federation(topology(Path(tmp) / "b", ring))
        try:
            for a, b in zip(large, whole, strict=True):
                assert a.open_round("r", d) and b.open_round("r", d)
            for k, x in enumerate(xs):
                for i, body in enumerate(Client(topo, f"c{k}").prepare("r", x)):
                    assert large[i].receive_share("r", f"c{k}", body) is True
                    assert whole[i].receive_share("r", f"c{k}", body) is True
            for a, b in zip(large, whole, strict=True):
                ra, rb = a.rounds["r"], b.rounds["r"]
                np.testing.assert_array_equal(ra.local_sum(), rb.local_sum())
                assert {c: s.digest for c, s in ra.accepted.items()} == {
                    c: s.digest for c, s in rb.accepted.items()
                }
        finally:
            close_all(large + whole)


# ------------------------------------------------------- 7. sums off the ingest threads


def test_sum_additions_never_take_the_ingest_threads_from_spool_writes(
    tmp_path, monkeypatch
) -> None:
    """As many uploads as ingest threads reach the running sum, whose additions are held:
    they wait on the sum's own thread, one at a time, so a further upload is still
    spooled whole (its blocks need an ingest thread); once released, every one is added."""
    d = 1000
    k = INGEST_THREADS
    release = threading.Event()
    adders: list[str] = []
    real_add = Accumulator.add_blocks

    def held(self: Accumulator, blocks: Any, *, subtract: bool = False) -> None:
        adders.append(threading.current_thread().name)
        release.wait(60)
        real_add(self, blocks, subtract=subtract)

    sealed = {"n": 0}
    real_seal = SpoolWriter.seal

    def counting(self: SpoolWriter) -> SpoolRef:
        ref = real_seal(self)
        sealed["n"] += 1
        return ref

    monkeypatch.setattr(Accumulator, "add_blocks", held)
    monkeypatch.setattr(SpoolWriter, "seal", counting)

    async def go() -> None:
        aggs = await large_round(tmp_path, d)
        agg = aggs[0]
        try:
            topo = agg.topology
            cids = [full_client(0, skip=j) for j in range(k + 1)]
            bodies = [Client(topo, c).prepare("r", np.ones(d))[0] for c in cids]
            tasks = [
                asyncio.ensure_future(agg.receive_stream_async("r", c, Body(b)))
                for c, b in zip(cids[:k], bodies[:k], strict=True)
            ]
            # Until all k are journaled and their additions handed over (bounded waits:
            # run() fails the test if they never come; nothing here asserts a duration).
            while len(_journal_shares(agg)) < k or not adders:
                await asyncio.sleep(0.01)
            for _ in range(50):
                if len(adders) == k:
                    break
                await asyncio.sleep(0.01)
            assert len(adders) == 1  # the others queue behind it, holding no ingest thread
            tasks.append(
                asyncio.ensure_future(agg.receive_stream_async("r", cids[k], Body(bodies[k])))
            )
            while sealed["n"] < k + 1:
                await asyncio.sleep(0.01)
            release.set()
            assert await asyncio.gather(*tasks) == [True] * (k + 1)
            assert set(adders) == {"sum-0_0"}
            assert agg.rounds["r"].sum.count == k + 1
        finally:
            release.set()
            close_all(aggs)

    run(go(), 20)


def test_a_reserved_stream_still_being_summed_holds_one_seat_not_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed upload whose body is whole is reserved (in the round's occupancy) while
    it is still being added to the sum, and still marked arriving until its task ends: it
    must count once, so with max_clients = 2 a second client still gets its seat."""
    d = 1000
    release, entered = threading.Event(), threading.Event()
    real_add = Accumulator.add_blocks

    def held(self: Accumulator, blocks: Any, *, subtract: bool = False) -> Any:
        entered.set()
        release.wait(20)
        return real_add(self, blocks, subtract=subtract)

    monkeypatch.setattr(Accumulator, "add_blocks", held)

    async def go() -> None:
        aggs = await large_round(tmp_path, d, max_clients=2)
        agg = aggs[0]
        try:
            topo = agg.topology
            streamed = full_client(0)
            body = Client(topo, streamed).prepare("r", np.ones(d))[0]
            stream = asyncio.ensure_future(agg.receive_stream_async("r", streamed, Body(body)))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            assert agg.rounds["r"].occupancy == 1  # reserved, and still arriving
            other = seed_client(0)
            seed_body = Client(topo, other).prepare("r", np.ones(d))[0]
            second = asyncio.ensure_future(agg.receive_share_async("r", other, seed_body))
            await asyncio.sleep(0.2)  # refused at once if it were counted twice
            assert not second.done() or second.exception() is None
            release.set()
            assert await stream is True and await second is True
            assert agg.rounds["r"].occupancy == 2
        finally:
            release.set()
            close_all(aggs)

    run(go())
