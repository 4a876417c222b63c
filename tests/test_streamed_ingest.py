"""Streamed ingest at the aggregator, in one process (docs/design.md, "Streamed uploads"):
three Aggregator objects on the in-memory party network, fed with real client upload
bodies, in large rounds (a small streaming threshold) against the whole-body path; then the
same over HTTP (aiohttp's test server) for cut, slow, malformed and retried bodies and a
full disk; then recovery from journals and spool files."""

from __future__ import annotations

import asyncio
import errno
import json
import tempfile
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpc_agg import Client, Topology
from mpc_agg.aggregator import Aggregator
from mpc_agg.aggregator.store import RoundStore
from mpc_agg.core import xof
from mpc_agg.core.ring import GF_P61, Z2_32, Ring
from mpc_agg.core.rounds import RoundState, upload_digest
from mpc_agg.core.sharing import ShareKind, full_share_index
from mpc_agg.errors import (
    ClientDisconnected,
    ConflictingShare,
    MalformedUpload,
    RoundNotOpen,
    StorageFailure,
    UploadInProgress,
)
from mpc_agg.mpc.memory import memory_networks
from mpc_agg.storage.spool import SpoolRef, SpoolWriter
from mpc_agg.transport.http_server import UPLOAD_LIMITS, build_app
from mpc_agg.transport.upload_limits import ServerLimits

from .conftest import topology_doc

T = TypeVar("T")
TERMINAL = ("done", "failed")


def run(coro: Awaitable[T], timeout_s: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


def topology(data_dir: Path, ring: Ring = GF_P61, fsync: bool = False, **rounds: Any) -> Topology:
    doc = topology_doc(3, 1, name="streamed")
    doc["data_dir"] = str(data_dir)
    doc["fsync"] = fsync
    doc["rounds"].update(rounds)
    if ring is Z2_32:
        doc["encoding"] = {"ring": "z2_32", "frac_bits": 16, "coord_clip": 1.0}
    return Topology.from_dict(doc)


def federation(topo: Topology, **stream: int) -> list[Aggregator]:
    """Three aggregators on one in-memory party network; ``stream``: ``stream_above`` and
    ``stream_block`` (bytes)."""
    return [Aggregator(topo, i, net, **stream) for i, net in enumerate(memory_networks(3))]


def close_all(aggs: list[Aggregator]) -> None:
    for a in aggs:
        a.close_journals()


class Body:
    """An :class:`~mpc_agg.transport.upload_limits.UploadBody` over bytes: ``cut_at`` the
    peer goes away after that many bytes; ``gate`` (an event) holds the body after
    ``hold_at`` bytes until it is set."""

    def __init__(
        self,
        data: bytes | bytearray,
        *,
        length: int | None = None,
        cut_at: int | None = None,
        hold_at: int | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.data = bytes(data)
        self._length = len(self.data) if length is None else length
        self.cut_at = cut_at
        self.hold_at, self.gate = hold_at, gate
        self.held = asyncio.Event()
        self.pos = 0

    @property
    def length(self) -> int:
        return self._length

    async def read(self, n: int) -> bytearray:
        if self.gate is not None and self.hold_at is not None and self.pos + n > self.hold_at:
            self.held.set()
            await self.gate.wait()
        if self.cut_at is not None and self.pos + n > self.cut_at:
            raise ClientDisconnected("the client went away")
        if self.pos + n > len(self.data):
            raise MalformedUpload(f"body ended after {len(self.data)} of {self.length}")
        out = bytearray(self.data[self.pos : self.pos + n])
        self.pos += n
        await asyncio.sleep(0)  # let other tasks run between pieces, as a socket would
        return out

    async def finish(self) -> None:
        if self.pos < len(self.data):
            raise MalformedUpload("body is longer than announced")


async def upload(agg: Aggregator, round_id: str, cid: str, body: bytes | bytearray) -> bool:
    """What the HTTP server does: stream a full share of a large round, else whole."""
    if agg.upload_block(round_id, cid) is None:
        return await agg.receive_share_async(round_id, cid, body)
    return await agg.receive_stream_async(round_id, cid, Body(body))


async def run_round(aggs: list[Aggregator], round_id: str) -> None:
    tasks = [asyncio.ensure_future(a.serve_commands()) for a in aggs]
    try:
        aggs[0].request_close(round_id)
        for _ in range(4000):
            if all(a.rounds[round_id].state.value in TERMINAL for a in aggs):
                return
            await asyncio.sleep(0.005)
        raise AssertionError("round did not end")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def units(n: int, d: int, seed: int, ring: Ring) -> np.ndarray:
    """Vectors that encode exactly (multiples of 2^-frac_bits within the clip)."""
    scale = 2.0**16 if ring is Z2_32 else 2.0**24
    top = 2**10 if ring is Z2_32 else 1000 * 2**24
    return np.random.default_rng(seed).integers(-top, top + 1, size=(n, d)) / scale


def total_of(agg: Aggregator, round_id: str) -> np.ndarray:
    rnd = agg.rounds[round_id]
    assert rnd.total is not None
    return rnd.ring.to_signed(rnd.total) / 2.0**agg.topology.encoding.frac_bits


def spool_files(agg: Aggregator, round_id: str) -> set[str]:
    return agg.store.spool(round_id).names()


def full_client(index: int, m: int = 3, skip: int = 0) -> str:
    """A client id whose full share goes to aggregator ``index``."""
    found = [c for c in (f"c{k}" for k in range(200)) if full_share_index(c, m) == index]
    return found[skip]


# --------------------------------------------------------------------------- equivalence


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ring=st.sampled_from([GF_P61, Z2_32]),
    d=st.integers(1, 1500),
    block_elements=st.integers(1, 400),
    n=st.integers(2, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_block_wise_ingest_equals_whole_body_ingest(ring, d, block_elements, n, seed) -> None:
    """The same bodies, streamed block by block (every round large) or taken whole (the
    default threshold): every aggregator holds the same running sum and the same accepted
    shares with the same digests (that of the whole body), and identical retries are
    answered alike."""
    xs = units(n, d, seed, ring)

    async def go(tmp: Path) -> None:
        topo = topology(tmp / "a", ring)
        streamed = federation(topo, stream_above=0, stream_block=block_elements * ring.itemsize)
        whole = federation(topology(tmp / "b", ring))
        try:
            for a, b in zip(streamed, whole, strict=True):
                assert a.open_round("r", d) and b.open_round("r", d)
            for k, x in enumerate(xs):
                cid = f"client-{k}"
                bodies = Client(topo, cid).prepare("r", x)
                for i, body in enumerate(bodies):
                    assert await upload(streamed[i], "r", cid, body) is True
                    assert await upload(whole[i], "r", cid, body) is True
                    # Retries (200), also of a whole body: a full share of a large round
                    # handed over whole still goes through the stream (digest only here).
                    assert await upload(streamed[i], "r", cid, body) is False
                    assert await streamed[i].receive_share_async("r", cid, body) is False
            for a, b in zip(streamed, whole, strict=True):
                ra, rb = a.rounds["r"], b.rounds["r"]
                assert np.array_equal(ra.local_sum(), rb.local_sum())
                assert ra.accepted.keys() == rb.accepted.keys()
                for cid, acc in ra.accepted.items():
                    assert (acc.kind, acc.digest, acc.seed) == (
                        rb.accepted[cid].kind,
                        rb.accepted[cid].digest,
                        rb.accepted[cid].seed,
                    )
                fulls = {c for c, s in ra.accepted.items() if s.kind is ShareKind.FULL}
                assert len(spool_files(a, "r")) == len(fulls)  # one file per full share
                assert a.metrics["uploads_retried"] == 2 * n
                assert a.metrics["uploads_refused"] == 0
            await run_round(streamed, "r")
            for a in streamed:
                assert a.rounds["r"].state is RoundState.DONE
                assert np.array_equal(total_of(a, "r"), xs.sum(axis=0))
                assert not a.store.spool("r").directory.exists()  # gone with the round
        finally:
            close_all(streamed)
            close_all(whole)

    with tempfile.TemporaryDirectory() as tmp:
        run(go(Path(tmp)))


def test_only_rounds_above_the_threshold_are_large(tmp_path) -> None:
    store = RoundStore(topology(tmp_path), 0, float, float, stream_above=800, stream_block=24)
    assert not store.streamed(100, GF_P61) and store.streamed(101, GF_P61)
    assert not store.streamed(200, Z2_32) and store.streamed(201, Z2_32)
    assert store.block_elements(GF_P61) == 3 and store.block_elements(Z2_32) == 6
    default = RoundStore(topology(tmp_path), 0, float, float)
    assert not default.streamed(2 * 2**20, GF_P61) and default.streamed(2 * 2**20 + 1, GF_P61)


@pytest.mark.parametrize("ring", [GF_P61, Z2_32], ids=lambda r: r.name)
def test_a_dropped_clients_streamed_share_is_subtracted_block_by_block(tmp_path, ring) -> None:
    """Partial clients whose full share was streamed (read back from the spool) or whose
    seed share was added block by block are subtracted exactly at agreement."""
    d = 2000

    async def go() -> None:
        topo = topology(tmp_path, ring)
        aggs = federation(topo, stream_above=0, stream_block=8 * 300)
        try:
            for a in aggs:
                a.open_round("r", d)
            xs = units(5, d, 7, ring)
            for k in range(3):
                bodies = Client(topo, f"c{k}").prepare("r", xs[k])
                for i in range(3):
                    await upload(aggs[i], "r", f"c{k}", bodies[i])
            # Partial: its full share (streamed) and one seed, not the other seed.
            for k, cid in ((3, full_client(0, skip=3)), (4, full_client(1, skip=3))):
                bodies = Client(topo, cid).prepare("r", xs[k])
                full = full_share_index(cid, 3)
                for i in (full, (full + 1) % 3):
                    await upload(aggs[i], "r", cid, bodies[i])
            await run_round(aggs, "r")
            for a in aggs:
                rnd = a.rounds["r"]
                assert rnd.state is RoundState.DONE, rnd.failure
                assert len(rnd.dropped_clients) == 2
                assert np.array_equal(total_of(a, "r"), xs[:3].sum(axis=0))
        finally:
            close_all(aggs)

    run(go())


# --------------------------------------------------------------------------- refusals


async def large_round(
    tmp_path: Path, d: int = 1000, fsync: bool = False, **kw: Any
) -> list[Aggregator]:
    aggs = federation(topology(tmp_path, fsync=fsync, **kw), stream_above=0, stream_block=8 * 128)
    for a in aggs:
        a.open_round("r", d)
    return aggs


def nothing_changed(agg: Aggregator, cid: str) -> None:
    rnd = agg.rounds["r"]
    assert cid not in rnd.accepted and cid not in rnd.pending
    assert spool_files(agg, "r") == set()
    assert rnd.sum.count == len(rnd.accepted)
    assert not agg.ingest._arriving  # noqa: SLF001


def test_cut_short_and_malformed_streams_change_nothing_then_a_good_one_is_accepted(
    tmp_path,
) -> None:
    d = 1000
    cid = full_client(0)

    async def go() -> None:
        aggs = await large_round(tmp_path, d)
        agg = aggs[0]
        try:
            body = bytes(Client(agg.topology, cid).prepare("r", np.ones(d))[0])
            bad_value = bytearray(body)
            k = 700  # in the sixth block of 128 coordinates
            bad_value[12 + 8 * k : 20 + 8 * k] = GF_P61.modulus.to_bytes(8, "little")
            cases = [
                (Body(body, cut_at=5000), ClientDisconnected, "went away"),
                (Body(body[:-100], length=len(body)), MalformedUpload, "ended after"),
                (Body(bad_value), MalformedUpload, f"value at index {k} is not below p"),
                (Body(body, length=len(body) - 8), MalformedUpload, "is 8012 bytes, got 8004"),
                (Body(body[:8]), MalformedUpload, "shorter than the 12-byte header"),
            ]
            for stream, error, words in cases:
                with pytest.raises(error, match=words):
                    await agg.receive_stream_async("r", cid, stream)
                nothing_changed(agg, cid)
            assert agg.metrics["uploads_refused"] == 5
            assert await agg.receive_stream_async("r", cid, Body(body)) is True
            assert agg.rounds["r"].accepted[cid].digest == upload_digest(body)
            assert len(spool_files(agg, "r")) == 1
        finally:
            close_all(aggs)

    run(go())


def test_retries_are_digested_only_identical_200_different_409(tmp_path) -> None:
    d = 1000
    cid = full_client(0)

    async def go() -> None:
        aggs = await large_round(tmp_path, d)
        agg = aggs[0]
        try:
            client = Client(agg.topology, cid)
            body = client.prepare("r", np.ones(d))[0]
            other = client.prepare("r", -np.ones(d))[0]
            assert await agg.receive_stream_async("r", cid, Body(body)) is True
            files = spool_files(agg, "r")
            assert await agg.receive_stream_async("r", cid, Body(body)) is False
            with pytest.raises(ConflictingShare):
                await agg.receive_stream_async("r", cid, Body(other))
            # A retry whose body is cut is refused and changes nothing either.
            with pytest.raises(ClientDisconnected):
                await agg.receive_stream_async("r", cid, Body(body, cut_at=3000))
            assert spool_files(agg, "r") == files  # no spool file for retries
            assert agg.metrics["uploads_retried"] == 1
            assert agg.rounds["r"].sum.count == 1
            # A whole body handed to receive_share_async goes to the spool all the same.
            cid2 = full_client(0, skip=1)
            body2 = Client(agg.topology, cid2).prepare("r", np.ones(d))[0]
            assert await agg.receive_share_async("r", cid2, body2) is True
            assert len(spool_files(agg, "r")) == 2
            assert all(isinstance(s.ref, SpoolRef) for s in _journal_shares(agg))
        finally:
            close_all(aggs)

    run(go())


def test_a_second_upload_while_one_arrives_is_upload_in_progress(tmp_path) -> None:
    d = 1000
    cid = full_client(0)

    async def go() -> None:
        aggs = await large_round(tmp_path, d)
        agg = aggs[0]
        try:
            body = Client(agg.topology, cid).prepare("r", np.ones(d))[0]
            gate = asyncio.Event()
            slow = Body(body, hold_at=4000, gate=gate)
            first = asyncio.ensure_future(agg.receive_stream_async("r", cid, slow))
            await slow.held.wait()
            assert agg.rounds["r"].pending == set()  # not reserved while the body arrives
            with pytest.raises(UploadInProgress, match="arriving"):
                await agg.receive_stream_async("r", cid, Body(body))
            with pytest.raises(UploadInProgress, match="arriving"):
                await agg.receive_share_async("r", cid, body)
            gate.set()
            assert await first is True
        finally:
            close_all(aggs)

    run(go())


@pytest.mark.parametrize("fsync", [False, True])
def test_an_upload_still_arriving_at_the_close_is_refused_and_leaves_nothing(
    tmp_path, fsync
) -> None:
    """The close does not wait for bodies still arriving (it would hold up every party
    for up to deadlines.upload_s): an upload whose body completes after it is refused
    (its spool went with the round: that is the round's end, not a storage fault)."""
    d = 1000

    async def go() -> None:
        aggs = await large_round(tmp_path, d, fsync=fsync)
        try:
            topo = aggs[0].topology
            for k in range(2):
                bodies = Client(topo, f"c{k}").prepare("r", np.ones(d))
                for i in range(3):
                    await upload(aggs[i], "r", f"c{k}", bodies[i])
            late = full_client(0, skip=5)
            gate = asyncio.Event()
            slow = Body(Client(topo, late).prepare("r", np.ones(d))[0], hold_at=4000, gate=gate)
            pending = asyncio.ensure_future(aggs[0].receive_stream_async("r", late, slow))
            await slow.held.wait()
            await run_round(aggs, "r")
            assert all(a.rounds["r"].state is RoundState.DONE for a in aggs)
            gate.set()
            with pytest.raises(RoundNotOpen):  # RoundEnded is one
                await pending
            assert not aggs[0].store.spool("r").directory.exists()
            np.testing.assert_array_equal(total_of(aggs[0], "r"), 2 * np.ones(d))
        finally:
            close_all(aggs)

    run(go())


def test_a_full_disk_while_spooling_is_507_and_nothing_is_kept(tmp_path, monkeypatch) -> None:
    d = 1000
    cid = full_client(0)
    real = SpoolWriter.write
    calls = {"n": 0}

    def full_disk(self: SpoolWriter, data: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the header, one block, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, data)

    async def go() -> None:
        aggs = await large_round(tmp_path, d)
        agg = aggs[0]
        try:
            body = Client(agg.topology, cid).prepare("r", np.ones(d))[0]
            monkeypatch.setattr(SpoolWriter, "write", full_disk)
            with pytest.raises(StorageFailure, match="ENOSPC"):
                await agg.receive_stream_async("r", cid, Body(body))
            nothing_changed(agg, cid)
            monkeypatch.setattr(SpoolWriter, "write", real)
            assert await agg.receive_stream_async("r", cid, Body(body)) is True
        finally:
            close_all(aggs)

    run(go())


def test_a_seed_with_a_rejected_word_in_a_large_round_is_refused_before_journaling(
    tmp_path, monkeypatch
) -> None:
    """GF(p): a seed whose stream holds the word p (never sent by an honest client) is
    validated block by block first and refused; nothing is journaled or added."""
    d = 1000
    cid = full_client(1)

    async def go() -> None:
        aggs = await large_round(tmp_path, d)
        agg = aggs[0]  # gets a seed share of this client
        try:
            body = Client(agg.topology, cid).prepare("r", np.ones(d))[0]
            real = xof.BlockStream.next_block
            seen = {"n": 0}

            def rejecting(self: Any, n: int) -> Any:
                seen["n"] += 1
                return None if seen["n"] == 3 else real(self, n)

            monkeypatch.setattr(xof.BlockStream, "next_block", rejecting)
            with pytest.raises(MalformedUpload, match="rejected word .* coordinate 256"):
                await agg.receive_share_async("r", cid, body)
            assert agg.rounds["r"].accepted == {} and agg.rounds["r"].sum.count == 0
            assert all(s.client_id != cid for s in _journal_shares(agg))
            monkeypatch.setattr(xof.BlockStream, "next_block", real)
            assert await agg.receive_share_async("r", cid, body) is True
        finally:
            close_all(aggs)

    run(go())


def _journal_shares(agg: Aggregator) -> list[Any]:
    from mpc_agg.storage.journal import read_journal

    return read_journal(agg.store.journals["r"].path.read_bytes()).shares


def test_a_share_that_cannot_be_read_back_poisons_the_round_it_fails_closed(
    tmp_path, monkeypatch
) -> None:
    """An I/O error half way through adding a durable share: the client hears 507, the
    share stays accepted (it is journaled), and the round refuses to agree at every party
    with failure storage_failure: nothing is revealed."""
    d = 1000

    async def go() -> None:
        aggs = await large_round(tmp_path, d)
        topo = aggs[0].topology
        try:
            for k in range(2):
                bodies = Client(topo, f"c{k}").prepare("r", np.ones(d))
                for i in range(3):
                    await upload(aggs[i], "r", f"c{k}", bodies[i])
            cid = full_client(0, skip=4)
            bodies = Client(topo, cid).prepare("r", np.ones(d))
            real = RoundStore.spooled_blocks

            def failing(self: RoundStore, rnd: Any, ref: Any) -> Any:
                blocks = real(self, rnd, ref)
                yield next(blocks)
                raise OSError(errno.EIO, "Input/output error")

            monkeypatch.setattr(RoundStore, "spooled_blocks", failing)
            with pytest.raises(StorageFailure, match="Input/output error"):
                await aggs[0].receive_stream_async("r", cid, Body(bodies[0]))
            monkeypatch.setattr(RoundStore, "spooled_blocks", real)
            rnd = aggs[0].rounds["r"]
            assert cid in rnd.accepted and rnd.sum_damaged is not None
            assert await aggs[0].receive_stream_async("r", cid, Body(bodies[0])) is False
            for i in (1, 2):
                await upload(aggs[i], "r", cid, bodies[i])
            await run_round(aggs, "r")
            for a in aggs:
                assert a.rounds["r"].state is RoundState.FAILED
                assert a.rounds["r"].failure_code == "storage_failure"
                assert a.rounds["r"].total is None
        finally:
            close_all(aggs)

    run(go())


# --------------------------------------------------------------------------- recovery


def test_recovery_replays_spooled_shares_and_deletes_orphan_files(tmp_path) -> None:
    d = 1000

    async def go() -> None:
        topo = topology(tmp_path)
        stream = {"stream_above": 0, "stream_block": 8 * 100}
        aggs = federation(topo, **stream)
        xs = units(4, d, 11, GF_P61)
        for a in aggs:
            a.open_round("r", d)
        for k in range(3):
            bodies = Client(topo, f"c{k}").prepare("r", xs[k])
            for i in range(3):
                await upload(aggs[i], "r", f"c{k}", bodies[i])
        before = [a.rounds["r"].local_sum() for a in aggs]
        digests = [{c: s.digest for c, s in a.rounds["r"].accepted.items()} for a in aggs]
        close_all(aggs)
        # A crash mid-upload leaves a spool file no record refers to; a spool of a round
        # with no journal is left over too.
        orphan = aggs[0].store.spool("r").directory / ("c9-" + "1" * 16 + ".body")
        orphan.write_bytes(b"half a body")
        stray = aggs[0].store.spool("gone").directory
        stray.mkdir()
        (stray / ("c1-" + "2" * 16 + ".body")).write_bytes(b"x")

        again = federation(topo, **stream)
        try:
            for i, a in enumerate(again):
                assert a.recover() == 1
                rnd = a.rounds["r"]
                assert np.array_equal(rnd.local_sum(), before[i])
                assert {c: s.digest for c, s in rnd.accepted.items()} == digests[i]
            assert not orphan.exists() and not stray.exists()
            bodies = Client(topo, "c3").prepare("r", xs[3])
            for i in range(3):  # later uploads, and retries of earlier ones, still work
                await upload(again[i], "r", "c3", bodies[i])
            await run_round(again, "r")
            for a in again:
                assert np.array_equal(total_of(a, "r"), xs.sum(axis=0))
        finally:
            close_all(again)

    run(go())


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_spool_file_at_recovery_fails_the_round(tmp_path, damage) -> None:
    d = 1000

    async def go() -> None:
        topo = topology(tmp_path)
        stream = {"stream_above": 0, "stream_block": 8 * 100}
        aggs = federation(topo, **stream)
        for a in aggs:
            a.open_round("r", d)
        cid = full_client(0)
        bodies = Client(topo, cid).prepare("r", np.ones(d))
        for i in range(3):
            await upload(aggs[i], "r", cid, bodies[i])
        close_all(aggs)
        spool = aggs[0].store.spool("r")
        (name,) = spool.names()
        path = spool.directory / name
        if damage == "flip":
            data = bytearray(path.read_bytes())
            data[5000] ^= 1
            path.write_bytes(bytes(data))
        elif damage == "truncate":
            path.write_bytes(path.read_bytes()[:-8])
        else:
            path.unlink()

        again = federation(topo, **stream)
        try:
            assert again[0].recover() == 0
            rnd = again[0].rounds["r"]
            assert rnd.state is RoundState.FAILED and rnd.failure_code == "storage_failure"
            assert again[0].round_index.state("r") == "failed"
            assert not again[0].store.journal_path("r").exists()
            assert not spool.directory.exists()
            assert again[1].recover() == 1 and again[2].recover() == 1
            # Reconciliation fails it at the others: it never reveals.
            await asyncio.gather(*(a.reconcile() for a in again))
            for a in again[1:]:
                assert a.rounds["r"].state is RoundState.FAILED
                assert a.rounds["r"].failure_code == "ended_elsewhere"
        finally:
            close_all(again)

    run(go())


# --------------------------------------------------------------------------- over HTTP


@asynccontextmanager
async def serving(
    tmp_path: Path, *, limits: dict[str, Any] | None = None, **stream: int
) -> AsyncIterator[tuple[list[Aggregator], list[TestClient]]]:
    topo = topology(tmp_path, max_dim=100_000, upload_buffer_mb=1)
    aggs = federation(topo, **stream)
    clients: list[TestClient] = []
    try:
        for a in aggs:
            server_limits = ServerLimits.for_topology(topo, **(limits or {}))
            client = TestClient(TestServer(build_app(a, limits=server_limits)))
            await client.start_server()
            clients.append(client)
        yield aggs, clients
    finally:
        for client in clients:
            await client.close()
        close_all(aggs)


async def put(client: TestClient, path: str, body: bytes | bytearray) -> tuple[int, Any]:
    async with client.put(path, data=bytes(body)) as response:
        return response.status, json.loads(await response.read())


async def raw_put(client: TestClient, path: str, head_length: int, data: bytes) -> bytes:
    """A PUT announcing ``head_length`` bytes that sends ``data`` and closes its side."""
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {head_length}\r\n"
            "Connection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        writer.write_eof()
        return await reader.read()
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def settled(agg: Aggregator, client: TestClient) -> None:
    """Bounded wait until no upload is in flight at ``client``'s server (a cut upload ends
    when the server notices the closed connection)."""
    uploads = client.server.app[UPLOAD_LIMITS]
    for _ in range(500):
        if uploads.inflight == 0 and not agg.ingest._arriving:  # noqa: SLF001
            return
        await asyncio.sleep(0.01)
    raise AssertionError("an upload is still in flight")


def test_http_streams_large_full_shares_in_one_block_of_buffer(tmp_path) -> None:
    """A full share of 800 KB through a 256 KiB upload buffer: streamed, it holds one
    64 KiB block at a time (taken whole it would be 413); retries 200 and 409; a cut body
    (the client closes its connection), a short one and a bad value leave nothing; a disk
    full is 507; a later good upload is accepted; then the round reveals exactly."""
    d = 100_000
    block = 64 * 1024

    async def go() -> None:
        limits = {"buffer_bytes": 256 * 1024}
        async with serving(tmp_path, limits=limits, stream_above=0, stream_block=block) as (
            aggs,
            clients,
        ):
            topo = aggs[0].topology
            for c in clients:
                async with c.put("/v1/rounds/r", json={"dim": d}) as response:
                    assert response.status == 201
            cid = full_client(0)
            path = f"/v1/rounds/r/shares/{cid}"
            body = bytes(Client(topo, cid).prepare("r", np.ones(d))[0])
            assert len(body) > 3 * limits["buffer_bytes"]

            answer = await raw_put(clients[0], path, len(body), body[: len(body) // 2])
            assert b"HTTP/1.1 400" in answer or answer == b""  # the peer went away
            await settled(aggs[0], clients[0])
            nothing_changed(aggs[0], cid)
            bad = bytearray(body)
            bad[12 + 8 * 50_000 : 20 + 8 * 50_000] = (2**64 - 1).to_bytes(8, "little")
            status, answer = await put(clients[0], path, bad)
            assert (status, answer["error"]) == (400, "malformed")
            assert "value at index 50000" in answer["detail"]
            answer = await raw_put(clients[0], path, len(body), body[:-1])
            assert answer == b"" or b"HTTP/1.1 400" in answer
            await settled(aggs[0], clients[0])
            status, answer = await put(clients[0], path, body[:-8])  # wrong Content-Length
            assert (status, answer["error"]) == (400, "malformed")
            nothing_changed(aggs[0], cid)

            real = SpoolWriter.write

            def full_disk(self: SpoolWriter, data: Any) -> None:
                if self.length > 3 * block:
                    raise OSError(errno.ENOSPC, "No space left on device")
                real(self, data)

            SpoolWriter.write = full_disk  # type: ignore[method-assign]
            try:
                status, answer = await put(clients[0], path, body)
            finally:
                SpoolWriter.write = real  # type: ignore[method-assign]
            assert (status, answer["error"]) == (507, "storage_failure")
            nothing_changed(aggs[0], cid)

            uploads = clients[0].server.app[UPLOAD_LIMITS]
            peak = {"used": 0}
            grow = uploads.buffer.grow

            async def watched(ticket: Any, extra: int, wait_s: float) -> float:
                waited = await grow(ticket, extra, wait_s)
                peak["used"] = max(peak["used"], uploads.buffer.used)
                return waited

            uploads.buffer.grow = watched  # type: ignore[method-assign]
            assert await put(clients[0], path, body) == (201, {"accepted": True, "retry": False})
            assert await put(clients[0], path, body) == (200, {"accepted": True, "retry": True})
            assert 0 < peak["used"] <= block  # one block held at a time, never the body
            other = Client(topo, cid).prepare("r", -np.ones(d))[0]
            status, answer = await put(clients[0], path, other)
            assert (status, answer["error"]) == (409, "conflicting_share")
            assert (uploads.inflight, uploads.buffer.used) == (0, 0)

            xs = units(2, d, 5, GF_P61)
            for k, x in enumerate(xs):
                shares = Client(topo, f"other{k}").prepare("r", x)
                for c, share in zip(clients, shares, strict=True):
                    status, _ = await put(c, f"/v1/rounds/r/shares/other{k}", share)
                    assert status == 201
            tasks = [asyncio.ensure_future(a.serve_commands()) for a in aggs]
            try:
                aggs[0].request_close("r")
                for _ in range(4000):
                    if all(a.rounds["r"].state.value in TERMINAL for a in aggs):
                        break
                    await asyncio.sleep(0.005)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for a in aggs:  # cid uploaded to aggregator 0 only: dropped, subtracted
                rnd = a.rounds["r"]
                assert rnd.state is RoundState.DONE, rnd.failure
                np.testing.assert_array_equal(total_of(a, "r"), xs.sum(axis=0))

    run(go(), 60)
