"""An aggregator's metrics for ``GET /metrics`` (README, "HTTP API (per aggregator)"),
through ``prometheus_client``.

Each :class:`~mpc_agg.aggregator.Aggregator` owns a
:class:`~prometheus_client.CollectorRegistry` (not the library's global one) holding an
:class:`AggregatorCollector`, which reads the aggregator's state at scrape time:

* ``mpc_agg_{name}_total`` for each plain counter (``uploads_accepted``, ``bytes_accepted``,
  ``uploads_refused``, ``rounds_opened``, ...);
* ``mpc_agg_rounds{state}`` (rounds in each state) and ``mpc_agg_open_rounds``;
* ``mpc_agg_dropped_clients_total{round}``: clients left out of each aggregated round;
* ``mpc_agg_party_link_up{peer}``: 1 while the link to that party is up, else 0;
* ``mpc_agg_privacy_epsilon_spent`` (with DP): the ledger's cumulative epsilon.

The HTTP server adds its own (:mod:`mpc_agg.transport.http_metrics`). Every sample carries
``aggregator="{index}"``. :func:`render_metrics` renders counters and round states alone
(pure, for tests and tools).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mpc_agg.core.rounds import Round, RoundState
from mpc_agg.dp.accountant import PrivacyLedger

__all__ = ["AggregatorCollector", "MetricsSource", "metrics_text", "render_metrics"]


class _Links(Protocol):
    @property
    def connected(self) -> bool: ...

    def missing(self) -> list[int]: ...


class MetricsSource(Protocol):
    """What :class:`AggregatorCollector` reads of an aggregator."""

    @property
    def index(self) -> int: ...

    @property
    def metrics(self) -> Mapping[str, int]: ...

    @property
    def rounds(self) -> Mapping[str, Round]: ...

    @property
    def registry(self) -> CollectorRegistry: ...


def _counters(index: int, counters: Mapping[str, int]) -> Iterator[Metric]:
    for name, value in sorted(counters.items()):
        family = CounterMetricFamily(
            f"mpc_agg_{name}", name.replace("_", " "), labels=["aggregator"]
        )
        family.add_metric([str(index)], value)
        yield family


def _rounds(index: int, round_states: Iterable[str]) -> Iterator[Metric]:
    by_state: dict[str, int] = {}
    for state in round_states:
        by_state[state] = by_state.get(state, 0) + 1
    family = GaugeMetricFamily(
        "mpc_agg_rounds", "Rounds known here by state", labels=["aggregator", "state"]
    )
    for state, count in sorted(by_state.items()):
        family.add_metric([str(index), state], count)
    yield family
    opened = GaugeMetricFamily("mpc_agg_open_rounds", "Rounds open", labels=["aggregator"])
    opened.add_metric([str(index)], by_state.get(RoundState.OPEN.value, 0))
    yield opened


class _Static(Collector):
    def __init__(self, index: int, counters: Mapping[str, int], states: list[str]) -> None:
        self.index, self.counters, self.states = index, counters, states

    def collect(self) -> Iterator[Metric]:
        yield from _counters(self.index, self.counters)
        yield from _rounds(self.index, self.states)


def render_metrics(index: int, counters: Mapping[str, int], round_states: Iterable[str]) -> str:
    """The exposition text of ``counters`` (one counter ``mpc_agg_{name}_total`` each) and
    the gauges ``mpc_agg_rounds{state}`` (one item of ``round_states`` per round) and
    ``mpc_agg_open_rounds``, labelled ``aggregator="{index}"``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Static(index, counters, list(round_states)))
    return generate_latest(registry).decode()


class AggregatorCollector(Collector):
    """Everything ``source`` (an :class:`~mpc_agg.aggregator.Aggregator`) exposes, read at
    scrape time."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source
        self._spent: tuple[int, float] | None = None  # (ledger entries, epsilon) cache

    def collect(self) -> Iterator[Metric]:
        src = self.source
        index = str(src.index)
        rounds = list(src.rounds.values())
        yield from _counters(src.index, src.metrics)
        yield from _rounds(src.index, (r.state.value for r in rounds))
        dropped = CounterMetricFamily(
            "mpc_agg_dropped_clients",
            "Clients left out of an aggregated round (their upload reached only some aggregators)",
            labels=["aggregator", "round"],
        )
        for rnd in rounds:
            if rnd.num_clients is not None:
                dropped.add_metric([index, rnd.round_id], len(rnd.dropped_clients))
        yield dropped
        network: _Links | None = getattr(src, "network", None)
        topology = getattr(src, "topology", None)
        if network is not None and topology is not None:
            links = GaugeMetricFamily(
                "mpc_agg_party_link_up",
                "1 while the party link to that aggregator is up",
                labels=["aggregator", "peer"],
            )
            down = set(network.missing()) if not network.connected else set()
            for peer in range(topology.m):
                if peer != src.index:
                    links.add_metric([index, str(peer)], 0 if peer in down else 1)
            yield links
        ledger: PrivacyLedger | None = getattr(src, "ledger", None)
        if ledger is not None:
            entries = len(ledger.events)
            if self._spent is None or self._spent[0] != entries:
                self._spent = (entries, ledger.spent())
            spent = GaugeMetricFamily(
                "mpc_agg_privacy_epsilon_spent",
                "Cumulative epsilon charged to the privacy ledger (at the budget's delta)",
                labels=["aggregator"],
            )
            spent.add_metric([index], self._spent[1])
            yield spent
            budget = GaugeMetricFamily(
                "mpc_agg_privacy_epsilon_budget",
                "The privacy budget's epsilon",
                labels=["aggregator"],
            )
            budget.add_metric([index], ledger.budget_epsilon)
            yield budget


def metrics_text(aggregator: MetricsSource) -> str:
    """The exposition text of ``aggregator``'s registry (``aggregator.registry``)."""
    return generate_latest(aggregator.registry).decode()
