"""The round state machine (every state x event pair), upload decisions, client-set agreement."""

from __future__ import annotations

import copy
import itertools
import random
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg.core import codec, rounds, sharing
from mpc_agg.core.protocol import PartyView
from mpc_agg.core.rounds import (
    Agreement,
    Round,
    RoundEvent,
    RoundState,
    agree_client_set,
    upload_digest,
)
from mpc_agg.core.sharing import Share, ShareKind
from mpc_agg.errors import (
    AgreementFailed,
    ConflictingShare,
    DimensionMismatch,
    IllegalTransition,
    RoundEnded,
    RoundNotOpen,
    UploadInProgress,
)

P_REF = 2**61 - 1
DIM = 3

# Written out from the diagram in rounds.py, independently of rounds.TRANSITIONS.
EXPECTED_TRANSITIONS = {
    (RoundState.OPEN, RoundEvent.CLOSE): RoundState.CLOSING,
    (RoundState.CLOSING, RoundEvent.AGREE): RoundState.AGGREGATING,
    (RoundState.AGGREGATING, RoundEvent.REVEAL): RoundState.DONE,
    (RoundState.OPEN, RoundEvent.FAIL): RoundState.FAILED,
    (RoundState.CLOSING, RoundEvent.FAIL): RoundState.FAILED,
    (RoundState.AGGREGATING, RoundEvent.FAIL): RoundState.FAILED,
    (RoundState.OPEN, RoundEvent.RESERVE): RoundState.OPEN,
    (RoundState.OPEN, RoundEvent.ACCEPT): RoundState.OPEN,
    (RoundState.CLOSING, RoundEvent.ACCEPT): RoundState.CLOSING,
    (RoundState.OPEN, RoundEvent.RELEASE): RoundState.OPEN,
    (RoundState.CLOSING, RoundEvent.RELEASE): RoundState.CLOSING,
    (RoundState.FAILED, RoundEvent.RELEASE): RoundState.FAILED,
    (RoundState.OPEN, RoundEvent.REQUEST_CLOSE): RoundState.OPEN,
    (RoundState.OPEN, RoundEvent.WITHDRAW_CLOSE): RoundState.OPEN,
    (RoundState.DONE, RoundEvent.EXPIRE): RoundState.DONE,
}


def arr(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def full(vector: list[int], aggregator: int = 0) -> Share:
    return Share(aggregator, ShareKind.FULL, len(vector), vector=arr(vector))


def upload(r: Round, client_id: str, vector: list[int]) -> bool:
    """What an aggregator does with an upload: check, reserve, accept; False for a retry."""
    share = full(vector)
    digest = upload_digest(codec.encode_share(share))
    if not r.check_upload(client_id, share, digest):
        return False
    r.reserve(client_id)
    r.accept(client_id, share, digest, share.vector)
    return True


def round_in(state: RoundState) -> Round:
    """A round with two accepted clients, brought to ``state`` by legal events only."""
    r = Round("r1", DIM, 1, opened_at=0.0)
    upload(r, "alice", [1, 2, P_REF - 1])
    upload(r, "bob", [10, 20, 30])
    if state is RoundState.OPEN:
        return r
    if state is RoundState.FAILED:
        r.fail("test failure")
        return r
    r.close()
    if state is RoundState.CLOSING:
        return r
    r.agree(frozenset({"alice", "bob"}), [])
    if state is RoundState.AGGREGATING:
        return r
    r.reveal(arr([11, 22, 29]))
    assert state is RoundState.DONE
    return r


def snapshot(r: Round) -> tuple:
    return (
        r.state,
        set(r.pending),
        r.close_requested,
        r.expired,
        r.failure,
        None if r.total is None else [int(v) for v in r.total],
        r.num_clients,
        r.dropped_clients,
        dict(r.accepted),
        None if r.sum is None else [int(v) for v in r.local_sum()],
        None if r.sum is None else r.sum.count,
        copy.deepcopy(r.status()),
    )


def fire(r: Round, event: RoundEvent) -> None:
    """Drive ``event`` through the Round method, with arguments valid in any state."""
    carol = full([5, 5, 5])
    actions: dict[RoundEvent, Callable[[], object]] = {
        RoundEvent.CLOSE: r.close,
        RoundEvent.AGREE: lambda: r.agree(frozenset(r.accepted), []),
        RoundEvent.REVEAL: lambda: r.reveal(arr([1, 2, 3])),
        RoundEvent.FAIL: lambda: r.fail("boom"),
        RoundEvent.RESERVE: lambda: r.reserve("carol"),
        RoundEvent.ACCEPT: lambda: r.accept("carol", carol, b"d" * 16, carol.vector),
        RoundEvent.RELEASE: lambda: r.release("carol"),
        RoundEvent.REQUEST_CLOSE: r.request_close,
        RoundEvent.WITHDRAW_CLOSE: r.withdraw_close,
        RoundEvent.EXPIRE: r.expire,
    }
    actions[event]()


def prepared(state: RoundState, event: RoundEvent) -> Round:
    """``round_in(state)``, with an upload of carol in progress where the event settles one
    (reserved before the close, as the ingest threads leave it)."""
    r = round_in(state)
    if event in (RoundEvent.ACCEPT, RoundEvent.RELEASE):
        r.pending.add("carol")
    return r


# --------------------------------------------------------------------------- the table


def test_transition_table_matches_design() -> None:
    assert rounds.TRANSITIONS == EXPECTED_TRANSITIONS
    assert rounds.TERMINAL == {RoundState.DONE, RoundState.FAILED}
    # A terminal state only ever leads to itself (bookkeeping events).
    assert all(t == s for (s, _), t in rounds.TRANSITIONS.items() if s in rounds.TERMINAL)


@pytest.mark.parametrize("state", list(RoundState))
def test_round_in_builds_the_state(state: RoundState) -> None:
    assert round_in(state).state is state


@pytest.mark.parametrize(
    ("state", "event"), list(itertools.product(list(RoundState), list(RoundEvent)))
)
def test_every_state_event_pair(state: RoundState, event: RoundEvent) -> None:
    r = prepared(state, event)
    before = snapshot(r)
    target = rounds.TRANSITIONS.get((state, event))
    assert target == EXPECTED_TRANSITIONS.get((state, event))
    if target is None:
        with pytest.raises(IllegalTransition, match=f"{event.value!r}.*{state.value!r}"):
            fire(r, event)
        assert snapshot(r) == before
    else:
        fire(r, event)
        assert r.state is target
        if event is RoundEvent.FAIL:
            assert r.failure == "boom"
            assert r.total is None
        if event is RoundEvent.REVEAL:
            assert [int(v) for v in r.total] == [1, 2, 3]
        if event is RoundEvent.AGREE:
            assert r.num_clients == 2 and r.dropped_clients == ()
        if event is RoundEvent.RESERVE:
            assert r.pending == {"carol"}
        if event is RoundEvent.ACCEPT:
            assert "carol" in r.accepted and not r.pending
        if event is RoundEvent.RELEASE:
            assert not r.pending and "carol" not in r.accepted
        if event is RoundEvent.REQUEST_CLOSE:
            assert r.close_requested and r.request_close() is False  # idempotent
        if event is RoundEvent.WITHDRAW_CLOSE:
            assert not r.close_requested
        if event is RoundEvent.EXPIRE:
            assert r.expired and r.total is None


# --------------------------------------------------------------------------- check_upload


def test_check_upload_new_and_identical_retry() -> None:
    r = Round("r1", DIM, 1, opened_at=0.0)
    share = full([1, 2, 3])
    digest = upload_digest(codec.encode_share(share))
    assert r.check_upload("alice", share, digest) is True
    assert r.accepted == {}  # check_upload alone changes nothing
    r.reserve("alice")
    r.accept("alice", share, digest, share.vector)
    assert r.check_upload("alice", share, digest) is False
    assert r.accepted["alice"].digest == digest
    assert r.accepted["alice"].kind is ShareKind.FULL


@pytest.mark.parametrize(
    "state", [RoundState.CLOSING, RoundState.AGGREGATING, RoundState.DONE, RoundState.FAILED]
)
def test_identical_retry_after_close_is_a_no_op(state: RoundState) -> None:
    """A client retrying an upload that was accepted before close gets 'already have it',
    also once the round ended: its share was held (and counted, if the round is DONE)."""
    r = round_in(state)
    share = full([1, 2, P_REF - 1])
    assert r.check_upload("alice", share, upload_digest(codec.encode_share(share))) is False


@pytest.mark.parametrize("state", [RoundState.DONE, RoundState.FAILED])
def test_new_or_different_upload_after_end_is_round_ended(state: RoundState) -> None:
    r = round_in(state)
    for client, share in (("alice", full([9, 9, 9])), ("zoe", full([1, 2, 3]))):
        with pytest.raises(RoundEnded, match=state.value):
            r.check_upload(client, share, upload_digest(codec.encode_share(share)))


@pytest.mark.parametrize("state", [RoundState.CLOSING, RoundState.AGGREGATING])
def test_conflicting_after_close_is_conflict(state: RoundState) -> None:
    r = round_in(state)
    share = full([9, 9, 9])
    with pytest.raises(ConflictingShare, match="alice"):
        r.check_upload("alice", share, upload_digest(codec.encode_share(share)))


def refusals() -> list[tuple[RoundState, str, Share, type[Exception]]]:
    other = full([5, 5, 5])
    return [
        (RoundState.OPEN, "alice", other, ConflictingShare),
        (RoundState.OPEN, "carol", full([1, 2]), DimensionMismatch),
        (RoundState.OPEN, "carol", full([1, 2, 3, 4]), DimensionMismatch),
        (RoundState.CLOSING, "carol", other, RoundNotOpen),
        (RoundState.AGGREGATING, "carol", other, RoundNotOpen),
        (RoundState.DONE, "carol", other, RoundEnded),
        (RoundState.FAILED, "carol", other, RoundEnded),
        (RoundState.DONE, "alice", other, RoundEnded),
    ]


@pytest.mark.parametrize(("state", "client", "share", "error"), refusals())
def test_refused_upload_changes_nothing(
    state: RoundState, client: str, share: Share, error: type[Exception]
) -> None:
    r = round_in(state)
    before = snapshot(r)
    digest = upload_digest(codec.encode_share(share))
    with pytest.raises(error) as err:
        r.check_upload(client, share, digest)
    if error is RoundNotOpen:
        assert type(err.value) is RoundNotOpen  # not its subclass RoundEnded
    with pytest.raises(IllegalTransition):  # never reserved, so never accepted
        r.accept(client, share, digest, share.vector)
    assert snapshot(r) == before


def test_identical_retry_does_not_double_count() -> None:
    r = Round("r1", DIM, 1, opened_at=0.0)
    assert upload(r, "alice", [1, 2, 3]) is True
    assert upload(r, "alice", [1, 2, 3]) is False
    with pytest.raises(ConflictingShare):
        upload(r, "alice", [1, 2, 4])
    assert [int(v) for v in r.local_sum()] == [1, 2, 3]
    assert r.sum.count == 1


def test_reserved_upload_blocks_the_same_client_and_counts_toward_occupancy() -> None:
    r = Round("r1", DIM, 1, opened_at=0.0)
    share = full([1, 2, 3])
    digest = upload_digest(codec.encode_share(share))
    assert r.check_upload("alice", share, digest)
    r.reserve("alice")
    assert r.occupancy == 1 and r.accepted == {}
    with pytest.raises(UploadInProgress):
        r.check_upload("alice", share, digest)
    with pytest.raises(IllegalTransition):
        r.reserve("alice")
    r.release("alice")  # refused after all: nothing remains
    assert r.occupancy == 0 and r.pending == set()
    assert [int(v) for v in r.local_sum()] == [0, 0, 0]
    assert upload(r, "alice", [1, 2, 3]) is True


def test_upload_reserved_before_close_settles_in_closing_and_blocks_agreement() -> None:
    r = Round("r1", DIM, 1, opened_at=0.0)
    upload(r, "bob", [5, 5, 5])
    share = full([1, 2, 3])
    digest = upload_digest(codec.encode_share(share))
    assert r.check_upload("alice", share, digest)
    r.reserve("alice")
    r.close()
    with pytest.raises(IllegalTransition, match="in progress"):
        r.agree(frozenset({"bob"}), [])
    r.accept("alice", share, digest, share.vector)  # legal in CLOSING
    r.agree(frozenset({"alice", "bob"}), [])
    assert [int(v) for v in r.local_sum()] == [6, 7, 8]
    with pytest.raises(IllegalTransition):  # too late once agreed
        r.reserve("carol")
        r.accept("carol", share, digest, share.vector)


def test_accept_remembers_seed_not_vector() -> None:
    r = Round("r1", DIM, 1, opened_at=0.0)
    share = Share(1, ShareKind.SEED, DIM, seed=bytes(range(16)))
    vector = share.expand("r1", "alice")
    r.reserve("alice")
    r.accept("alice", share, b"d" * 32, vector, ref="journal-ref")
    acc = r.accepted["alice"]
    assert (acc.kind, acc.seed, acc.ref) == (ShareKind.SEED, bytes(range(16)), "journal-ref")
    assert bytes(range(16)).hex() not in repr(acc) and "digest" not in repr(acc)
    assert [int(v) for v in r.local_sum()] == [int(v) for v in vector]


# --------------------------------------------------------------------------- agree


@settings(max_examples=60)
@given(
    st.lists(
        st.lists(st.integers(0, P_REF - 1), min_size=DIM, max_size=DIM), min_size=1, max_size=12
    ),
    st.data(),
)
def test_agree_subtracts_dropped(vectors: list[list[int]], data: st.DataObject) -> None:
    clients = [f"c{i}" for i in range(len(vectors))]
    keep = data.draw(st.sets(st.sampled_from(clients)))
    r = Round("r1", DIM, 1, opened_at=0.0)
    for c, v in zip(clients, vectors, strict=True):
        upload(r, c, v)
    r.close()
    dropped = [arr(v) for c, v in zip(clients, vectors, strict=True) if c not in keep]
    random.Random(len(keep)).shuffle(dropped)  # "in any order"
    r.agree(frozenset(keep), dropped)
    kept = [v for c, v in zip(clients, vectors, strict=True) if c in keep]
    expected = [sum(v[i] for v in kept) % P_REF for i in range(DIM)]
    assert [int(v) for v in r.local_sum()] == expected
    assert r.num_clients == len(keep)
    assert r.dropped_clients == tuple(sorted(set(clients) - keep))
    assert r.state is RoundState.AGGREGATING


@pytest.mark.parametrize(
    ("keep", "n_dropped", "message"),
    [
        ({"alice", "zed"}, 1, "subset"),
        ({"alice"}, 0, "1 dropped shares to subtract, got 0"),
        ({"alice"}, 2, "1 dropped shares to subtract, got 2"),
        (set(), 1, "2 dropped shares to subtract, got 1"),
    ],
)
def test_agree_bad_arguments_change_nothing(keep: set[str], n_dropped: int, message: str) -> None:
    r = round_in(RoundState.CLOSING)
    before = snapshot(r)
    with pytest.raises(IllegalTransition, match=message):
        r.agree(frozenset(keep), [arr([1, 2, 3])] * n_dropped)
    assert snapshot(r) == before


def test_agree_with_wrong_shape_dropped_vector_changes_nothing() -> None:
    r = round_in(RoundState.CLOSING)
    before = snapshot(r)
    with pytest.raises((IllegalTransition, ValueError)):
        r.agree(frozenset({"alice"}), [arr([1, 2, 3, 4])])
    assert snapshot(r) == before


def test_federation_of_rounds_reveals_the_kept_total() -> None:
    """m aggregators, partial uploads dropped everywhere: the revealed total is exact."""
    m = 3
    rng = random.Random(7)
    xs = {f"client-{i}": [rng.randrange(P_REF) for _ in range(DIM)] for i in range(8)}
    aggs = [Round("r1", DIM, 2, opened_at=0.0) for _ in range(m)]
    missing = {"client-1": 0, "client-5": 2}  # client -> aggregator its upload never reached
    shares: dict[str, list[Share]] = {}
    for cid, x in xs.items():
        shares[cid] = sharing.shard(arr(x), "r1", cid, m)
        for j, s in enumerate(shares[cid]):
            if missing.get(cid) == j:
                continue
            body = codec.encode_share(s)
            got = codec.decode_share(body, aggregator=j, dim=DIM)
            aggs[j].reserve(cid)
            aggs[j].accept(cid, got, upload_digest(body), got.expand("r1", cid))
    for r in aggs:
        r.close()
    views = [PartyView("r1", r.dim, 0, frozenset(r.accepted)) for r in aggs]
    agreement = agree_client_set(views, min_clients=2)
    assert agreement.dropped == frozenset(missing)
    for j, r in enumerate(aggs):
        dropped = [shares[c][j].expand("r1", c) for c in r.accepted if c not in agreement.clients]
        elsewhere = agreement.dropped - r.accepted.keys()
        r.agree(agreement.clients, dropped, dropped_elsewhere=frozenset(elsewhere))
        # Every aggregator lists the same dropped clients, seen locally or not.
        assert r.dropped_clients == ("client-1", "client-5")
    total = sharing.unshard([r.local_sum() for r in aggs])
    expected = [sum(xs[c][i] for c in agreement.clients) % P_REF for i in range(DIM)]
    assert [int(v) for v in total] == expected
    for r in aggs:
        r.reveal(total)
        assert r.state is RoundState.DONE and r.num_clients == 6


# --------------------------------------------------------------------------- agree_client_set


def view(clients: set[str], dim: int | None = DIM, round_id: str = "r1") -> PartyView:
    return PartyView(round_id, dim, 0, frozenset(clients))


def test_agree_client_set_intersection_and_dropped() -> None:
    views = [view({"a", "b", "c", "d"}), view({"a", "b", "c", "e"}), view({"a", "c", "d", "f"})]
    got = agree_client_set(views, min_clients=2)
    assert got == Agreement(frozenset({"a", "c"}), frozenset({"b", "d", "e", "f"}))


@given(st.lists(st.sets(st.sampled_from("abcdefgh")), min_size=1, max_size=5))
def test_agree_client_set_property(sets: list[set[str]]) -> None:
    common = set.intersection(*sets)
    union = set.union(*sets)
    views = [view(s) for s in sets]
    if len(common) >= 2:
        got = agree_client_set(views, min_clients=2)
        assert got.clients == common and got.dropped == union - common
        # Every party, holding its own copy of the same views, decides the same.
        for _ in range(len(views)):
            copies = [
                PartyView(v.round_id, v.dim, 0, frozenset(sorted(v.clients, reverse=True)))
                for v in views
            ]
            assert agree_client_set(copies, min_clients=2) == got
    else:
        with pytest.raises(AgreementFailed, match="nothing is revealed"):
            agree_client_set(views, min_clients=2)


def test_agree_client_set_min_clients_boundary() -> None:
    views = [view({"a", "b", "c"}), view({"a", "b", "c", "x"})]
    assert agree_client_set(views, min_clients=3).clients == {"a", "b", "c"}
    with pytest.raises(AgreementFailed) as err:
        agree_client_set(views, min_clients=4)
    msg = str(err.value)
    assert "only 3 client(s)" in msg and "1 partial" in msg and "min_clients is 4" in msg
    assert "nothing is revealed" in msg


def test_agree_client_set_unknown_round() -> None:
    with pytest.raises(AgreementFailed, match="unknown at aggregator 1"):
        agree_client_set([view({"a"}), view(set(), dim=None), view({"a"})], min_clients=1)


def test_agree_client_set_dim_mismatch() -> None:
    with pytest.raises(AgreementFailed, match="different dimensions.*aggregator 2: 4"):
        agree_client_set([view({"a"}), view({"a"}), view({"a"}, dim=4)], min_clients=1)


def test_agree_client_set_round_mismatch() -> None:
    with pytest.raises(AgreementFailed, match="aggregator 1 answered for round 'r2'"):
        agree_client_set([view({"a"}), view({"a"}, round_id="r2")], min_clients=1)


def test_agree_client_set_no_views() -> None:
    with pytest.raises(AgreementFailed):
        agree_client_set([], min_clients=1)


# --------------------------------------------------------------------------- misc


def test_upload_digest_distinguishes_bodies() -> None:
    a = codec.encode_share(full([1, 2, 3]))
    b = codec.encode_share(full([1, 2, 4]))
    assert upload_digest(a) == upload_digest(bytes(a))
    assert upload_digest(a) != upload_digest(b)
    assert len(upload_digest(a)) == 16


def test_status_reports_counts_not_contents() -> None:
    r = round_in(RoundState.AGGREGATING)
    s = r.status()
    assert s["state"] == "aggregating" and s["accepted"] == 2 and s["num_clients"] == 2
    assert s["dim"] == DIM and s["failure"] is None
    assert "alice" not in repr(s) and str(P_REF - 1) not in repr(s)


def test_an_ended_round_frees_its_running_sum_but_keeps_the_total() -> None:
    r = Round("r1", DIM, 1, opened_at=0.0)
    upload(r, "alice", [1, 2, 3])
    with pytest.raises(IllegalTransition, match="not ended"):
        r.free_sum()
    r.close()
    r.agree(frozenset({"alice"}), [])
    r.reveal(arr([1, 2, 3]))
    r.free_sum()
    assert [int(v) for v in r.total] == [1, 2, 3]
    with pytest.raises(IllegalTransition, match="freed its running sum"):
        r.local_sum()
