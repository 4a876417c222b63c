"""The round state machine and the client-set agreement, sans I/O.

docs/design.md, "Cryptographic core" (rounds) and "A round, step by step". A round moves through
one table of legal transitions::

    OPEN --close--> CLOSING --agree--> AGGREGATING --reveal--> DONE
      \\               \\                   \\
       `----fail-------`-------fail--------`------> FAILED

* OPEN: uploads are accepted into a running sum; an identical retry is a no-op,
  a different share for the same client is refused.
* CLOSING: the leader told every party to close; uploads are refused; the parties
  exchange their accepted client sets.
* AGGREGATING: the intersection is agreed (:func:`agree_client_set`) and at least
  ``min_clients`` remain; clients missing at any aggregator are subtracted everywhere.
* DONE: the total is revealed. FAILED: nothing is revealed; ``failure`` says why.

Uploads and bookkeeping are events of the same table that keep the state: ``reserve`` (OPEN),
``accept`` (OPEN, CLOSING: reserved before the close), ``release`` (OPEN, CLOSING, FAILED: a
refused upload, also one finishing after a failure), ``request_close`` / ``withdraw_close``
(OPEN: the leader's queued close), ``expire`` (DONE: the total dropped to bound memory).

An illegal event raises :class:`IllegalTransition` and changes nothing. The caller does the
I/O (journal, network) and feeds decisions back in; nothing here blocks or reads a clock
(times are passed in).

Large vectors (docs/design.md, "Streamed uploads"): an upload may be added to the running sum
block by block on an ingest thread (``sum.add_blocks``) before it is settled with
:meth:`Round.accept_summed`; the reveal takes the sum in place (:meth:`Round.take_sum`), and a
sum an addition left part-done, or one its journal may disagree with (a record written for
an upload then refused), is *poisoned*: the round refuses to agree (fails closed).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Protocol

import numpy as np
import xxhash

from mpc_agg.core.accumulator import Accumulator
from mpc_agg.core.ring import GF_P61, Ring, RingArray
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


class RoundState(enum.Enum):
    """Where a round is in its life."""

    OPEN = "open"
    CLOSING = "closing"
    AGGREGATING = "aggregating"
    DONE = "done"
    FAILED = "failed"


class RoundEvent(enum.Enum):
    """What can happen to a round."""

    CLOSE = "close"
    AGREE = "agree"
    REVEAL = "reveal"
    FAIL = "fail"
    RESERVE = "reserve"
    """An upload starts being processed (data event: the state stays)."""
    ACCEPT = "accept"
    """A reserved upload is added to the running sum."""
    RELEASE = "release"
    """A reserved upload was refused: nothing of it remains."""
    REQUEST_CLOSE = "request_close"
    """The collector asked the leader to close; the close command is queued."""
    WITHDRAW_CLOSE = "withdraw_close"
    """The queued close was not sent (the command loop stopped): it may be requested again."""
    EXPIRE = "expire"
    """A DONE round's total is dropped to bound memory."""


TRANSITIONS: dict[tuple[RoundState, RoundEvent], RoundState] = {
    (RoundState.OPEN, RoundEvent.CLOSE): RoundState.CLOSING,
    (RoundState.CLOSING, RoundEvent.AGREE): RoundState.AGGREGATING,
    (RoundState.AGGREGATING, RoundEvent.REVEAL): RoundState.DONE,
    (RoundState.OPEN, RoundEvent.FAIL): RoundState.FAILED,
    (RoundState.CLOSING, RoundEvent.FAIL): RoundState.FAILED,
    (RoundState.AGGREGATING, RoundEvent.FAIL): RoundState.FAILED,
    # Data and bookkeeping events: the state stays (h11's SEND_BODY: {Data: SEND_BODY}).
    (RoundState.OPEN, RoundEvent.RESERVE): RoundState.OPEN,
    (RoundState.OPEN, RoundEvent.ACCEPT): RoundState.OPEN,
    (RoundState.CLOSING, RoundEvent.ACCEPT): RoundState.CLOSING,  # reserved before the close
    (RoundState.OPEN, RoundEvent.RELEASE): RoundState.OPEN,
    (RoundState.CLOSING, RoundEvent.RELEASE): RoundState.CLOSING,
    (RoundState.FAILED, RoundEvent.RELEASE): RoundState.FAILED,  # finished after a failure
    (RoundState.OPEN, RoundEvent.REQUEST_CLOSE): RoundState.OPEN,
    (RoundState.OPEN, RoundEvent.WITHDRAW_CLOSE): RoundState.OPEN,
    (RoundState.DONE, RoundEvent.EXPIRE): RoundState.DONE,
}
"""Every legal (state, event) pair and the state it leads to; all others are illegal."""

TERMINAL = frozenset({RoundState.DONE, RoundState.FAILED})


def upload_digest(body: bytes | bytearray) -> bytes:
    """16-byte XXH3-128 digest of an upload body, to tell identical retries from conflicts.

    Not cryptographic, and it need not be: a client that forges a collision only gets its
    own second, different upload answered "identical retry" (its first upload stands either
    way). XXH3 runs at memory speed (about 0.2 ms per 8 MB here, 50x faster than BLAKE2b),
    so every upload can be fingerprinted without slowing ingest.
    """
    return xxhash.xxh3_128_digest(body)


@dataclass(frozen=True, repr=False)
class AcceptedShare:
    """What a round remembers of one accepted upload (not its vector).

    ``digest`` tells an identical retry from a conflict (see :func:`upload_digest`), ``seed``
    is kept for SEED shares (16 bytes), ``ref`` locates a FULL share in the journal.
    """

    kind: ShareKind
    digest: bytes
    seed: bytes | None = None
    ref: object = None

    def __repr__(self) -> str:
        return f"AcceptedShare(kind={self.kind.name})"


@dataclass
class Round:
    """One aggregation round at one aggregator.

    ``dim``: vector length, ``min_clients``: fewest clients whose total may be revealed,
    ``ring``: the ring its shares and sums are in (the topology's ``encoding.ring``).
    ``opened_at`` and ``deadline_at`` are times of the aggregator's (monotonic) clock: the
    round must be closed before ``deadline_at`` (see :meth:`overdue`); ``opened_unix`` and
    ``deadline_unix`` are the same instants in wall-clock seconds, for people and for
    recovery after a restart (None when unknown).
    """

    round_id: str
    dim: int
    min_clients: int
    opened_at: float
    deadline_at: float = math.inf
    opened_unix: float | None = None
    deadline_unix: float | None = None
    state: RoundState = RoundState.OPEN
    accepted: dict[str, AcceptedShare] = dc_field(default_factory=dict)
    pending: set[str] = dc_field(default_factory=set)
    failure: str | None = None
    failure_code: str | None = None
    """One of :data:`mpc_agg.errors.FAILURE_CODES` once FAILED."""
    expired: bool = False
    """DONE, and its total was dropped to bound memory (see :meth:`expire`)."""
    close_requested: bool = False
    """OPEN, and a close command is queued at the leader."""
    poisoned: str | None = None
    """Why the running sum can no longer be trusted (see :meth:`poison`), or None."""
    total: RingArray | None = None
    num_clients: int | None = None
    dropped_clients: tuple[str, ...] = ()
    clients_digest: str | None = None
    """Once agreed: :func:`mpc_agg.core.statement.clients_digest` of the agreed clients."""
    timings: dict[str, float] = dc_field(default_factory=dict)
    ring: Ring = GF_P61

    def __post_init__(self) -> None:
        self.sum = Accumulator(self.dim, self.ring)

    # -- events ---------------------------------------------------------------------------

    def _check(self, event: RoundEvent) -> RoundState:
        """The state ``event`` leads to; raises IllegalTransition (changing nothing)."""
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise IllegalTransition(
                f"round {self.round_id!r}: event {event.value!r} is illegal in state "
                f"{self.state.value!r}"
            )
        return nxt

    def _apply(self, event: RoundEvent) -> None:
        self.state = self._check(event)

    def check_upload(self, client_id: str, share: Share, digest: bytes) -> bool:
        """Decide on an upload without changing anything.

        ``digest`` is the upload's :func:`upload_digest`. Returns True for a new share, False
        for an identical retry; raises :class:`RoundNotOpen`/:class:`RoundEnded` when uploads are
        over, :class:`UploadInProgress` while the same client's upload is being processed,
        :class:`DimensionMismatch` or :class:`ConflictingShare`.
        """
        return self.check_arrival(client_id, share.dim, digest)

    def check_arrival(self, client_id: str, dim: int, digest: bytes | None) -> bool:
        """:meth:`check_upload` of an upload of dimension ``dim``; ``digest`` None when its
        body has not arrived yet (a streamed upload, decided on its header): then False
        means only "this client has an accepted share", and the caller decides retry or
        conflict once it has the digest (calling this again)."""
        previous = self.accepted.get(client_id)
        if previous is not None and (digest is None or previous.digest == digest):
            return False  # an identical retry, whatever the state: the share is held
        if self.state in TERMINAL:
            raise RoundEnded(f"round {self.round_id!r} has ended ({self.state.value})")
        if previous is not None:
            raise ConflictingShare(
                f"client {client_id!r} already uploaded a different share to round "
                f"{self.round_id!r}; the first upload stands"
            )
        if self.state is not RoundState.OPEN:
            raise RoundNotOpen(f"round {self.round_id!r} is {self.state.value}: uploads are closed")
        if dim != self.dim:
            raise DimensionMismatch(
                f"share has dimension {dim}, but round {self.round_id!r} has {self.dim}"
            )
        if client_id in self.pending:
            raise UploadInProgress(
                f"an upload of client {client_id!r} to round {self.round_id!r} is being "
                "processed; retry in a moment"
            )
        return True

    def reserve(self, client_id: str) -> None:
        """Mark a new upload (one :meth:`check_upload` called new) as being processed.

        While reserved, other uploads of the client get :class:`UploadInProgress`; the
        round counts it against ``max_clients`` and cannot agree until it is settled by
        :meth:`accept` or :meth:`release`.
        """
        self._check(RoundEvent.RESERVE)
        if client_id in self.pending or client_id in self.accepted:
            raise IllegalTransition(f"client {client_id!r} is already reserved or accepted")
        self._apply(RoundEvent.RESERVE)
        self.pending.add(client_id)

    def release(self, client_id: str) -> None:
        """Give up a reservation (the upload was refused): nothing of it remains."""
        self._apply(RoundEvent.RELEASE)
        self.pending.discard(client_id)

    def accept(
        self, client_id: str, share: Share, digest: bytes, vector: RingArray, ref: object = None
    ) -> None:
        """Settle a reservation: add ``vector`` (the share's expansion) to the running sum.

        Legal in OPEN and CLOSING (an upload reserved before the close is finished before
        the round agrees), never later.
        """
        self._check(RoundEvent.ACCEPT)
        if client_id not in self.pending:
            raise IllegalTransition(f"client {client_id!r} was not reserved")
        self._apply(RoundEvent.ACCEPT)
        self.sum.add(vector)
        self.accepted[client_id] = AcceptedShare(share.kind, digest, share.seed, ref)
        self.pending.discard(client_id)

    def accept_summed(
        self,
        client_id: str,
        kind: ShareKind,
        digest: bytes,
        seed: bytes | None = None,
        ref: object = None,
    ) -> None:
        """Settle a reservation whose vector the caller already added to :attr:`sum` block
        by block (``sum.add_blocks``, on an ingest thread, while it was reserved).

        Legal where :meth:`accept` is. The addition came first, so an illegal call leaves
        it in the sum: it is only ever so in FAILED, whose sum is never revealed.
        """
        self._check(RoundEvent.ACCEPT)
        if client_id not in self.pending:
            raise IllegalTransition(f"client {client_id!r} was not reserved")
        self._apply(RoundEvent.ACCEPT)
        self.accepted[client_id] = AcceptedShare(kind, digest, seed, ref)
        self.pending.discard(client_id)

    def poison(self, reason: str) -> None:
        """Mark the running sum as untrustworthy (a block-wise addition stopped part way,
        or a journal record was written for an upload then refused, so the journal may
        disagree with the sum): the round will refuse to agree, so nothing of it is
        revealed. Legal in any state (it only marks); the first reason stays."""
        if self.poisoned is None:
            self.poisoned = reason

    @property
    def sum_damaged(self) -> str | None:
        """Why the running sum must not be revealed (:attr:`poisoned`, or an addition the
        accumulator saw stop part way), or None."""
        if self.poisoned is not None:
            return self.poisoned
        if self.sum is not None and self.sum.damaged:
            return "an addition to the running sum stopped part way"
        return None

    @property
    def occupancy(self) -> int:
        """Clients accepted or being processed: what ``max_clients`` limits."""
        return len(self.accepted) + len(self.pending)

    def close(self) -> None:
        """OPEN -> CLOSING: stop accepting uploads."""
        self._apply(RoundEvent.CLOSE)
        self.close_requested = False

    def request_close(self) -> bool:
        """The collector asks for the close: True if it must be queued now, False if it
        already is (idempotent)."""
        self._check(RoundEvent.REQUEST_CLOSE)
        if self.close_requested:
            return False
        self._apply(RoundEvent.REQUEST_CLOSE)
        self.close_requested = True
        return True

    def withdraw_close(self) -> None:
        """The queued close was never sent: it may be requested again."""
        self._apply(RoundEvent.WITHDRAW_CLOSE)
        self.close_requested = False

    def agree(
        self,
        clients: frozenset[str],
        dropped_vectors: Sequence[RingArray | Iterable[RingArray]],
        dropped_elsewhere: frozenset[str] = frozenset(),
    ) -> None:
        """CLOSING -> AGGREGATING: keep ``clients``; subtract the shares of those dropped.

        ``dropped_vectors`` are the expanded shares of ``accepted - clients``, in any order,
        each a vector or (large vectors) an iterable of its consecutive blocks, subtracted
        block by block; if such blocks fail part way, the error propagates with the round
        AGGREGATING and its sum damaged (:meth:`take_sum` refuses it).
        ``dropped_elsewhere`` names partial uploads this aggregator never saw, so that
        ``dropped_clients`` lists every client left out, at every aggregator alike.
        """
        if self.pending:
            raise IllegalTransition(
                f"{len(self.pending)} upload(s) still in progress: settle them before agreeing"
            )
        if not clients <= self.accepted.keys():
            raise IllegalTransition("agreed clients must be a subset of the accepted ones")
        expected = len(self.accepted) - len(clients)
        if len(dropped_vectors) != expected:
            raise IllegalTransition(
                f"{expected} dropped shares to subtract, got {len(dropped_vectors)}"
            )
        if any(isinstance(v, np.ndarray) and v.shape != (self.dim,) for v in dropped_vectors):
            raise IllegalTransition(f"every dropped share must have shape ({self.dim},)")
        self._apply(RoundEvent.AGREE)
        for v in dropped_vectors:
            if isinstance(v, np.ndarray):
                self.sum.subtract(v)
            else:
                self.sum.add_blocks(v, subtract=True)
        self.dropped_clients = tuple(sorted((self.accepted.keys() - clients) | dropped_elsewhere))
        self.num_clients = len(clients)

    def reveal(self, total: RingArray) -> None:
        """AGGREGATING -> DONE with the revealed ``total``."""
        self._apply(RoundEvent.REVEAL)
        self.total = total

    def fail(self, reason: str, code: str = "aggregation_error") -> None:
        """Any live state -> FAILED; nothing will be revealed. ``code`` says what kind of
        failure (one of :data:`mpc_agg.errors.FAILURE_CODES`)."""
        self._apply(RoundEvent.FAIL)
        self.failure = reason
        self.failure_code = code

    def expire(self) -> None:
        """Drop the total of a DONE round (the round stays known, its result answers 410)."""
        self._apply(RoundEvent.EXPIRE)
        self.total = None
        self.expired = True

    def overdue(self, now: float, grace: float = 0.0) -> bool:
        """True if the round is still OPEN at ``now`` (same clock as ``deadline_at``) and
        its deadline, plus ``grace`` seconds, has passed: it must be failed (``expired``).
        A round already closing is not overdue: its aggregation has its own deadlines."""
        return self.state is RoundState.OPEN and now >= self.deadline_at + grace

    def local_sum(self) -> RingArray:
        """This aggregator's share of the total (canonical; a copy)."""
        if self.sum is None:
            raise IllegalTransition(f"round {self.round_id!r} ended and freed its running sum")
        return self.sum.value()

    def take_sum(self) -> RingArray:
        """This aggregator's share of the total, canonical, in the running sum's own buffer
        (no copy: the reveal works in it); the round holds no running sum afterwards.

        Only once AGGREGATING; raises :class:`IllegalTransition` before, after the sum was
        taken or freed, or if the sum is damaged (:attr:`sum_damaged`): a wrong sum is
        never revealed.
        """
        if self.state is not RoundState.AGGREGATING:
            raise IllegalTransition(
                f"round {self.round_id!r} is {self.state.value}: its sum is taken once agreed"
            )
        if self.sum is None:
            raise IllegalTransition(f"round {self.round_id!r} holds no running sum any more")
        damaged = self.sum_damaged
        if damaged is not None:
            raise IllegalTransition(f"round {self.round_id!r}: {damaged}; nothing is revealed")
        total, self.sum = self.sum.take(), None  # type: ignore[assignment]
        return total

    def free_sum(self) -> None:
        """Drop the running sum of an ended round (8·d bytes); the total, if any, stays."""
        if self.state not in TERMINAL:
            raise IllegalTransition(f"round {self.round_id!r} is {self.state.value}, not ended")
        self.sum = None  # type: ignore[assignment]

    def status(self) -> dict[str, object]:
        """A JSON-ready summary: state, counts, dimension, timings, failure, and the wall
        times (Unix seconds) of its opening and of its deadline to be closed."""
        return {
            "round": self.round_id,
            "state": self.state.value,
            "dim": self.dim,
            "min_clients": self.min_clients,
            "accepted": len(self.accepted),
            "num_clients": self.num_clients,
            "dropped_clients": len(self.dropped_clients),
            "failure": self.failure,
            "failure_code": self.failure_code,
            "opened": self.opened_unix,
            "deadline": self.deadline_unix,
            "timings": dict(self.timings),
        }


class ClientSetView(Protocol):
    """What :func:`agree_client_set` reads of each aggregator's view (the whole message is
    :class:`mpc_agg.core.protocol.PartyView`)."""

    @property
    def round_id(self) -> str: ...

    @property
    def dim(self) -> int | None:
        """None when this aggregator does not hold the round open."""

    @property
    def clients(self) -> frozenset[str]: ...


@dataclass(frozen=True)
class Agreement:
    """The agreed client set and who is dropped."""

    clients: frozenset[str]
    dropped: frozenset[str]


def agree_client_set(views: Sequence[ClientSetView], min_clients: int) -> Agreement:
    """docs/design.md, "A round, step by step": keep the clients every aggregator accepted.

    Every aggregator computes this from the same ``views`` (one per aggregator, index order)
    and so reaches the same decision. Raises :class:`AgreementFailed` when an aggregator does
    not know the round, dimensions differ, or fewer than ``min_clients`` remain.
    """
    if not views:
        raise AgreementFailed("no aggregator views to agree on", code="unknown_round")
    round_id = views[0].round_id
    for i, v in enumerate(views):
        if v.round_id != round_id:
            raise AgreementFailed(
                f"aggregator {i} answered for round {v.round_id!r}, not {round_id!r}",
                code="round_mismatch",
            )
        if v.dim is None:
            raise AgreementFailed(
                f"round {round_id!r} is unknown at aggregator {i}", code="unknown_round"
            )
    dims = {v.dim for v in views}
    if len(dims) != 1:
        listing = ", ".join(f"aggregator {i}: {v.dim}" for i, v in enumerate(views))
        raise AgreementFailed(
            f"round {round_id!r} has different dimensions ({listing})", code="dimension_mismatch"
        )
    common = frozenset.intersection(*(v.clients for v in views))
    union = frozenset.union(*(v.clients for v in views))
    if len(common) < min_clients:
        partial = len(union) - len(common)
        raise AgreementFailed(
            f"only {len(common)} client(s) reached every aggregator ({partial} partial "
            f"upload(s) dropped); min_clients is {min_clients}, so nothing is revealed",
            code="too_few_clients",
        )
    return Agreement(common, union - common)
