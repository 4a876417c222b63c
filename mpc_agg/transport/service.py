"""What the HTTP layer calls on an aggregator: the :class:`AggregatorService` protocol.

docs/design.md, "Layout and layering": the HTTP server depends on this ``Protocol``, not on
the :class:`mpc_agg.aggregator.Aggregator` class (which satisfies it structurally), so
transport sits below the roles. Every call here is what one handler of the README's
"HTTP API (per aggregator)" table needs; none does network I/O of its own.
"""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from mpc_agg.config.schema import Topology
from mpc_agg.core.codec import ResultParts
from mpc_agg.transport.upload_limits import UploadBody

__all__ = ["AggregatorService", "PartyLinks"]


class PartyLinks(Protocol):
    """What ``/healthz`` reads of the party network."""

    @property
    def connected(self) -> bool:
        """True once links to every other party are up."""
        ...

    def missing(self) -> list[int]:
        """Peers whose link is down."""
        ...


class AggregatorService(Protocol):
    """The aggregator as the HTTP handlers see it.

    Requests (each raises a :class:`~mpc_agg.errors.PeerError` that the server answers with
    its status from :data:`mpc_agg.transport.http_server.HTTP_STATUS`):
    :meth:`open_round`, :meth:`round_status`, :meth:`upload_limit` and
    :meth:`full_share_bytes` then :meth:`receive_share_async`, :meth:`request_close`,
    :meth:`abort_round`, :meth:`list_rounds`, :meth:`result`. Limits and deadlines come
    from :attr:`topology` and :meth:`max_body_bytes`; ``/healthz`` reads :attr:`index` and
    :attr:`network`; ``/metrics`` is :meth:`metrics_text` (of :attr:`registry`).
    """

    @property
    def topology(self) -> Topology:
        """The federation's topology (deadlines and round limits)."""
        ...

    @property
    def index(self) -> int:
        """This aggregator's index in the topology."""
        ...

    @property
    def network(self) -> PartyLinks:
        """The links to the other aggregators."""
        ...

    @property
    def registry(self) -> CollectorRegistry:
        """The aggregator's own Prometheus registry; the HTTP server adds its metrics."""
        ...

    def metrics_text(self) -> str:
        """The Prometheus text of ``/metrics`` (everything in :attr:`registry`)."""
        ...

    def open_round(self, round_id: str, dim: int, min_clients: int | None = None) -> bool:
        """Open a round; True if created, False if it exists with the same parameters."""
        ...

    def round_status(self, round_id: str) -> dict[str, Any]:
        """JSON-ready status of a round."""
        ...

    def max_body_bytes(self) -> int:
        """Largest upload body of any round."""
        ...

    def upload_limit(self, round_id: str, client_id: str) -> int:
        """The checks that need no body; the largest body worth reading for this upload."""
        ...

    def full_share_bytes(self, round_id: str) -> int:
        """Length of a full share of the round: one client's fair share of the upload
        buffer."""
        ...

    async def receive_share_async(
        self, round_id: str, client_id: str, body: bytes | bytearray
    ) -> bool:
        """Validate, journal and accumulate one upload: True if accepted, False for an
        identical retry."""
        ...

    def upload_block(self, round_id: str, client_id: str) -> int | None:
        """None to read this upload's body whole, else the block size of a body received
        as a stream (a full share of a large round)."""
        ...

    async def receive_stream_async(self, round_id: str, client_id: str, body: UploadBody) -> bool:
        """:meth:`receive_share_async` for a body read block by block as it arrives."""
        ...

    def request_close(self, round_id: str) -> None:
        """Ask the leader to close and aggregate a round (idempotent)."""
        ...

    def abort_round(self, round_id: str) -> tuple[bool, dict[str, Any]]:
        """Ask the leader to abort a round everywhere: ``(under way, JSON-ready status)``."""
        ...

    def list_rounds(self) -> dict[str, Any]:
        """JSON-ready list of the rounds this aggregator knows (bounded)."""
        ...

    def result(self, round_id: str) -> bytes:
        """The encoded result of a DONE round (:func:`mpc_agg.core.codec.encode_result`)."""
        ...

    def result_parts(self, round_id: str) -> ResultParts:
        """The same result as header + metadata and the total, to stream it."""
        ...

    def statement(self, round_id: str) -> dict[str, Any]:
        """This aggregator's signed result statement of a DONE round, JSON-ready."""
        ...
