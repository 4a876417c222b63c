"""Recovery from journals that cannot be replayed as they stand (docs/design.md, "Durable
state" and "Streamed uploads"): two different shares of one client (a record whose commit
failed, then another upload), and a record that is whole and has its checksum but does
not parse (corrupt, not torn). Either fails the round (storage_failure): recovery never
picks one share, nor cuts acknowledged records off."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mpc_agg import Client
from mpc_agg.aggregator import Aggregator
from mpc_agg.core.ring import GF_P61
from mpc_agg.core.rounds import RoundState
from mpc_agg.storage.journal import RECORD_SHARE, RECORD_SPOOL

from .test_streamed_ingest import (
    close_all,
    federation,
    full_client,
    run,
    run_round,
    total_of,
    units,
    upload,
)
from .test_streamed_ingest_faults import PATHS, open_federation, refused_after_written, upload_all

LARGE = {"stream_above": 0, "stream_block": 8 * 128}


async def restarted(aggs: list[Aggregator], large: bool) -> list[Aggregator]:
    close_all(aggs)
    return federation(aggs[0].topology, **(LARGE if large else {}))


def assert_failed_here_and_elsewhere(again: list[Aggregator], words: str) -> None:
    rnd = again[0].rounds["r"]
    assert rnd.state is RoundState.FAILED and rnd.failure_code == "storage_failure"
    assert words in (rnd.failure or "")
    assert again[0].round_index.state("r") == "failed"
    assert not again[0].store.journal_path("r").exists()
    assert not again[0].store.spool("r").directory.exists()


@pytest.mark.parametrize("same", [False, True], ids=["different", "identical"])
@pytest.mark.parametrize("path", ["whole", "seed", "stream"])
def test_two_different_shares_of_one_client_in_a_journal_fail_the_round(
    tmp_path, path, same
) -> None:
    """Aggregator 0 wrote a client's record, its commit failed (507), and the client sent
    again: the same body (a retry) or a different one (new vector, new seeds). After a
    restart, identical records are one share and the round reveals exactly; different
    ones fail the round there (reconciliation fails it at the others), never a total with
    whichever share recovery would pick."""
    large, cid, _ = PATHS[path]
    d = 1000
    xs = units(3, d, 21, GF_P61)

    async def go() -> None:
        aggs = await open_federation(tmp_path, large, d)
        topo = aggs[0].topology
        await upload_all(aggs, "other", Client(topo, "other").prepare("r", xs[2]))
        first = await refused_after_written(aggs, path, xs[0])
        second = first if same else Client(topo, cid).prepare("r", xs[1])
        await upload_all(aggs, cid, second)
        again = await restarted(aggs, large)
        try:
            if same:
                assert [a.recover() for a in again] == [1, 1, 1]
                assert again[0].rounds["r"].sum_damaged is None  # the poison was in memory
                await run_round(again, "r")
                np.testing.assert_array_equal(total_of(again[0], "r"), xs[0] + xs[2])
                return
            assert again[0].recover() == 0
            assert_failed_here_and_elsewhere(again, "two different shares")
            assert again[1].recover() == 1 and again[2].recover() == 1
            await asyncio.gather(*(a.reconcile() for a in again))
            for a in again[1:]:
                assert a.rounds["r"].state is RoundState.FAILED
                assert a.rounds["r"].total is None
        finally:
            close_all(again)

    run(go())


def malformed(kind: int) -> bytes:
    """The payload of a SHARE or SPOOL record that is whole but does not parse."""
    cid = b"\xff\xfe"  # not UTF-8
    if kind == RECORD_SHARE:
        return len(cid).to_bytes(2, "little") + cid + b"body"
    bad = b"../etc"  # a path, never a spool file name
    return (
        b"".join([len(b"x").to_bytes(2, "little"), b"x", len(bad).to_bytes(2, "little"), bad])
        + (5).to_bytes(8, "little")
        + bytes(16)
    )


@pytest.mark.parametrize("kind", [RECORD_SPOOL, RECORD_SHARE], ids=["spool", "share"])
def test_a_corrupt_record_fails_the_round_instead_of_cutting_later_records(tmp_path, kind) -> None:
    """A record with a valid checksum that does not parse was written so, not torn by a
    crash: truncating there would drop the shares acknowledged after it. The round comes
    back failed (storage_failure) at that aggregator, and fails at the others."""
    d = 1000

    async def go() -> None:
        aggs = await open_federation(tmp_path, True, d)
        topo = aggs[0].topology
        xs = units(2, d, 3, GF_P61)
        await upload_all(aggs, full_client(0), Client(topo, full_client(0)).prepare("r", xs[0]))
        aggs[0].store.journals["r"]._append(kind, [malformed(kind)])  # noqa: SLF001
        late = full_client(0, skip=1)
        bodies = Client(topo, late).prepare("r", xs[1])
        for i, body in enumerate(bodies):  # acknowledged after the corrupt record
            assert await upload(aggs[i], "r", late, body) is True
        again = await restarted(aggs, True)
        try:
            assert again[0].recover() == 0
            assert_failed_here_and_elsewhere(again, "corrupt")
            assert again[1].recover() == 1 and again[2].recover() == 1
            await asyncio.gather(*(a.reconcile() for a in again))
            for a in again[1:]:
                assert a.rounds["r"].state is RoundState.FAILED
        finally:
            close_all(again)

    run(go())
