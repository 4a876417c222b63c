"""The messages the aggregators exchange, and the decisions they take from them, sans I/O.

docs/design.md, "A round, step by step". The driver (:mod:`mpc_agg.aggregator.commands`)
only moves these messages through the party network; every verdict is computed here from
the messages every party received alike, so every party reaches the same one (h11's split:
the object decides, the caller moves bytes).

Each message travels as a tuple of plain values, ``("mpc_agg", VERSION, kind, *fields)``
(what MPyC pickles), and :func:`decode` accepts exactly that shape: a wrong tag, version,
kind, arity or field type raises :class:`ProtocolViolation` and nothing else is built.

=================  ========================================================================
``close``          leader -> all: close and aggregate ``round_id``
``abort``          leader -> all: fail ``round_id`` if it is still open, nothing revealed,
                   with the failure code ``expired`` (past ``rounds.max_open_s``) or
                   ``cancelled`` (``DELETE /v1/rounds/{round}``)
``view``           exchange 1: this party's round (dim, min_clients, client ids), its
                   refusal ``(code, detail)`` or None, and its noise plan summary
``vote``           exchange 2: whether this party holds its (noised) share of the total
``open_rounds``    reconcile, first exchange: ids of the rounds open here
``ended_rounds``   reconcile, second exchange: which of all those have ended here
=================  ========================================================================

Sum shares (exchange 3) are raw bytes, see :mod:`mpc_agg.mpc.reveal`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mpc_agg.core.rounds import Agreement, agree_client_set
from mpc_agg.errors import AgreementFailed, ProtocolViolation

TAG = "mpc_agg"
VERSION = 1


@dataclass(frozen=True)
class CloseCommand:
    """The leader tells every party to close and aggregate ``round_id``."""

    round_id: str


ABORT_CODES = ("expired", "cancelled")
"""The failure codes an :class:`AbortCommand` may carry (each in
:data:`mpc_agg.errors.FAILURE_CODES`)."""


@dataclass(frozen=True)
class AbortCommand:
    """The leader tells every party to fail ``round_id`` with ``code`` (one of
    :data:`ABORT_CODES`) if it is still open there; nothing of it is revealed. A party
    that does not hold the round open does nothing."""

    round_id: str
    code: str

    def __post_init__(self) -> None:
        if self.code not in ABORT_CODES:
            raise ValueError(f"abort code must be one of {ABORT_CODES}, got {self.code!r}")


Command = CloseCommand | AbortCommand
"""What the leader broadcasts in its command loop."""


@dataclass(frozen=True)
class Refusal:
    """Why a party will not aggregate a round: a stable ``code`` and a human ``detail``."""

    code: str
    detail: str


@dataclass(frozen=True)
class PartyView:
    """What one party reports at agreement time (exchange 1).

    ``dim`` is None when the party does not hold the round open; ``plan`` is the summary of
    its noise plan (None without DP), which every party must hold alike.
    """

    round_id: str
    dim: int | None
    min_clients: int
    clients: frozenset[str]
    refusal: Refusal | None = None
    plan: dict[str, Any] | None = None


@dataclass(frozen=True)
class ReadyVote:
    """Exchange 2: whether this party holds its share of the total, noise included."""

    ready: bool


@dataclass(frozen=True)
class OpenRounds:
    """Reconcile, first exchange: the rounds open at this party."""

    round_ids: tuple[str, ...]


@dataclass(frozen=True)
class EndedRounds:
    """Reconcile, second exchange: the rounds (of all parties' open ones) ended here."""

    round_ids: tuple[str, ...]


Message = CloseCommand | AbortCommand | PartyView | ReadyVote | OpenRounds | EndedRounds


# --------------------------------------------------------------------------- codec


def _strings(values: Sequence[str]) -> list[str]:
    return [str(v) for v in values]


def encode(message: Message) -> tuple[Any, ...]:
    """``message`` as the plain tuple that travels between parties."""
    head: tuple[Any, ...] = (TAG, VERSION)
    if isinstance(message, CloseCommand):
        return (*head, "close", message.round_id)
    if isinstance(message, AbortCommand):
        return (*head, "abort", message.round_id, message.code)
    if isinstance(message, PartyView):
        refusal = (
            None if message.refusal is None else [message.refusal.code, message.refusal.detail]
        )
        return (
            *head,
            "view",
            message.round_id,
            message.dim,
            message.min_clients,
            sorted(message.clients),
            refusal,
            None if message.plan is None else dict(message.plan),
        )
    if isinstance(message, ReadyVote):
        return (*head, "vote", bool(message.ready))
    if isinstance(message, OpenRounds):
        return (*head, "open_rounds", _strings(message.round_ids))
    if isinstance(message, EndedRounds):
        return (*head, "ended_rounds", _strings(message.round_ids))
    raise TypeError(f"not a protocol message: {type(message).__name__}")


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ProtocolViolation(f"malformed party message: {what}")


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode(raw: object) -> Message:
    """The message ``raw`` encodes; raises :class:`ProtocolViolation` for anything else."""
    _need(isinstance(raw, tuple) and len(raw) >= 3, "not a tagged tuple")
    assert isinstance(raw, tuple)
    _need(raw[0] == TAG, f"tag {raw[0]!r}")
    _need(raw[1] == VERSION, f"version {raw[1]!r} (this party speaks {VERSION})")
    kind, fields = raw[2], raw[3:]
    if kind == "close":
        _need(len(fields) == 1 and isinstance(fields[0], str), "close")
        return CloseCommand(fields[0])
    if kind == "abort":
        _need(
            len(fields) == 2
            and isinstance(fields[0], str)
            and isinstance(fields[1], str)
            and fields[1] in ABORT_CODES,
            "abort",
        )
        return AbortCommand(fields[0], fields[1])
    if kind == "view":
        _need(len(fields) == 6, "view arity")
        round_id, dim, min_clients, clients, refusal, plan = fields
        _need(isinstance(round_id, str), "view round id")
        _need(dim is None or (_is_int(dim) and dim >= 1), "view dim")
        _need(_is_int(min_clients) and min_clients >= 0, "view min_clients")
        _need(_is_str_list(clients), "view clients")
        _need(
            refusal is None
            or (
                isinstance(refusal, list)
                and len(refusal) == 2
                and all(isinstance(x, str) for x in refusal)
            ),
            "view refusal",
        )
        _need(plan is None or (isinstance(plan, dict) and _is_str_list(list(plan))), "view plan")
        return PartyView(
            round_id,
            dim,
            min_clients,
            frozenset(clients),
            None if refusal is None else Refusal(refusal[0], refusal[1]),
            plan,
        )
    if kind == "vote":
        _need(len(fields) == 1 and isinstance(fields[0], bool), "vote")
        return ReadyVote(fields[0])
    if kind in ("open_rounds", "ended_rounds"):
        _need(len(fields) == 1 and _is_str_list(fields[0]), kind)
        ids = tuple(fields[0])
        return OpenRounds(ids) if kind == "open_rounds" else EndedRounds(ids)
    raise ProtocolViolation(f"malformed party message: unknown kind {kind!r}")


def decode_as(raw: object, kind: type[Any]) -> Any:
    """:func:`decode`, and the message must be of class ``kind``."""
    message = decode(raw)
    _need(isinstance(message, kind), f"expected {kind.__name__}, got {type(message).__name__}")
    return message


# --------------------------------------------------------------------------- decisions


def decide_views(views: Sequence[PartyView]) -> Agreement:
    """Exchange 1's verdict, the same at every party: the agreed client set, or
    :class:`AgreementFailed` (with a stable ``code``) when any party refuses, the parties
    disagree on the round or its noise plan, or too few clients remain."""
    refusals = [(j, v.refusal) for j, v in enumerate(views) if v.refusal is not None]
    if refusals:
        _, first = refusals[0]
        assert first is not None
        raise AgreementFailed(first.detail, code=first.code)
    plans = [v.plan for v in views]
    if any(p != plans[0] for p in plans):
        round_id = views[0].round_id
        listing = "; ".join(f"aggregator {j}: {p}" for j, p in enumerate(plans))
        raise AgreementFailed(
            f"the aggregators disagree on the noise plan of round {round_id!r} ({listing}); "
            "nothing is revealed",
            code="plan_mismatch",
        )
    return agree_client_set(views, max(v.min_clients for v in views))


def decide_votes(votes: Sequence[ReadyVote]) -> None:
    """Exchange 2's verdict: returns only if every party holds its share; otherwise
    :class:`AgreementFailed` (code ``aborted``) before any share is sent."""
    not_ready = [j for j, v in enumerate(votes) if not v.ready]
    if not_ready:
        raise AgreementFailed(
            f"aggregator(s) {not_ready} could not compute their share of the total; "
            "nothing is revealed",
            code="aborted",
        )


def union_of_open(messages: Sequence[OpenRounds]) -> list[str]:
    """Reconcile: every round open at some party, sorted."""
    return sorted({r for m in messages for r in m.round_ids})


def ended_elsewhere(messages: Sequence[EndedRounds], me: int) -> dict[str, int]:
    """Reconcile: each round that ended at another party, and the first such party."""
    out: dict[str, int] = {}
    for j, m in enumerate(messages):
        if j == me:
            continue
        for r in m.round_ids:
            out.setdefault(r, j)
    return out
