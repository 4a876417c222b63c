"""Party messages and the decisions taken from them (mpc_agg.core.protocol): exact codec,
pinned by the tuples that travel, malformed input refused, the same verdict from the same
messages."""

from __future__ import annotations

import pytest

from mpc_agg.core.protocol import (
    TAG,
    VERSION,
    CloseCommand,
    EndedRounds,
    OpenRounds,
    PartyView,
    ReadyVote,
    Refusal,
    decide_views,
    decide_votes,
    decode,
    decode_as,
    encode,
    ended_elsewhere,
    union_of_open,
)
from mpc_agg.errors import FAILURE_CODES, AgreementFailed, ProtocolViolation

PLAN = {"mechanism": "discrete_gaussian", "sigma2": 7, "d": 3}

# What travels, field by field.
VECTORS = [
    (CloseCommand("r1"), ("mpc_agg", 1, "close", "r1")),
    (
        PartyView("r1", 3, 2, frozenset({"b", "a"}), None, None),
        ("mpc_agg", 1, "view", "r1", 3, 2, ["a", "b"], None, None),
    ),
    (
        PartyView("r1", None, 0, frozenset(), Refusal("budget_exceeded", "over"), PLAN),
        ("mpc_agg", 1, "view", "r1", None, 0, [], ["budget_exceeded", "over"], PLAN),
    ),
    (ReadyVote(True), ("mpc_agg", 1, "vote", True)),
    (OpenRounds(("a", "b")), ("mpc_agg", 1, "open_rounds", ["a", "b"])),
    (EndedRounds(()), ("mpc_agg", 1, "ended_rounds", [])),
]


@pytest.mark.parametrize(("message", "wire"), VECTORS)
def test_codec_vectors(message, wire) -> None:
    assert encode(message) == wire
    assert decode(wire) == message


@pytest.mark.parametrize(
    "raw",
    [
        None,
        ("close", "r1"),  # the unversioned tuple of the previous release
        ("other", 1, "close", "r1"),
        (TAG, VERSION + 1, "close", "r1"),
        (TAG, VERSION, "close"),
        (TAG, VERSION, "close", 7),
        (TAG, VERSION, "close", "r1", "extra"),
        (TAG, VERSION, "view", "r1", 3, 2, ["a"], None),  # one field short
        (TAG, VERSION, "view", "r1", 0, 2, ["a"], None, None),  # dim 0
        (TAG, VERSION, "view", "r1", True, 2, ["a"], None, None),  # bool is no int
        (TAG, VERSION, "view", "r1", 3, 2, ["a", 1], None, None),
        (TAG, VERSION, "view", "r1", 3, 2, ["a"], ["code"], None),
        (TAG, VERSION, "view", "r1", 3, 2, ["a"], None, {1: "x"}),
        (TAG, VERSION, "vote", 1),
        (TAG, VERSION, "open_rounds", ("a",)),
        (TAG, VERSION, "reveal", b"\0"),
    ],
)
def test_malformed_messages_are_refused(raw) -> None:
    with pytest.raises(ProtocolViolation, match="malformed party message"):
        decode(raw)


def test_decode_as_checks_the_kind() -> None:
    with pytest.raises(ProtocolViolation, match="expected CloseCommand"):
        decode_as(encode(ReadyVote(True)), CloseCommand)


def test_encode_refuses_other_objects() -> None:
    with pytest.raises(TypeError):
        encode(("close", "r1"))  # type: ignore[arg-type]


def view(clients: set[str], **kw) -> PartyView:
    return PartyView(kw.pop("round_id", "r1"), kw.pop("dim", 3), 2, frozenset(clients), **kw)


def test_views_agree_on_the_intersection() -> None:
    agreement = decide_views([view({"a", "b", "c"}), view({"a", "b"}), view({"a", "b", "d"})])
    assert agreement.clients == {"a", "b"} and agreement.dropped == {"c", "d"}


@pytest.mark.parametrize(
    ("views", "code"),
    [
        (
            [view({"a", "b"}), view({"a", "b"}, refusal=Refusal("budget_exceeded", "x"))],
            "budget_exceeded",
        ),
        ([view({"a", "b"}, plan=PLAN), view({"a", "b"})], "plan_mismatch"),
        ([view({"a", "b"}), view({"a", "b"}, dim=None)], "unknown_round"),
        ([view({"a", "b"}), view({"a", "b"}, dim=4)], "dimension_mismatch"),
        ([view({"a", "b"}), view({"a"})], "too_few_clients"),
        ([view({"a", "b"}), view({"a", "b"}, round_id="r2")], "round_mismatch"),
    ],
)
def test_every_refused_agreement_has_a_stable_code(views, code) -> None:
    with pytest.raises(AgreementFailed) as err:
        decide_views(views)
    assert err.value.code == code and code in FAILURE_CODES


def test_a_refusal_wins_over_other_disagreements_alike_at_every_party() -> None:
    views = [view({"a"}), view({"a", "b"}, refusal=Refusal("storage_failure", "disk full"))]
    with pytest.raises(AgreementFailed, match="disk full") as err:
        decide_views(views)
    assert err.value.code == "storage_failure"


def test_votes() -> None:
    decide_votes([ReadyVote(True)] * 3)
    with pytest.raises(AgreementFailed, match=r"\[1\]") as err:
        decide_votes([ReadyVote(True), ReadyVote(False), ReadyVote(True)])
    assert err.value.code == "aborted"


def test_reconcile_decisions() -> None:
    assert union_of_open([OpenRounds(("b", "a")), OpenRounds(("a", "c"))]) == ["a", "b", "c"]
    ended = [EndedRounds(("x",)), EndedRounds(("x", "y")), EndedRounds(("y",))]
    assert ended_elsewhere(ended, me=1) == {"x": 0, "y": 2}


def test_unknown_failure_codes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown failure code"):
        AgreementFailed("x", code="not_a_code")
