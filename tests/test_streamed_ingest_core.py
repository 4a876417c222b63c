"""The sans-I/O and storage parts of streamed ingest (docs/design.md, "Streamed uploads"):
block-wise accumulation against whole-vector accumulation, the round's new events
(``check_arrival``, ``accept_summed``, ``poison``, ``take_sum``), the share-header decoder,
spool files and the journal's SPOOL record."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg.config.schema import (
    STREAM_BLOCK_BYTES,
    RoundPolicy,
    stream_above_bytes,
    whole_body_bytes,
)
from mpc_agg.core import codec
from mpc_agg.core.accumulator import Accumulator
from mpc_agg.core.ring import GF_P61, Z2_32, Ring
from mpc_agg.core.rounds import Round, RoundState, upload_digest
from mpc_agg.core.sharing import Share, ShareKind
from mpc_agg.errors import (
    ConfigError,
    ConflictingShare,
    DimensionMismatch,
    IllegalTransition,
    MalformedUpload,
    RoundEnded,
    UploadInProgress,
)
from mpc_agg.storage.journal import RECORD_SPOOL, RoundJournal, read_journal
from mpc_agg.storage.spool import RoundSpool, SpoolDamaged, SpoolRef, read_back

RINGS = [GF_P61, Z2_32]
ring_st = st.sampled_from(RINGS)


def canonical(ring: Ring, rng: np.random.Generator, d: int) -> np.ndarray:
    """Uniform elements, with the largest ones (the lazy bound's worst case) mixed in."""
    x = rng.integers(0, ring.modulus, size=d, dtype=np.uint64).astype(ring.dtype)
    x[rng.random(d) < 0.3] = ring.modulus - 1
    return x


def partition(d: int, cuts: list[int]) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` covering ``0..d`` at the given cut points."""
    points = sorted({c % (d + 1) for c in cuts} | {0, d})
    return list(zip(points, points[1:], strict=False))


# --------------------------------------------------------------------------- accumulator


@settings(max_examples=60, deadline=None)
@given(
    ring=ring_st,
    d=st.integers(1, 300),
    ops=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=20),
    cuts=st.lists(st.integers(0, 400), max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_add_blocks_equals_whole_vector_additions(ring, d, ops, cuts, seed) -> None:
    """Any sequence of additions and subtractions, each given whole or as blocks of any
    sizes, gives the same canonical sum and count; the lazy bound holds with one pending
    addition per vector (longer than LAZY_ADDS sequences of worst values included)."""
    rng = np.random.default_rng(seed)
    whole, blocks = Accumulator(d, ring), Accumulator(d, ring)
    for subtract, as_blocks in ops:
        v = canonical(ring, rng, d)
        (whole.subtract if subtract else whole.add)(v)
        if as_blocks:
            pieces = [v[a:b] for a, b in partition(d, cuts)]
            blocks.add_blocks(iter(pieces), subtract=subtract)
        else:
            (blocks.subtract if subtract else blocks.add)(v)
    assert np.array_equal(whole.value(), blocks.value())
    assert whole.count == blocks.count and not blocks.damaged
    total = blocks.take()
    assert np.array_equal(total, whole.value()) and ring.is_canonical(total)


@pytest.mark.parametrize("ring", RINGS)
def test_add_blocks_reuses_one_buffer_safely(ring) -> None:
    """Each block is used before the next is asked for, so a producer may refill one
    buffer (as the spool reader and the seed stream do)."""
    d, n = 10, 3
    v = canonical(ring, np.random.default_rng(1), d)

    def refilled():
        buf = ring.empty(n)
        for start in range(0, d, n):
            part = v[start : start + n]
            buf[: len(part)] = part
            yield buf[: len(part)]

    acc = Accumulator(d, ring)
    acc.add_blocks(refilled())
    acc.add_blocks(refilled(), subtract=True)
    acc.add_blocks(refilled())
    assert np.array_equal(acc.value(), v)


@pytest.mark.parametrize(
    ("blocks", "words"),
    [
        (lambda v: iter([v[:4]]), "ended after 4 of the accumulator's 10"),
        (lambda v: iter([v, v[:1]]), "overrun the accumulator's dimension 10 after 10"),
        (lambda v: iter([v.astype(np.int64)]), "dtype int64"),
    ],
)
def test_add_blocks_that_run_short_or_overrun_damage_the_sum(blocks, words) -> None:
    acc = Accumulator(10)
    with pytest.raises(ValueError, match=words):
        acc.add_blocks(blocks(np.ones(10, dtype=np.uint64)))
    assert acc.damaged


def test_add_blocks_that_raise_part_way_damage_the_sum() -> None:
    def failing():
        yield np.ones(5, dtype=np.uint64)
        raise OSError("I/O error")

    acc = Accumulator(10)
    acc.add(np.ones(10, dtype=np.uint64))
    with pytest.raises(OSError, match="I/O error"):
        acc.add_blocks(failing())
    assert acc.damaged and acc.count == 1  # the partial addition is not counted


def test_take_returns_the_sum_in_place_and_empties_the_accumulator() -> None:
    acc = Accumulator(4)
    for _ in range(9):  # past LAZY_ADDS: at least one fold happened
        acc.add(np.full(4, GF_P61.modulus - 1, dtype=np.uint64))
    inner = acc._acc  # noqa: SLF001 - the point is that no copy is made
    total = acc.take()
    assert total is inner
    assert [int(t) for t in total] == [(9 * (GF_P61.modulus - 1)) % GF_P61.modulus] * 4
    for call in (acc.value, acc.take, lambda: acc.add(np.zeros(4, dtype=np.uint64))):
        with pytest.raises(ValueError, match="taken"):
            call()


# --------------------------------------------------------------------------- rounds


def full_share(d: int, value: int = 1) -> Share:
    return Share(0, ShareKind.FULL, d, vector=np.full(d, value, dtype=np.uint64))


def test_check_arrival_before_the_body_then_with_its_digest() -> None:
    r = Round("r", 4, 2, opened_at=0.0)
    share = full_share(4)
    digest = upload_digest(codec.encode_share(share))
    assert r.check_arrival("a", 4, None) is True  # new: nothing known yet
    with pytest.raises(DimensionMismatch):
        r.check_arrival("a", 5, None)
    r.reserve("a")
    with pytest.raises(UploadInProgress):
        r.check_arrival("a", 4, None)
    r.accept("a", share, digest, share.vector)
    assert r.check_arrival("a", 4, None) is False  # known: decide on the digest
    assert r.check_arrival("a", 4, digest) is False  # identical retry
    with pytest.raises(ConflictingShare):
        r.check_arrival("a", 4, b"\0" * 16)
    r.fail("gone")
    assert r.check_arrival("a", 4, digest) is False
    with pytest.raises(RoundEnded):
        r.check_arrival("a", 4, b"\0" * 16)


def test_accept_summed_settles_a_share_added_block_by_block() -> None:
    r = Round("r", 6, 2, opened_at=0.0)
    with pytest.raises(IllegalTransition, match="not reserved"):
        r.accept_summed("a", ShareKind.FULL, b"d" * 16)
    r.reserve("a")
    r.sum.add_blocks(iter([np.ones(3, dtype=np.uint64), np.ones(3, dtype=np.uint64)]))
    r.accept_summed("a", ShareKind.FULL, b"d" * 16, ref="spool")
    assert r.pending == set() and r.accepted["a"].ref == "spool"
    r.reserve("b")
    r.fail("stop")
    with pytest.raises(IllegalTransition):
        r.accept_summed("b", ShareKind.SEED, b"e" * 16, seed=b"s" * 16)


def test_take_sum_once_agreed_in_place_and_never_a_damaged_one() -> None:
    r = Round("r", 3, 1, opened_at=0.0)
    r.reserve("a")
    r.accept("a", full_share(3, 5), b"d" * 16, np.full(3, 5, dtype=np.uint64))
    with pytest.raises(IllegalTransition, match="open"):
        r.take_sum()
    r.close()
    r.agree(frozenset({"a"}), [])
    total = r.take_sum()
    assert total.tolist() == [5, 5, 5] and r.sum is None
    with pytest.raises(IllegalTransition, match="no running sum"):
        r.take_sum()

    poisoned = Round("p", 3, 1, opened_at=0.0)
    poisoned.poison("a spool file could not be read back")
    poisoned.poison("a later reason")
    assert poisoned.sum_damaged == "a spool file could not be read back"
    poisoned.close()
    poisoned.agree(frozenset(), [])
    with pytest.raises(IllegalTransition, match="could not be read back"):
        poisoned.take_sum()

    damaged = Round("q", 3, 1, opened_at=0.0)
    with pytest.raises(ValueError):
        damaged.sum.add_blocks(iter([np.ones(2, dtype=np.uint64)]))
    assert damaged.sum_damaged is not None
    damaged.close()
    damaged.agree(frozenset(), [])
    with pytest.raises(IllegalTransition, match="part way"):
        damaged.take_sum()


def test_agree_subtracts_dropped_shares_given_as_blocks_or_vectors() -> None:
    d = 7
    rng = np.random.default_rng(3)
    vs = {c: canonical(GF_P61, rng, d) for c in "abc"}
    r = Round("r", d, 1, opened_at=0.0)
    for c, v in vs.items():
        r.reserve(c)
        r.accept(c, Share(0, ShareKind.FULL, d, vector=v), c.encode() * 16, v)
    r.close()
    r.agree(frozenset({"a"}), [iter([vs["b"][:2], vs["b"][2:]]), vs["c"]])
    assert r.dropped_clients == ("b", "c")
    assert np.array_equal(r.take_sum(), vs["a"])


# --------------------------------------------------------------------------- codec, config


def test_share_header_decoder_makes_decode_shares_checks_before_any_value() -> None:
    body = codec.encode_share(full_share(5))
    header = bytes(body[: codec.SHARE_HEADER.size])
    kind = codec.decode_share_header(header, aggregator=0, dim=5, length=len(body))
    assert kind is ShareKind.FULL
    with pytest.raises(MalformedUpload, match="is 52 bytes, got 51"):
        codec.decode_share_header(header, aggregator=0, dim=5, length=len(body) - 1)
    with pytest.raises(DimensionMismatch):
        codec.decode_share_header(header, aggregator=0, dim=6, length=len(body))
    with pytest.raises(MalformedUpload, match="aggregator 0, but this is aggregator 1"):
        codec.decode_share_header(header, aggregator=1, dim=5, length=len(body))
    with pytest.raises(MalformedUpload, match="shorter than the 12-byte header"):
        codec.decode_share_header(header[:11], aggregator=0, dim=5, length=len(body))
    values = np.array([1, GF_P61.modulus], dtype=np.uint64)
    with pytest.raises(MalformedUpload, match="value at index 41 is not below p"):
        codec.check_share_block(values, GF_P61, start=40)
    codec.check_share_block(np.array([2**32 - 1], dtype=np.uint32), Z2_32, start=9)


def test_the_upload_buffer_holds_bodies_taken_whole_not_streamed_ones() -> None:
    assert whole_body_bytes(10**9) == stream_above_bytes(16) + codec.SHARE_HEADER.size
    assert whole_body_bytes(1000) == codec.share_body_length(ShareKind.FULL, 1000)
    assert whole_body_bytes(10**9, 0.25) == STREAM_BLOCK_BYTES  # at least one block
    RoundPolicy(max_dim=10**9)  # the default buffer (128 MiB) streams 8 GB shares
    with pytest.raises(ConfigError, match="a full share at the streaming threshold"):
        RoundPolicy(max_dim=10**9, upload_buffer_mb=16)
    with pytest.raises(ConfigError, match="one full share of max_dim = 1000000"):
        RoundPolicy(max_dim=10**6, upload_buffer_mb=4)


# --------------------------------------------------------------------------- spool


def spool_of(tmp_path: Path) -> RoundSpool:
    spool = RoundSpool(tmp_path / "round-r.spool", fsync=True, token=lambda n: "ab" * n)
    spool.create()
    return spool


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(max_size=3000),
    pieces=st.lists(st.integers(1, 700), max_size=8),
    block=st.integers(1, 900),
    head=st.integers(0, 20),
)
def test_spooled_bytes_read_back_whole_with_the_uploads_digest(
    tmp_path_factory, data, pieces, block, head
) -> None:
    """Written in any pieces, read back in any blocks: the same bytes, and the reference's
    digest is :func:`upload_digest` of the whole."""
    spool = RoundSpool(tmp_path_factory.mktemp("s") / "round-r.spool", fsync=False)
    spool.create()
    writer = spool.writer("c1")
    pos = 0
    for n in pieces:
        writer.write(data[pos : pos + n])
        pos += n
    writer.write(data[pos:])
    ref = writer.seal()
    assert (ref.length, ref.digest) == (len(data), upload_digest(data))
    assert os.stat(spool.path(ref)).st_mode & 0o777 == 0o600
    got = [bytes(p) for p in spool.read_back(ref, block, head=head)]
    assert b"".join(got) == data
    if head and data:
        assert got[0] == data[:head]
        assert all(len(p) <= block for p in got[1:])


def test_a_damaged_spool_file_is_an_error_never_silent(tmp_path) -> None:
    spool = spool_of(tmp_path)
    writer = spool.writer("c1")
    writer.write(b"x" * 100)
    ref = writer.seal()
    assert ref.name == "c1-" + "ab" * 8 + ".body"
    path = spool.path(ref)
    assert list(spool.read_back(ref, 30)) and spool.names() == {ref.name}

    with path.open("r+b") as f:  # one byte flipped: only the digest tells
        f.seek(50)
        f.write(b"y")
    reader = spool.read_back(ref, 30)
    with pytest.raises(SpoolDamaged, match="digest"):
        for _ in reader:
            pass
    os.truncate(path, 99)
    with pytest.raises(SpoolDamaged, match="99 bytes, its record says 100"):
        next(spool.read_back(ref, 30))
    path.unlink()
    with pytest.raises(SpoolDamaged, match="missing"):
        next(read_back(path, ref, 30))


def test_an_abandoned_spool_file_leaves_nothing_and_discard_empties_the_spool(tmp_path) -> None:
    spool = spool_of(tmp_path)
    writer = spool.writer("c1")
    writer.write(b"partial")
    writer.abandon()
    writer.abandon()  # idempotent
    assert spool.names() == set()
    with pytest.raises(OSError, match="closed"):
        writer.write(b"more")
    kept = RoundSpool(spool.directory, fsync=False).writer("c2")
    kept.write(b"abc")
    ref = kept.seal()
    spool.remove({ref.name, "c3-" + "0" * 16 + ".body"})  # a missing one is fine
    assert spool.names() == set()
    RoundSpool(spool.directory, fsync=False).writer("c4").seal()
    spool.discard()
    assert not spool.directory.exists()
    spool.discard()  # idempotent


@pytest.mark.parametrize("name", ["../x-0000000000000000.body", "c1.body", "c1-00.body", ""])
def test_spool_names_are_never_paths(name) -> None:
    with pytest.raises(ValueError, match="spool file name"):
        SpoolRef(name, 1, b"\0" * 16)


# --------------------------------------------------------------------------- journal


def test_the_journal_references_a_spool_file_in_a_small_record(tmp_path) -> None:
    journal = RoundJournal.create(tmp_path / "round-r.journal", {"round": "r", "dim": 4})
    digest = xxhash.xxh3_128_digest(b"body")
    ref = SpoolRef("client.1-" + "0f" * 8 + ".body", 8 * 10**9 + 12, digest)
    journal.append_share("a", b"whole body")
    journal.append_spool("client.1", ref)
    data = journal.path.read_bytes()
    contents = read_journal(data)
    assert contents.torn is None
    assert [s.client_id for s in contents.shares] == ["a", "client.1"]
    assert contents.shares[1].ref == ref  # 8 GB named by a record of a few dozen bytes
    assert len(data) < 200
    assert journal.spool.directory == tmp_path / "round-r.spool"

    # A SPOOL record with a name that is a path, whole and with its checksum, was written
    # so: the journal is corrupt (the round must fail), not torn; nothing after it is cut.
    cid, bad = b"x", b"../etc"
    payload = (
        b"".join([len(cid).to_bytes(2, "little"), cid, len(bad).to_bytes(2, "little"), bad])
        + (5).to_bytes(8, "little")
        + digest
    )
    journal._append(RECORD_SPOOL, [payload])  # noqa: SLF001
    journal.append_share("b", b"acknowledged after it")
    size = journal.path.stat().st_size
    tail = read_journal(journal.path.read_bytes())
    assert tail.torn is None
    assert tail.corrupt is not None and "malformed spool record at byte" in tail.corrupt
    assert [s.client_id for s in tail.shares] == ["a", "client.1", "b"]
    _, recovered = RoundJournal.recover(journal.path, fsync=False)
    assert recovered.corrupt == tail.corrupt
    assert journal.path.stat().st_size == size == tail.valid_bytes  # not truncated


def test_discarding_a_journal_deletes_its_spool_first(tmp_path) -> None:
    path = tmp_path / "round-r.journal"
    spool = RoundSpool(path.with_suffix(".spool"))
    spool.create()
    journal = RoundJournal.create(path, {"round": "r"})
    writer = journal.spool.writer("c")
    writer.write(b"abc")
    writer.seal()
    journal.discard()
    assert not path.exists() and not spool.directory.exists()


def test_round_state_table_is_unchanged_by_block_wise_settling() -> None:
    """accept_summed is the ACCEPT event: legal exactly where accept is."""
    for state in RoundState:
        r = Round("r", 2, 1, opened_at=0.0)
        r.reserve("a")
        r.state = state
        legal = state in (RoundState.OPEN, RoundState.CLOSING)
        if legal:
            r.accept_summed("a", ShareKind.FULL, b"d" * 16)
            assert "a" in r.accepted
        else:
            with pytest.raises(IllegalTransition):
                r.accept_summed("a", ShareKind.FULL, b"d" * 16)
            assert "a" not in r.accepted and r.state is state
