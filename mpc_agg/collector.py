"""The collector role: open rounds on every aggregator, trigger aggregation, fetch the total.

docs/design.md, "Processes". The collector opens a round on each aggregator (same id and
dimension), asks the leader to close it once clients have submitted, and polls the leader
for the revealed total, which it decodes with the topology's encoding.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mpc_agg.config.schema import Topology
from mpc_agg.core import codec
from mpc_agg.core.field import FieldArray
from mpc_agg.errors import AggregationTimeout, RemoteRefusal, RoundFailed
from mpc_agg.transport.http_client import AggregatorAPI, new_session, run_sync


@dataclass(frozen=True)
class AggregateResult:
    """A revealed round.

    ``total``: the decoded sum (float64, length d); ``field_total``: the exact sum in GF(p);
    ``num_clients``: clients counted; ``dropped_clients``: partial uploads left out;
    ``epsilon``/``delta``: the round's privacy cost (None without DP);
    ``noise_stddev``: standard deviation of the noise in each coordinate of ``total``
    (output units; None without DP); ``cumulative_epsilon``/``cumulative_delta``: the
    privacy spent by all rounds so far, this one included (None without DP);
    ``timings``: seconds spent by phase at the leader.
    """

    round_id: str
    total: npt.NDArray[np.float64]
    field_total: FieldArray
    num_clients: int
    dropped_clients: int
    epsilon: float | None
    delta: float | None
    noise_stddev: float | None = None
    cumulative_epsilon: float | None = None
    cumulative_delta: float | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Collector:
    """Orchestrates rounds for the aggregators of ``topology``.

    ``token``: the collector's bearer token, required when the topology has ``auth``
    (``collector.token`` made by ``scripts/make_secrets.py``).
    """

    def __init__(
        self,
        topology: Topology,
        token: str | None = None,
        *,
        timeout_s: float = 60.0,
        retries: int = 3,
    ) -> None:
        self.topology = topology
        self.token = token
        self.timeout_s = timeout_s
        self.retries = retries

    def __repr__(self) -> str:
        return f"Collector(topology={self.topology.name!r})"

    def _apis(self, session: Any) -> list[AggregatorAPI]:
        return [
            AggregatorAPI(session, a, token=self.token, retries=self.retries)
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
        async with new_session(self.timeout_s, self.topology) as session:
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
        async with new_session(self.timeout_s, self.topology) as session:
            answers = await asyncio.gather(
                *(api.request("GET", f"/v1/rounds/{round_id}") for api in self._apis(session))
            )
        return [json.loads(body) for _, body in answers]

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
        async with new_session(self.timeout_s, self.topology) as session:
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
            delay = 0.02
            while True:
                try:
                    _, body = await leader.request(
                        "GET", f"/v1/rounds/{round_id}/result", deadline=deadline
                    )
                    break
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
        total, meta = codec.decode_result(body)
        return AggregateResult(
            round_id=round_id,
            total=self.topology.encoding.decode(total),
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
