"""The collector role: open rounds on every aggregator, trigger aggregation, fetch the total.

docs/design.md, "Processes". The collector opens a round on each aggregator (same id and
dimension), asks the leader to close it once clients have submitted, polls the leader for
the revealed total, fetches every aggregator's signed result statement and accepts the
total only if all of them vouch for it (:func:`verify_statements`); it decodes it with the
topology's encoding. A result saved with :meth:`AggregateResult.save` can be re-checked
by anyone holding the topology (:func:`load_and_verify`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.config.schema import Topology
from mpc_agg.core import codec
from mpc_agg.core.ring import RingArray
from mpc_agg.core.statement import ResultStatement, SignedStatement, verify_result
from mpc_agg.errors import AggregationTimeout, RemoteRefusal, RoundFailed, UsageError
from mpc_agg.transport.http_client import (
    AggregatorAPI,
    KeptSession,
    run_sync,
    tokens_per_aggregator,
)


@dataclass(frozen=True)
class AggregateResult:
    """A revealed round.

    ``total``: the decoded sum (float64, length d); ``field_total``: the exact sum in the
    topology's ring (``uint64`` in GF(p), ``uint32`` in Z_(2^32));
    ``num_clients``: clients counted; ``dropped_clients``: partial uploads left out;
    ``epsilon``/``delta``: the round's privacy cost (None without DP);
    ``noise_stddev``: standard deviation of the noise in each coordinate of ``total``
    (output units; None without DP); ``cumulative_epsilon``/``cumulative_delta``: the
    privacy spent by all rounds so far, this one included (None without DP);
    ``timings``: seconds spent by phase at the leader; ``statements``: every aggregator's
    signed result statement (JSON form), which :func:`verify_statements` checks again later.

    ``num_clients``, ``dropped_clients``, ``epsilon``, ``delta`` and ``noise_stddev`` are
    the values all aggregators signed; ``cumulative_*`` and ``timings`` are the leader's
    word alone.
    """

    round_id: str
    total: npt.NDArray[np.float64]
    field_total: RingArray
    num_clients: int
    dropped_clients: int
    epsilon: float | None
    delta: float | None
    noise_stddev: float | None = None
    cumulative_epsilon: float | None = None
    cumulative_delta: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    statements: tuple[dict[str, Any], ...] = ()

    def save(self, path: str | Path) -> None:
        """Write the exact total and the statements to ``path`` (``.npz``), so anyone with
        the topology can check them later (:func:`load_and_verify`)."""
        np.savez(
            path,
            round_id=np.array(self.round_id),
            field_total=np.asarray(self.field_total),  # uint64 or uint32: names the ring
            statements=np.array(json.dumps(list(self.statements))),
        )


def verify_statements(
    topology: Topology, round_id: str, field_total: RingArray, statements: Sequence[Any]
) -> ResultStatement:
    """Check that every aggregator of ``topology`` signed a statement vouching for
    ``field_total`` of ``round_id`` under this topology; returns the agreed statement or
    raises :class:`~mpc_agg.core.statement.ResultMismatch` (README, "Security model")."""
    if not topology.has_keys:
        raise UsageError(
            "this topology names no signing keys (a template): verify against the topology "
            "the aggregators run"
        )
    signed = [SignedStatement.from_json(st) for st in statements]
    keys = [bytes.fromhex(str(a.signing_key)) for a in topology.aggregators]
    return verify_result(field_total, signed, keys, fingerprint(topology), round_id)


def load_and_verify(topology: Topology, path: str | Path) -> AggregateResult:
    """A result saved with :meth:`AggregateResult.save`, verified against ``topology``."""
    with np.load(path, allow_pickle=False) as data:
        round_id = str(data["round_id"])
        total = np.ascontiguousarray(data["field_total"])  # its dtype names its ring
        statements = json.loads(str(data["statements"]))
    return _verified_result(topology, round_id, total, statements, {})


def _verified_result(
    topology: Topology,
    round_id: str,
    total: RingArray,
    statements: Sequence[dict[str, Any]],
    meta: dict[str, Any],
) -> AggregateResult:
    st = verify_statements(topology, round_id, total, statements)
    return AggregateResult(
        round_id=round_id,
        total=topology.encoding.decode(total),
        field_total=total,
        num_clients=st.num_clients,
        dropped_clients=st.dropped_clients,
        epsilon=st.epsilon,
        delta=st.delta,
        noise_stddev=st.noise_stddev,
        cumulative_epsilon=meta.get("cumulative_epsilon"),
        cumulative_delta=meta.get("cumulative_delta"),
        timings=dict(meta.get("timings", {})),
        statements=tuple(statements),
    )


class Collector:
    """Orchestrates rounds for the aggregators of ``topology``.

    ``token``: the collector's bearer tokens, required unless the topology is ``insecure``:
    one per aggregator (each aggregator issues its own: ``collector.token`` in its party
    directory), as a sequence or a comma-separated line; a single token is sent to all.
    """

    def __init__(
        self,
        topology: Topology,
        token: str | Sequence[str] | None = None,
        *,
        timeout_s: float = 60.0,
        retries: int = 3,
    ) -> None:
        self.topology = topology
        self._tokens = tokens_per_aggregator(token, topology.m)
        self.fingerprint = fingerprint(topology)
        self.timeout_s = timeout_s
        self.retries = retries
        self._session = KeptSession(timeout_s)

    def __repr__(self) -> str:
        return f"Collector(topology={self.topology.name!r})"

    async def __aenter__(self) -> Collector:
        """``async with Collector(...)``: one session, so its connections to the
        aggregators, kept for every call inside the block."""
        self._session.keep()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    def _apis(self, session: Any) -> list[AggregatorAPI]:
        return [
            AggregatorAPI(
                session,
                a,
                token=self._tokens[a.index],
                fingerprint=self.fingerprint,
                retries=self.retries,
            )
            for a in self.topology.aggregators
        ]

    # -- open ------------------------------------------------------------------------

    def open_round(self, round_id: str, dim: int, *, min_clients: int | None = None) -> None:
        """Open ``round_id`` for vectors of length ``dim`` on every aggregator (idempotent)."""
        run_sync(self.open_round_async(round_id, dim, min_clients=min_clients), "open_round")

    async def open_round_async(
        self, round_id: str, dim: int, *, min_clients: int | None = None
    ) -> None:
        codec.check_id("round", round_id)
        body: dict[str, Any] = {"dim": dim}
        if min_clients is not None:
            body["min_clients"] = min_clients
        async with self._session() as session:
            await asyncio.gather(
                *(
                    api.request("PUT", f"/v1/rounds/{round_id}", json_body=body)
                    for api in self._apis(session)
                )
            )

    # -- status ----------------------------------------------------------------------

    def status(self, round_id: str) -> list[dict[str, Any]]:
        """Each aggregator's view of ``round_id`` (state, accepted count, ...)."""
        return run_sync(self.status_async(round_id), "status")

    async def status_async(self, round_id: str) -> list[dict[str, Any]]:
        async with self._session() as session:
            answers = await asyncio.gather(
                *(api.request("GET", f"/v1/rounds/{round_id}") for api in self._apis(session))
            )
        return [json.loads(body) for _, body in answers]

    def rounds(self) -> list[dict[str, Any]]:
        """Each aggregator's list of the rounds it knows (``GET /v1/rounds``), in aggregator
        order: ``{"aggregator", "max_open", "max_open_s", "live", "ended_not_listed",
        "rounds": [{"round", "state", "dim", "accepted", "failure_code", "opened",
        "deadline"}, ...]}`` with every live round and the most recent ended ones
        (``opened`` and ``deadline`` in Unix seconds)."""
        return run_sync(self.rounds_async(), "rounds")

    async def rounds_async(self) -> list[dict[str, Any]]:
        """:meth:`rounds` for code that already runs an event loop."""
        async with self._session() as session:
            answers = await asyncio.gather(
                *(api.request("GET", "/v1/rounds") for api in self._apis(session))
            )
        return [json.loads(body) for _, body in answers]

    # -- abort -----------------------------------------------------------------------

    def abort(self, round_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Abort ``round_id`` at every aggregator: the leader broadcasts the abort, every
        aggregator holding the round open fails it (failure code ``cancelled``) with
        nothing revealed and deletes its journal; the id stays used. Waits until the round
        has ended at the leader and returns the leader's status of it (``state`` is
        ``failed``, or ``done`` if it had been revealed before). Idempotent: aborting an
        ended round returns its status.

        Raises :class:`~mpc_agg.errors.RemoteRefusal` with code ``unknown_round`` if the
        leader never opened the round (one opened only at followers fails there at its
        deadline) or ``round_not_open`` if its aggregation has started;
        :class:`~mpc_agg.errors.AggregationTimeout` after ``timeout`` seconds.
        """
        return run_sync(self.abort_async(round_id, timeout=timeout), "abort")

    async def abort_async(self, round_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """:meth:`abort` for code that already runs an event loop."""
        codec.check_id("round", round_id)
        deadline = time.monotonic() + timeout
        late = f"round {round_id!r} did not end within {timeout} s of its abort"
        path = f"/v1/rounds/{round_id}"
        async with self._session() as session:
            leader = self._apis(session)[0]

            async def ask(method: str) -> dict[str, Any]:
                try:
                    _, body = await leader.request(method, path, deadline=deadline)
                except AggregationTimeout as exc:
                    raise AggregationTimeout(f"{late}: {exc}") from None
                answer: dict[str, Any] = json.loads(body)
                return answer

            status = await ask("DELETE")
            delay = 0.02
            while status.get("state") not in ("done", "failed"):
                if time.monotonic() + delay > deadline:
                    raise AggregationTimeout(late)
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.5)
                status = await ask("GET")
        return status

    # -- aggregate -------------------------------------------------------------------

    def aggregate(self, round_id: str, timeout: float = 120.0) -> AggregateResult:
        """Close ``round_id``, wait for the reveal and return the result.

        Raises :class:`~mpc_agg.errors.RoundFailed` when the round failed (e.g. fewer than
        ``min_clients`` complete uploads: nothing is revealed) and
        :class:`~mpc_agg.errors.AggregationTimeout` after ``timeout`` seconds.
        """
        return run_sync(self.aggregate_async(round_id, timeout=timeout), "aggregate")

    async def aggregate_async(self, round_id: str, timeout: float = 120.0) -> AggregateResult:
        codec.check_id("round", round_id)
        deadline = time.monotonic() + timeout
        late = f"round {round_id!r} did not finish within {timeout} s"
        async with self._session() as session:
            leader = self._apis(session)[0]
            while True:  # the leader refuses to close while the party network is down
                try:
                    await leader.request("POST", f"/v1/rounds/{round_id}/close", deadline=deadline)
                    break
                except AggregationTimeout as exc:
                    raise AggregationTimeout(f"{late}: {exc}") from None
                except RemoteRefusal as exc:
                    if exc.code != "party_network_down":
                        raise
                    if time.monotonic() + 0.5 > deadline:
                        raise AggregationTimeout(f"{late}: {exc.detail}") from None
                    await asyncio.sleep(0.5)
            body = await _poll_until_done(leader, round_id, "result", deadline, late)
            total, meta = codec.decode_result(body, self.topology.encoding.ring)
            if not self.topology.has_keys:  # an in-process topology: nothing to verify with
                return _unverified_result(self.topology, round_id, total, meta)
            answers = await asyncio.gather(
                *(
                    _poll_until_done(api, round_id, "statement", deadline, late)
                    for api in self._apis(session)
                )
            )
        statements = [json.loads(raw) for raw in answers]
        return _verified_result(self.topology, round_id, total, statements, meta)


async def _poll_until_done(
    api: AggregatorAPI, round_id: str, what: str, deadline: float, late: str
) -> bytes:
    """GET ``/v1/rounds/{round}/{what}`` until the round has ended there (backing off from
    20 ms to 0.5 s); raises RoundFailed if it failed, AggregationTimeout past ``deadline``."""
    delay = 0.02
    while True:
        try:
            _, body = await api.request("GET", f"/v1/rounds/{round_id}/{what}", deadline=deadline)
            return body
        except AggregationTimeout as exc:
            raise AggregationTimeout(f"{late}: {exc}") from None
        except RemoteRefusal as exc:
            if exc.code == "round_failed":
                raise RoundFailed(round_id, exc.detail, exc.failure or "unknown") from None
            if exc.code != "result_not_ready":
                raise
        if time.monotonic() + delay > deadline:
            raise AggregationTimeout(late)
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _unverified_result(
    topology: Topology, round_id: str, total: RingArray, meta: dict[str, Any]
) -> AggregateResult:
    return AggregateResult(
        round_id=round_id,
        total=topology.encoding.decode(total),
        field_total=total,
        num_clients=int(meta["num_clients"]),
        dropped_clients=int(meta.get("dropped_clients", 0)),
        epsilon=meta.get("epsilon"),
        delta=meta.get("delta"),
        noise_stddev=meta.get("noise_stddev"),
        cumulative_epsilon=meta.get("cumulative_epsilon"),
        cumulative_delta=meta.get("cumulative_delta"),
        timings=dict(meta.get("timings", {})),
    )
