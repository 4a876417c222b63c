"""What the HTTP server adds to an aggregator's ``/metrics`` (README, "HTTP API (per
aggregator)"), through ``prometheus_client`` into the aggregator's own
:class:`~prometheus_client.CollectorRegistry` (never the library's global one, so several
aggregators in one process, as in the tests, keep apart).

* ``mpc_agg_refusals_total{code, status}``: every error answer the server gave (handler
  refusals, parser errors, clients that vanished mid-body, internal errors);
* ``mpc_agg_upload_seconds``: histogram of accepted uploads' latency, from request head to
  answer;
* ``mpc_agg_uploads_in_flight``, ``mpc_agg_upload_buffer_bytes``: admission state;
* ``mpc_agg_connections_open``, ``mpc_agg_connections_closed_total{reason}`` (``evicted``,
  ``idle_timeout``), ``mpc_agg_connections_refused_total``: the connection gate.

Every sample carries ``aggregator="{index}"``.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from weakref import WeakKeyDictionary

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mpc_agg.transport.connections import ConnectionGate
from mpc_agg.transport.upload_limits import UploadLimits

__all__ = ["HttpMetrics", "LATENCY_BUCKETS"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Upload latency buckets, in seconds."""

_BY_REGISTRY: WeakKeyDictionary[CollectorRegistry, HttpMetrics] = WeakKeyDictionary()


class HttpMetrics(Collector):
    """The HTTP server's metrics in ``registry``: one instance per registry
    (:meth:`for_registry`), fed by one application's limits and connection gate."""

    def __init__(self, registry: CollectorRegistry, index: int) -> None:
        self.index = str(index)
        self.refusals: Tally[tuple[str, int]] = Tally()
        self.limits: UploadLimits | None = None
        self.gate: ConnectionGate | None = None
        self.upload_seconds = Histogram(
            "mpc_agg_upload_seconds",
            "Latency of accepted uploads, from request head to answer",
            ["aggregator"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ).labels(aggregator=self.index)
        registry.register(self)

    @classmethod
    def for_registry(cls, registry: CollectorRegistry, index: int) -> HttpMetrics:
        """The metrics of ``registry``, made on first use."""
        metrics = _BY_REGISTRY.get(registry)
        if metrics is None:
            metrics = _BY_REGISTRY[registry] = cls(registry, index)
        return metrics

    def refused(self, code: str, status: int) -> None:
        """Count one error answer."""
        self.refusals[(code, status)] += 1

    def collect(self) -> Iterator[Metric]:
        refusals = CounterMetricFamily(
            "mpc_agg_refusals",
            "Error answers by code and HTTP status",
            labels=["aggregator", "code", "status"],
        )
        for (code, status), count in sorted(self.refusals.items()):
            refusals.add_metric([self.index, code, str(status)], count)
        yield refusals
        if self.limits is not None:
            inflight = GaugeMetricFamily(
                "mpc_agg_uploads_in_flight",
                "Uploads admitted and not yet answered",
                labels=["aggregator"],
            )
            inflight.add_metric([self.index], self.limits.inflight)
            yield inflight
            held = GaugeMetricFamily(
                "mpc_agg_upload_buffer_bytes",
                "Bytes of upload bodies held in memory",
                labels=["aggregator"],
            )
            held.add_metric([self.index], self.limits.buffer.used)
            yield held
        if self.gate is not None:
            gate = self.gate
            opened = GaugeMetricFamily(
                "mpc_agg_connections_open", "HTTP connections open", labels=["aggregator"]
            )
            opened.add_metric([self.index], gate.open)
            yield opened
            closed = CounterMetricFamily(
                "mpc_agg_connections_closed",
                "HTTP connections the server closed: idle ones evicted for a new one, or "
                "without a request for the idle timeout",
                labels=["aggregator", "reason"],
            )
            closed.add_metric([self.index, "evicted"], gate.evicted)
            closed.add_metric([self.index, "idle_timeout"], gate.idle_closed)
            yield closed
            refused = CounterMetricFamily(
                "mpc_agg_connections_refused",
                "New HTTP connections reset at accept (every connection busy)",
                labels=["aggregator"],
            )
            refused.add_metric([self.index], gate.refused)
            yield refused
