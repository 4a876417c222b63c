"""An aggregator's counters and round gauge as Prometheus text (README, "HTTP API (per
aggregator)": ``GET /metrics``).

:func:`render_metrics` is pure: counters and round states in, the exposition text out.
:func:`metrics_text` feeds it from an aggregator's ``index``, ``metrics`` and ``rounds``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from mpc_agg.core.rounds import Round

__all__ = ["MetricsSource", "metrics_text", "render_metrics"]


def render_metrics(index: int, counters: Mapping[str, int], round_states: Iterable[str]) -> str:
    """Prometheus text format for aggregator ``index``.

    One counter ``mpc_agg_{name}_total`` per entry of ``counters`` (sorted by name), then the
    gauge ``mpc_agg_rounds`` with the number of rounds in each state of ``round_states``
    (one item per round, e.g. ``"open"``; sorted by state). Every sample is labelled
    ``aggregator="{index}"``; the text ends with a newline.
    """
    lines = []
    for name, value in sorted(counters.items()):
        lines.append(f"# TYPE mpc_agg_{name}_total counter")
        lines.append(f'mpc_agg_{name}_total{{aggregator="{index}"}} {value}')
    by_state: dict[str, int] = {}
    for state in round_states:
        by_state[state] = by_state.get(state, 0) + 1
    lines.append("# TYPE mpc_agg_rounds gauge")
    for state, count in sorted(by_state.items()):
        lines.append(f'mpc_agg_rounds{{aggregator="{index}",state="{state}"}} {count}')
    return "\n".join(lines) + "\n"


class MetricsSource(Protocol):
    """What :func:`metrics_text` reads of an aggregator."""

    @property
    def index(self) -> int: ...

    @property
    def metrics(self) -> Mapping[str, int]: ...

    @property
    def rounds(self) -> Mapping[str, Round]: ...


def metrics_text(aggregator: MetricsSource) -> str:
    """:func:`render_metrics` of ``aggregator``'s counters and the states of its rounds."""
    return render_metrics(
        aggregator.index,
        aggregator.metrics,
        (rnd.state.value for rnd in aggregator.rounds.values()),
    )
