"""All roles in one process, without sockets: three Aggregator objects linked by the
in-memory party network (:mod:`mpc_agg.mpc.memory`: FIFO per link, like MPyC's
program-counter matching when every party makes the same calls), fed with real client
upload bodies."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mpc_agg import Client, Topology
from mpc_agg.aggregator import Aggregator
from mpc_agg.aggregator import ingest as ingest_module
from mpc_agg.aggregator.ingest import expected_kind
from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.core import codec
from mpc_agg.core.codec import decode_result
from mpc_agg.core.field import to_signed
from mpc_agg.core.rounds import RoundState
from mpc_agg.core.sharing import Share, ShareKind, full_share_index
from mpc_agg.core.statement import (
    SignedStatement,
    clients_digest,
    total_digest,
    verify_result,
    verify_signature,
)
from mpc_agg.errors import (
    ConflictingShare,
    MalformedUpload,
    NotLeader,
    ResultExpired,
    ResultNotReady,
    RoundAborted,
    RoundEnded,
    RoundFull,
    UploadInProgress,
)
from mpc_agg.mpc.memory import memory_networks

from .conftest import topology_doc


def make_federation(
    tmp_path: Path,
    m: int = 3,
    signing_keys: list[Ed25519PrivateKey] | None = None,
    **doc_changes: Any,
) -> list[Aggregator]:
    doc = topology_doc(m, (m - 1) // 2, name="inproc")
    doc["data_dir"] = str(tmp_path / "data")
    doc.update(doc_changes)
    topo = Topology.from_dict(doc)
    keys = signing_keys or [None] * m
    return [
        Aggregator(topo, i, net, signing_key=keys[i]) for i, net in enumerate(memory_networks(m))
    ]


async def run_round(aggs: list[Aggregator], round_id: str) -> None:
    """Run every party's command loop until ``round_id`` ends everywhere (bounded)."""
    tasks = [asyncio.ensure_future(a.serve_commands()) for a in aggs]
    try:
        aggs[0].request_close(round_id)
        for _ in range(1000):
            if all(
                a.rounds[round_id].state in (RoundState.DONE, RoundState.FAILED)
                for a in aggs
                if round_id in a.rounds
            ):
                return
            await asyncio.sleep(0.005)
        raise AssertionError("round did not end")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def submit(
    aggs: list[Aggregator],
    round_id: str,
    client_id: str,
    x: np.ndarray,
    to: list[int] | None = None,
) -> None:
    bodies = Client(aggs[0].topology, client_id).prepare(round_id, x)
    for i in to if to is not None else range(len(aggs)):
        assert aggs[i].receive_share(round_id, client_id, bodies[i]) is True


def ints(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1001, size=(n, d)).astype(np.float64)


def total_of(agg: Aggregator, round_id: str) -> np.ndarray:
    field_total, meta = decode_result(agg.result(round_id))
    return to_signed(field_total) / 2.0 ** meta["frac_bits"]


def test_round_with_partial_clients(tmp_path):
    async def go() -> None:
        aggs = make_federation(tmp_path)
        for a in aggs:
            assert a.open_round("r", 16) is True
            assert a.open_round("r", 16) is False
        data = ints(5, 16, seed=1)
        for i in range(3):
            submit(aggs, "r", f"c{i}", data[i])
        submit(aggs, "r", "partial-a", data[3], to=[0, 1])
        submit(aggs, "r", "partial-b", data[4], to=[2])
        with pytest.raises(ResultNotReady):
            aggs[0].result("r")
        await run_round(aggs, "r")
        for a in aggs:
            assert a.rounds["r"].state is RoundState.DONE
            assert a.rounds["r"].dropped_clients == ("partial-a", "partial-b")
            np.testing.assert_array_equal(total_of(a, "r"), data[:3].sum(axis=0))
            assert not (a.topology.aggregator_dir(a.index) / "round-r.journal").exists()
            assert a.metrics["rounds_done"] == 1

    asyncio.run(go())


def test_too_few_complete_clients_fails_everywhere(tmp_path):
    async def go() -> None:
        aggs = make_federation(tmp_path)
        for a in aggs:
            a.open_round("r", 4)
        data = ints(2, 4, seed=2)
        submit(aggs, "r", "c0", data[0])
        submit(aggs, "r", "c1", data[1], to=[0, 2])
        await run_round(aggs, "r")
        for a in aggs:
            assert a.rounds["r"].state is RoundState.FAILED
            assert a.rounds["r"].total is None
            with pytest.raises(RoundAborted, match="min_clients is 2"):
                a.result("r")

    asyncio.run(go())


def test_refused_uploads_change_nothing(tmp_path):
    async def go() -> None:
        aggs = make_federation(
            tmp_path, rounds={"min_clients": 2, "max_clients": 2, "max_dim": 100}
        )
        for a in aggs:
            a.open_round("r", 4)
        data = ints(4, 4, seed=3)
        submit(aggs, "r", "c0", data[0])
        before = [a.rounds["r"].local_sum().copy() for a in aggs]
        other = Client(aggs[0].topology, "c0").prepare("r", data[1])
        for a in aggs:
            with pytest.raises(ConflictingShare):
                a.receive_share("r", "c0", other[a.index])
        np.testing.assert_array_equal([a.rounds["r"].local_sum() for a in aggs], before)
        submit(aggs, "r", "c1", data[2])
        full = Client(aggs[0].topology, "c2").prepare("r", data[3])
        with pytest.raises(RoundFull, match="max_clients = 2"):
            aggs[0].receive_share("r", "c2", full[0])
        assert aggs[0].metrics["uploads_refused"] == 2
        with pytest.raises(NotLeader, match="aggregator 0"):
            aggs[1].request_close("r")
        await run_round(aggs, "r")
        np.testing.assert_array_equal(total_of(aggs[1], "r"), data[0] + data[2])

    asyncio.run(go())


def test_rounds_run_one_after_another_on_one_network(tmp_path):
    async def go() -> None:
        aggs = make_federation(tmp_path, m=2, threshold=0)
        for rid in ("a", "b"):
            for a in aggs:
                a.open_round(rid, 3)
        data = ints(4, 3, seed=4)
        for i in range(2):
            submit(aggs, "a", f"x{i}", data[i])
            submit(aggs, "b", f"x{i}", data[i + 2])
        await run_round(aggs, "a")
        await run_round(aggs, "b")
        np.testing.assert_array_equal(total_of(aggs[0], "a"), data[:2].sum(axis=0))
        np.testing.assert_array_equal(total_of(aggs[1], "b"), data[2:].sum(axis=0))

    asyncio.run(go())


def test_local_failure_after_agreement_fails_everywhere_and_keeps_parties_in_step(tmp_path):
    async def go() -> None:
        aggs = make_federation(tmp_path)
        for a in aggs:
            a.open_round("r", 8)
            a.open_round("next", 8)
        data = ints(4, 8, seed=5)
        for i in range(3):
            submit(aggs, "r", f"c{i}", data[i])
        # A partial client whose FULL share reached only aggregator 1 (so 1 must re-read it
        # from its journal to subtract it), then that journal loses its bytes.
        cid = next(f"p{k}" for k in range(100) if full_share_index(f"p{k}", 3) == 1)
        submit(aggs, "r", cid, data[3], to=[1])
        journal = aggs[1].topology.aggregator_dir(1) / "round-r.journal"
        os.truncate(journal, 10)
        await run_round(aggs, "r")
        for a in aggs:
            assert a.rounds["r"].state is RoundState.FAILED
            assert "aggregator(s) [1] could not compute" in a.rounds["r"].failure
            assert a.rounds["r"].total is None
        for i in range(2):
            submit(aggs, "next", f"n{i}", data[i])
        await run_round(aggs, "next")
        for a in aggs:
            np.testing.assert_array_equal(total_of(a, "next"), data[:2].sum(axis=0))

    asyncio.run(go())


# --------------------------------------------------------------------------- threaded ingest


def test_async_ingest_round_is_exact_and_close_waits_for_uploads_in_progress(tmp_path):
    """The party's upload path (:meth:`receive_share_async`, O(d) work on ingest threads):
    uploads still being processed when the close arrives are finished and counted, so the
    client set every party reports is final, and the total is exact."""
    aggs = make_federation(tmp_path)
    for a in aggs:
        a.open_round("r", 2000)
    xs = ints(8, 2000, seed=7)
    bodies = {
        f"c{k}": Client(aggs[0].topology, f"c{k}").prepare("r", xs[k]) for k in range(len(xs))
    }

    async def main() -> None:
        uploads = [
            asyncio.ensure_future(a.receive_share_async("r", cid, b[a.index]))
            for cid, b in bodies.items()
            for a in aggs
        ]
        await asyncio.sleep(0)  # every upload is admitted and reserved; none has finished
        assert all(len(a.rounds["r"].pending) == len(xs) for a in aggs)
        await run_round(aggs, "r")  # the close is requested while they are in progress
        assert all(await asyncio.gather(*uploads))

    asyncio.run(main())
    for a in aggs:
        assert a.rounds["r"].state is RoundState.DONE
        assert a.rounds["r"].num_clients == len(xs)
        assert a.rounds["r"].pending == set()
        assert np.array_equal(total_of(a, "r"), xs.sum(axis=0))


def test_async_ingest_same_client_twice_at_once_is_busy_then_a_retry(tmp_path):
    aggs = make_federation(tmp_path)
    agg = aggs[0]
    agg.open_round("r", 100)
    body = Client(agg.topology, "c0").prepare("r", np.ones(100))[0]

    async def main() -> tuple[object, object, bool]:
        first = asyncio.ensure_future(agg.receive_share_async("r", "c0", body))
        second = asyncio.ensure_future(agg.receive_share_async("r", "c0", body))
        got = await asyncio.gather(first, second, return_exceptions=True)
        again = await agg.receive_share_async("r", "c0", body)
        return got[0], got[1], again

    first, second, again = asyncio.run(main())
    assert first is True
    assert isinstance(second, UploadInProgress) and "being processed" in str(second)
    assert again is False  # an identical retry once the first is settled
    assert sorted(agg.rounds["r"].accepted) == ["c0"] and agg.rounds["r"].sum.count == 1


def test_async_ingest_refused_values_release_the_reservation(tmp_path):
    """A FULL share with a value >= p is refused on the ingest thread: the reservation is
    given up, nothing is journaled or added, and a correct upload of that client works."""
    aggs = make_federation(tmp_path)
    a = aggs[full_share_index("c0", 3)]
    a.open_round("r", 10)
    good = Client(a.topology, "c0").prepare("r", np.arange(10.0))[a.index]
    bad = bytearray(good)
    bad[12:20] = (2**61 - 1).to_bytes(8, "little")  # the first value is p itself

    async def main() -> bool:
        with pytest.raises(MalformedUpload, match="index 0 is not below p"):
            await a.receive_share_async("r", "c0", bad)
        rnd = a.rounds["r"]
        assert rnd.pending == set() and rnd.accepted == {} and rnd.sum.count == 0
        return await a.receive_share_async("r", "c0", good)

    assert asyncio.run(main()) is True
    assert a.metrics["uploads_refused"] == 1 and a.metrics["uploads_accepted"] == 1


def test_only_the_last_keep_results_totals_are_kept(tmp_path):
    """Each ended round holds its total (8·d bytes); beyond ``rounds.keep_results`` the
    oldest is dropped and its result answers a clear 410, while newer ones still serve."""
    aggs = make_federation(
        tmp_path, rounds={"min_clients": 2, "max_clients": 100, "max_dim": 1000, "keep_results": 2}
    )
    xs = ints(2, 10, seed=3)

    async def three_rounds() -> None:  # one event loop: the in-memory links belong to it
        for r in ("r1", "r2", "r3"):
            for a in aggs:
                a.open_round(r, 10)
            for k, x in enumerate(xs):
                submit(aggs, r, f"c{k}", x)
            await run_round(aggs, r)

    asyncio.run(three_rounds())
    with pytest.raises(ResultExpired, match="keep_results = 2"):
        aggs[0].result("r1")
    for r in ("r2", "r3"):
        assert np.array_equal(total_of(aggs[0], r), xs.sum(axis=0))
    assert aggs[0].rounds["r1"].state is RoundState.DONE and aggs[0].rounds["r1"].total is None


def test_cancelled_close_while_uploads_are_ingested_fails_the_round_cleanly(tmp_path, monkeypatch):
    """The party network is lost (its supervisor cancels the aggregation) while the close
    waits for an upload still on an ingest thread: the round FAILs instead of staying
    CLOSING, the late upload is refused and not counted, and the journal is ended and
    deleted only once no thread can write to it."""
    import threading

    aggs = make_federation(tmp_path)
    leader = aggs[0]
    leader.open_round("r", 50)
    body = Client(leader.topology, "c0").prepare("r", np.ones(50))[0]
    gate = threading.Event()
    real_ingest = leader.ingest._write

    def slow_ingest(*args):
        gate.wait(10)
        return real_ingest(*args)

    leader.ingest._write = slow_ingest  # type: ignore[method-assign]
    monkeypatch.setattr(ingest_module, "INLINE_BYTES", 0)  # on an ingest thread, not the loop
    journal_path = leader.store.journals["r"].path

    async def main() -> object:
        upload = asyncio.ensure_future(leader.receive_share_async("r", "c0", body))
        await asyncio.sleep(0)
        assert leader.rounds["r"].pending == {"c0"}
        closing = asyncio.ensure_future(leader.aggregate("r"))
        await asyncio.sleep(0.05)  # the close is waiting for the upload in progress
        assert leader.rounds["r"].state is RoundState.CLOSING
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert leader.rounds["r"].state is RoundState.FAILED
        assert journal_path.exists()  # a thread may still write to it
        gate.set()
        outcome = await asyncio.gather(upload, return_exceptions=True)
        for _ in range(200):  # the journal is ended once the upload settled
            if not journal_path.exists():
                break
            await asyncio.sleep(0.01)
        return outcome[0]

    outcome = asyncio.run(main())
    assert isinstance(outcome, RoundEnded) and "not counted" in str(outcome)
    rnd = leader.rounds["r"]
    assert rnd.pending == set() and rnd.accepted == {}
    assert "network was lost" in (rnd.failure or "")
    assert not journal_path.exists()
    assert not leader.rounds["r"].close_requested


# --------------------------------------------------------------------------- share kinds


def test_each_aggregator_accepts_only_the_kind_of_share_it_is_owed(tmp_path):
    """A client's FULL share goes to ``full_share_index``, SEED shares everywhere else: a
    share of the other kind is refused (nothing changes), and the upload limit before the
    body is read is the size of the kind owed."""
    aggs = make_federation(tmp_path)
    dim = 40
    for a in aggs:
        a.open_round("r", dim)
    clients = [f"k{n}" for n in range(30)]
    assert {full_share_index(c, 3) for c in clients} == {0, 1, 2}
    for cid in clients:
        full = full_share_index(cid, 3)
        for a in aggs:
            kind = expected_kind(cid, a.index, 3)
            assert kind is (ShareKind.FULL if a.index == full else ShareKind.SEED)
            assert a.upload_limit("r", cid) == codec.share_body_length(kind, dim)
            if kind is ShareKind.FULL:
                wrong = codec.encode_share(Share(a.index, ShareKind.SEED, dim, seed=bytes(16)))
                words = f"must send a full share to this aggregator.*aggregator {full}"
            else:
                vector = np.zeros(dim, dtype=np.uint64)
                wrong = codec.encode_share(Share(a.index, ShareKind.FULL, dim, vector=vector))
                words = f"must send a seed share to this aggregator.*aggregator {full}"
            with pytest.raises(MalformedUpload, match=words):
                a.receive_share("r", cid, wrong)
    for a in aggs:
        assert a.rounds["r"].accepted == {} and a.rounds["r"].sum.count == 0
        assert a.metrics["uploads_refused"] == len(clients)
    submit(aggs, "r", clients[0], np.ones(dim))  # the right kinds still go through
    assert all(a.rounds["r"].sum.count == 1 for a in aggs)


# --------------------------------------------------------------------------- statements


def test_statements_are_signed_agree_and_name_the_round(tmp_path):
    signing = [Ed25519PrivateKey.generate() for _ in range(3)]
    aggs = make_federation(tmp_path, signing_keys=signing)
    data = ints(3, 6, seed=9)

    async def go() -> None:
        for a in aggs:
            a.open_round("r", 6)
        for i in range(3):
            submit(aggs, "r", f"c{i}", data[i])
        submit(aggs, "r", "partial", data[0], to=[0])
        with pytest.raises(ResultNotReady):
            aggs[0].statement("r")
        await run_round(aggs, "r")

    asyncio.run(go())
    total, _ = decode_result(aggs[0].result("r"))
    signed = []
    for a in aggs:
        raw = a.statement("r")
        assert a.statement("r") is raw  # signed once, then served as is
        st = SignedStatement.from_json(raw)
        assert verify_signature(st, signing[a.index].public_key())
        body = st.statement
        assert (body.round_id, body.aggregator, body.dim, body.num_clients) == ("r", a.index, 6, 3)
        assert body.dropped_clients == 1
        assert body.topology_fingerprint == fingerprint(a.topology) == a.fingerprint
        assert body.total_digest == total_digest(total)
        assert body.clients_digest == clients_digest(["c0", "c1", "c2"])
        signed.append(st)
    keys = [k.public_key().public_bytes_raw() for k in signing]
    assert verify_result(total, signed, keys, aggs[0].fingerprint, "r") == signed[0].statement


def test_statement_refusals(tmp_path):
    aggs = make_federation(tmp_path, signing_keys=[Ed25519PrivateKey.generate()] * 3)
    unsigned = make_federation(tmp_path / "unsigned")

    async def go() -> None:
        for fed in (aggs, unsigned):
            for a in fed:
                a.open_round("lonely", 4)
                a.open_round("ok", 4)
            submit(fed, "lonely", "c0", np.ones(4))
            await run_round(fed, "lonely")
            submit(fed, "ok", "c0", np.ones(4))
            submit(fed, "ok", "c1", np.ones(4))
            await run_round(fed, "ok")

    asyncio.run(go())
    with pytest.raises(RoundAborted, match="min_clients is 2"):
        aggs[1].statement("lonely")
    assert SignedStatement.from_json(aggs[1].statement("ok"))
    with pytest.raises(ResultNotReady, match="no signing key"):
        unsigned[1].statement("ok")
