"""The aggregator role: the facade the HTTP layer and the party process call.

docs/design.md, "Processes" and "A round, step by step". One :class:`Aggregator` per party
process, wired from four parts, each in its own module:

* :mod:`~mpc_agg.aggregator.store`: rounds, journals, the round index, recovery, retention;
* :mod:`~mpc_agg.aggregator.ingest`: upload admission and the O(d) work on ingest threads;
* :mod:`~mpc_agg.aggregator.privacy`: noise plans, the ledger, one class per mechanism;
* :mod:`~mpc_agg.aggregator.commands`: the leader's command loop and the aggregation driver,
  which moves the messages of :mod:`mpc_agg.core.protocol` and applies their verdicts.

HTTP handlers call the synchronous methods (:meth:`Aggregator.open_round`, ...);
:meth:`Aggregator.serve_commands` runs for the life of the party network and
:meth:`Aggregator.watch_deadlines` for the life of the party process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.config.schema import (
    STREAM_ABOVE_MB,
    STREAM_BLOCK_BYTES,
    Topology,
    stream_above_bytes,
)
from mpc_agg.core import codec
from mpc_agg.core.ring import RingArray
from mpc_agg.core.rounds import TERMINAL, Round, RoundState
from mpc_agg.core.sharing import ShareKind
from mpc_agg.core.statement import ResultStatement, sign_statement, total_digest
from mpc_agg.dp.accountant import PrivacyLedger
from mpc_agg.dp.discrete_gaussian import NoiseStream
from mpc_agg.errors import (
    InvalidRequest,
    NotLeader,
    PartyNetworkDown,
    ResultNotReady,
    RoundAborted,
    RoundNotOpen,
    UnknownRound,
)
from mpc_agg.mpc.network import PartyNetwork
from mpc_agg.storage.round_index import RoundIndex
from mpc_agg.transport.upload_limits import UploadBody

from .commands import DEADLINE_TICK_S, LEADER, Driver
from .ingest import INGEST_THREADS, Ingest, expected_kind
from .metrics import AggregatorCollector, metrics_text
from .privacy import Privacy, plan_summary
from .store import RoundStore

__all__ = ["INGEST_THREADS", "LEADER", "Aggregator", "plan_summary"]

log = logging.getLogger("mpc_agg.aggregator")

LIST_ENDED = 100
"""``GET /v1/rounds`` lists every live round (at most ``rounds.max_open``) and only the
last this many ended ones, so its answer stays bounded."""


class Aggregator:
    """Aggregator ``index`` of ``topology``; ``network`` links it to the other parties.

    ``clock`` (seconds, monotonic) is injected so tests can control timings and round
    deadlines; ``wall_clock`` (Unix seconds) dates each round's opening in its journal, so
    that deadlines hold across a restart; ``noise_stream`` makes the keystream that DP
    noise is drawn from (default: a fresh
    :class:`~mpc_agg.dp.discrete_gaussian.NoiseStream` keyed from the OS per round);
    ``signing_key`` signs result statements (without one, :meth:`statement` refuses).
    ``stream_above`` (bytes; a party-local setting, ``mpc-agg party --stream-above-mb``):
    rounds whose vectors take more are large, their full shares streamed block by block of
    ``stream_block`` bytes (docs/design.md, "Streamed uploads").
    Raises :class:`~mpc_agg.errors.StateError` if its durable state is inconsistent.
    """

    def __init__(
        self,
        topology: Topology,
        index: int,
        network: PartyNetwork,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        noise_stream: Callable[[], NoiseStream] | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        stream_above: int = stream_above_bytes(STREAM_ABOVE_MB),
        stream_block: int = STREAM_BLOCK_BYTES,
    ) -> None:
        self.topology = topology
        self.index = index
        self.network = network
        self.clock = clock
        self.signing_key = signing_key
        self.fingerprint = fingerprint(topology)
        self._statements: dict[str, dict[str, Any]] = {}
        self.metrics: dict[str, int] = {
            "uploads_accepted": 0,
            "uploads_streamed": 0,
            "uploads_retried": 0,
            "uploads_refused": 0,
            "bytes_accepted": 0,
            "rounds_opened": 0,
            "rounds_done": 0,
            "rounds_failed": 0,
        }
        self.store = RoundStore(
            topology,
            index,
            clock,
            wall_clock,
            stream_above=stream_above,
            stream_block=stream_block,
        )
        self.privacy = Privacy(topology, index, self.store.round_index, noise_stream)
        self.ingest = Ingest(self.store, self.metrics)
        self.driver = Driver(self.store, self.ingest, self.privacy, network, self.metrics, clock)
        self.registry = CollectorRegistry(auto_describe=False)
        """This aggregator's Prometheus metrics (``GET /metrics``; the HTTP server adds its
        own here): one registry per aggregator, never the library's global one."""
        self.registry.register(AggregatorCollector(self))

    def __repr__(self) -> str:
        return f"Aggregator({self.topology.name!r}, index={self.index})"

    @property
    def is_leader(self) -> bool:
        """Aggregator 0 decides when rounds close."""
        return self.index == LEADER

    @property
    def rounds(self) -> dict[str, Round]:
        """The rounds known here since this process started, by id."""
        return self.store.rounds

    @property
    def round_index(self) -> RoundIndex:
        """Every round id this aggregator ever opened (single-use ids)."""
        return self.store.round_index

    @property
    def ledger(self) -> PrivacyLedger | None:
        """The privacy ledger (None without DP)."""
        return self.privacy.ledger

    # -- requests from clients and the collector ----------------------------------------

    def open_round(self, round_id: str, dim: int, min_clients: int | None = None) -> bool:
        """Open a round of vectors of length ``dim``; True if created, False if it exists
        with the same parameters (idempotent). ``min_clients`` may raise the topology's.

        Raises :class:`~mpc_agg.errors.RoundIdUsed` for an id used before (also before a
        restart), InvalidRequest for bad parameters or noise that cannot be drawn exactly,
        :class:`~mpc_agg.errors.TooManyRounds` when ``rounds.max_open`` rounds are live
        here, :class:`~mpc_agg.errors.StorageFailure` if it cannot be made durable (nothing
        kept).
        """
        codec.check_id("round", round_id)
        policy = self.topology.rounds
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= policy.max_dim:
            raise InvalidRequest(f"dim must be an integer in 1..{policy.max_dim}, got {dim!r}")
        if min_clients is None:
            min_clients = policy.min_clients
        if (
            isinstance(min_clients, bool)
            or not isinstance(min_clients, int)
            or not policy.min_clients <= min_clients <= policy.max_clients
        ):
            raise InvalidRequest(
                f"min_clients must be an integer in {policy.min_clients}..{policy.max_clients} "
                f"(the topology's bounds), got {min_clients!r}"
            )
        if not self.store.check_new(round_id, dim, min_clients):
            return False
        self.store.check_capacity()
        plan = self.privacy.plan(round_id, dim)
        try:
            self.store.create(
                round_id, dim, min_clients, plan_summary(plan), dp=self.privacy.enabled
            )
        except BaseException:
            self.privacy.forget(round_id)
            raise
        self.metrics["rounds_opened"] += 1
        log.info("round %s opened: dim=%d min_clients=%d", round_id, dim, min_clients)
        return True

    def recover(self) -> int:
        """Rebuild the open rounds from their journals (after a restart); returns how many.
        See :meth:`mpc_agg.aggregator.store.RoundStore.recover`."""
        recovered = self.store.recover(self.privacy.mismatch)
        return len(recovered)

    def max_body_bytes(self) -> int:
        """Largest upload body of any round (a FULL share of ``max_dim``)."""
        return codec.share_body_length(
            ShareKind.FULL, self.topology.rounds.max_dim, self.topology.encoding.ring
        )

    def upload_limit(self, round_id: str, client_id: str) -> int:
        """Checks that need no body (ids, round known): the largest body worth reading.

        Called before the body is read, so a bad request costs no upload bandwidth.
        """
        codec.check_id("client", client_id)
        kind = expected_kind(client_id, self.index, self.topology.m)
        rnd = self.store.lookup(round_id)
        return codec.share_body_length(kind, rnd.dim, rnd.ring)

    def full_share_bytes(self, round_id: str) -> int:
        """Length of a full share of ``round_id``: what one client may have in flight here
        at most (its fair share of the upload buffer)."""
        rnd = self.store.lookup(round_id)
        return codec.share_body_length(ShareKind.FULL, rnd.dim, rnd.ring)

    def receive_share(self, round_id: str, client_id: str, body: bytes | bytearray) -> bool:
        """Validate, journal and accumulate one upload in the calling thread: True when
        accepted (201), False for an identical retry (200); raises a
        :class:`~mpc_agg.errors.PeerError` otherwise (nothing changes). The party serves
        uploads with :meth:`receive_share_async`; this is its blocking twin, block-wise in
        a large round as that is (a full share spooled, a seed added block by block)."""
        return self.ingest.receive_share(round_id, client_id, body)

    async def receive_share_async(
        self, round_id: str, client_id: str, body: bytes | bytearray
    ) -> bool:
        """:meth:`receive_share` with the O(d) work on the ingest threads, so the event
        loop, shared with MPyC, keeps serving requests and the party network meanwhile."""
        return await self.ingest.receive_share_async(round_id, client_id, body)

    def upload_block(self, round_id: str, client_id: str) -> int | None:
        """How ``client_id``'s upload to ``round_id`` is read: None to take its body whole
        (:meth:`receive_share_async`), else the bytes of each block of a body received as a
        stream (:meth:`receive_stream_async`: a full share of a large round)."""
        return self.ingest.stream_block(round_id, client_id)

    async def receive_stream_async(self, round_id: str, client_id: str, body: UploadBody) -> bool:
        """:meth:`receive_share_async` for a body read block by block as it arrives, never
        held whole (see :meth:`mpc_agg.aggregator.ingest.Ingest.receive_stream_async`)."""
        return await self.ingest.receive_stream_async(round_id, client_id, body)

    def round_status(self, round_id: str) -> dict[str, Any]:
        """JSON-ready status of a round."""
        status = self.store.lookup(round_id).status()
        status["aggregator"] = self.index
        dp = self.privacy.status(round_id)
        if dp is not None:
            status["dp"] = dp
        return status

    def request_close(self, round_id: str) -> None:
        """Collector asks the leader to close and aggregate ``round_id`` (idempotent)."""
        if not self.is_leader:
            raise NotLeader(
                f"aggregator {self.index} is not the leader; send close requests to "
                f"aggregator 0 at {self.topology.leader.url}"
            )
        rnd = self.store.lookup(round_id)
        if (
            rnd.state is not RoundState.OPEN
            or rnd.close_requested
            or round_id in self.driver.aborting
        ):
            return
        if not self.network.connected:
            raise PartyNetworkDown(
                f"the party network is down (waiting for aggregator(s) "
                f"{self.network.missing()}); the round stays open, retry the close later"
            )
        if rnd.overdue(self.clock()):  # too late: it fails everywhere as expired instead
            self.driver.queue_abort(round_id, "expired")
            return
        rnd.request_close()
        self.driver.queue_close(round_id)
        log.info("round %s: close requested", round_id)

    def abort_round(self, round_id: str) -> tuple[bool, dict[str, Any]]:
        """Collector asks the leader to abort ``round_id`` everywhere (``DELETE``): it fails
        at every party with failure code ``cancelled``, nothing revealed, its journals go
        and its id stays used. Returns ``(under_way, status)``: True while the leader's
        abort command is queued (202), False when the round has ended here, already or just
        now (200; idempotent). With the party links down, the leader fails the round at
        once and reconciliation fails it at the others when the links come up.

        Raises NotLeader at a follower, :class:`~mpc_agg.errors.UnknownRound` for a round
        never opened here, :class:`~mpc_agg.errors.RoundNotOpen` for a round whose
        aggregation has started (it ends on its own shortly).
        """
        codec.check_id("round", round_id)
        if not self.is_leader:
            raise NotLeader(
                f"aggregator {self.index} is not the leader; send aborts to aggregator 0 "
                f"at {self.topology.leader.url}"
            )
        rnd = self.store.rounds.get(round_id)
        if rnd is None:
            used = self.store.round_index.state(round_id)
            if used is None:
                raise UnknownRound(f"round {round_id!r} is unknown at aggregator {self.index}")
            return False, {"round": round_id, "state": used, "aggregator": self.index}
        if rnd.state in TERMINAL:
            return False, self.round_status(round_id)
        if rnd.state is not RoundState.OPEN:
            raise RoundNotOpen(
                f"round {round_id!r} is {rnd.state.value}: its aggregation has started and "
                "cannot be aborted; it ends shortly"
            )
        if not self.network.connected:
            self.driver.abort_here(rnd, "cancelled")
            return False, self.round_status(round_id)
        self.driver.queue_abort(round_id, "cancelled")
        return True, self.round_status(round_id)

    def list_rounds(self) -> dict[str, Any]:
        """JSON-ready list of the rounds this aggregator knows (``GET /v1/rounds``): every
        live one and the last :data:`LIST_ENDED` ended ones, in the order they were opened,
        each with its state, dimension, accepted count, failure code and the wall times
        (Unix seconds) of its opening and its deadline; ``live`` counts the live rounds
        against ``max_open``, ``ended_not_listed`` the ended rounds left out."""
        live = self.store.live_rounds()
        ended = [r for r in self.store.rounds.values() if r.state in TERMINAL]
        shown = {id(r) for r in live} | {id(r) for r in ended[-LIST_ENDED:]}
        policy = self.topology.rounds
        return {
            "aggregator": self.index,
            "max_open": policy.max_open,
            "max_open_s": policy.max_open_s,
            "live": len(live),
            "ended_not_listed": max(0, len(ended) - LIST_ENDED),
            "rounds": [
                {
                    "round": r.round_id,
                    "state": r.state.value,
                    "dim": r.dim,
                    "accepted": len(r.accepted),
                    "failure_code": r.failure_code,
                    "opened": r.opened_unix,
                    "deadline": r.deadline_unix,
                }
                for r in self.store.rounds.values()
                if id(r) in shown
            ],
        }

    def _done_round(self, round_id: str) -> tuple[Round, RingArray]:
        """The DONE round ``round_id`` and its total; raises RoundAborted (410) if it
        failed, ResultExpired (410) if its total was dropped, ResultNotReady (409) before."""
        rnd = self.store.lookup(round_id)
        if rnd.state is RoundState.FAILED:
            raise RoundAborted(
                rnd.failure or "unknown reason", rnd.failure_code or "aggregation_error"
            )
        self.store.result_of(rnd)
        if rnd.state is not RoundState.DONE or rnd.total is None:
            raise ResultNotReady(f"round {round_id!r} is {rnd.state.value}; no result yet")
        return rnd, rnd.total

    def result(self, round_id: str) -> bytes:
        """The encoded result of a DONE round (see :func:`mpc_agg.core.codec.encode_result`),
        whole: for small totals (the HTTP API streams long ones, :meth:`result_parts`)."""
        rnd, total = self._done_round(round_id)
        return codec.encode_result(total, self._result_meta(rnd))

    def result_parts(self, round_id: str) -> codec.ResultParts:
        """The result of a DONE round as header + metadata and the total itself (not a
        copy: the revealed total the round holds), to be sent a slice at a time; the same
        bytes as :meth:`result`."""
        rnd, total = self._done_round(round_id)
        return codec.result_parts(total, self._result_meta(rnd))

    def _result_meta(self, rnd: Round) -> dict[str, Any]:
        return {
            "round": rnd.round_id,
            "num_clients": rnd.num_clients,
            "dropped_clients": len(rnd.dropped_clients),
            "epsilon": None,
            "delta": None,
            **self.privacy.result_fields.get(rnd.round_id, {}),
            "frac_bits": self.topology.encoding.frac_bits,
            "timings": rnd.timings,
        }

    def statement(self, round_id: str) -> dict[str, Any]:
        """This aggregator's signed statement of a DONE round (README, "Security model"):
        round id, topology fingerprint, digests of the total and of the agreed client set,
        counts and privacy, signed with its Ed25519 key; JSON-ready."""
        cached = self._statements.get(round_id)
        if cached is not None:
            return cached
        rnd, total = self._done_round(round_id)
        if self.signing_key is None or rnd.clients_digest is None:
            raise ResultNotReady(f"aggregator {self.index} has no signing key; no statement")
        privacy = self.privacy.result_fields.get(round_id, {})
        content = ResultStatement(
            round_id=round_id,
            topology_fingerprint=self.fingerprint,
            total_digest=total_digest(total),
            clients_digest=rnd.clients_digest,
            num_clients=int(rnd.num_clients or 0),
            dropped_clients=len(rnd.dropped_clients),
            dim=rnd.dim,
            epsilon=privacy.get("epsilon"),
            delta=privacy.get("delta"),
            noise_stddev=privacy.get("noise_stddev"),
            aggregator=self.index,
        )
        signed = sign_statement(content, self.signing_key).to_json()
        self._statements[round_id] = signed
        while len(self._statements) > self.topology.rounds.keep_results:
            del self._statements[next(iter(self._statements))]  # oldest first
        return signed

    def metrics_text(self) -> str:
        """The Prometheus text of ``GET /metrics``: everything in :attr:`registry`
        (:mod:`mpc_agg.aggregator.metrics`)."""
        return metrics_text(self)

    # -- the party protocol -------------------------------------------------------------

    async def serve_commands(self) -> None:
        """For the life of the party network: reconcile, then execute the leader's commands
        with all parties (:meth:`mpc_agg.aggregator.commands.Driver.serve`)."""
        await self.driver.serve()

    def check_deadlines(self) -> int:
        """Act on the open rounds past their deadline now (see
        :meth:`mpc_agg.aggregator.commands.Driver.check_deadlines`); returns how many."""
        return self.driver.check_deadlines()

    async def watch_deadlines(self, tick_s: float = DEADLINE_TICK_S) -> None:
        """For the life of the party process: :meth:`check_deadlines` every ``tick_s``."""
        await self.driver.watch_deadlines(tick_s)

    async def aggregate(self, round_id: str) -> None:
        """Close, agree on and reveal ``round_id`` with every party."""
        await self.driver.aggregate(round_id)

    async def reconcile(self) -> int:
        """A round that ended at any party ends at every party; returns how many failed
        here."""
        return await self.driver.reconcile()

    def close_journals(self) -> None:
        """Wait for the ingest threads, close every open journal file (on shutdown; files
        stay for recovery)."""
        self.ingest.shutdown()
        self.store.close()
