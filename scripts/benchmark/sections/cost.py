"""Section ``cost1e9``: the cost of a round at d = 1e9 on paper, per party, extrapolated
linearly in d from what the other sections measured (README, "Cost model and performance":
the figures for d = 1e9 come from this command, not from a run at 1e9, which would need
about 3 x 16 GB of memory for the aggregators alone on one machine).

Each quantity is a line ``a + b d`` fitted by least squares to the rows of one section and
ring (those with d >= 1e6 when there are any: below, fixed costs blur the slope), or, from
a single d, the line through that point and a known fixed part (the idle RSS for memory,
zero for times). Sources, from this run's rows, else from ``--costs-from`` (a previous
run's JSON):

* ``client``: ``Client.prepare`` (encode + share + serialise, the whole-body path);
* ``ingest``: one full share and one seed share at an aggregator (fsync on, 1 in flight);
* ``reveal``: the leader's reveal among 3 parties;
* ``large`` (the streamed paths): a client's whole ``submit``, the upload phase of the
  clients at once, the collector's close -> verified ``.npy``, the peak RSS of the worst
  aggregator, of a client and of the collector, and the peak disk under the worst
  aggregator's data directory.

Bytes per coordinate per link come from the protocol (s = the ring's element size): a
client sends s to its full share's aggregator (the others get 16-byte seeds), every party
sends s to every other at the reveal, the leader s to the collector.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mpc_agg.core.ring import ring_named

from ..plan import LARGE_CELL, large_rss_target_bytes
from ..report import fmt_bytes, fmt_dim, fmt_seconds, format_table

PAPER_DIM = 10**9

PAPER_CLIENTS = LARGE_CELL[0]

SEED_SHARE_BYTES = 60
"""About what a seed share's body takes on the wire (bytes), whatever d."""

FIT_FROM_DIM = 10**6
"""Fits use the rows at d >= this when there are any."""


@dataclass(frozen=True)
class Fit:
    """``value(d) = intercept + slope * d`` (seconds or bytes), fitted to rows at ``dims``
    of ``section``."""

    intercept: float
    slope: float
    dims: tuple[int, ...]
    section: str

    def at(self, d: int) -> float:
        return self.intercept + self.slope * d

    @property
    def source(self) -> str:
        where = "/".join(fmt_dim(d) for d in self.dims)
        how = "fit" if len(self.dims) > 1 else "from one d"
        return f"{self.section} d={where} ({how})"


def fit_line(
    points: Sequence[tuple[int, float]], section: str, intercept: float = 0.0
) -> Fit | None:
    """The least-squares line through ``points`` ``(d, value)`` (those at d >=
    :data:`FIT_FROM_DIM` when there are any), or, when they have a single d, the line
    through their mean there and ``intercept`` at d = 0 (also when the fitted slope is not
    positive: noise over too small a range of d, so the largest d alone is used); None
    without points."""
    if not points:
        return None
    big = [p for p in points if p[0] >= FIT_FROM_DIM]
    points = big or list(points)
    dims = tuple(sorted({d for d, _ in points}))
    n = len(points)
    mean_d = sum(d for d, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    if len(dims) == 1:
        return Fit(intercept, (mean_y - intercept) / dims[0], dims, section)
    sxx = sum((d - mean_d) ** 2 for d, _ in points)
    sxy = sum((d - mean_d) * (y - mean_y) for d, y in points)
    slope = sxy / sxx
    if slope <= 0:  # noise over too small a range of d: the largest d alone says more
        top = [p for p in points if p[0] == dims[-1]]
        return fit_line(top, section, intercept)
    return Fit(mean_y - slope * mean_d, slope, dims, section)


def _rows(
    results: Mapping[str, Any], section: str, ring: str, **match: Any
) -> list[dict[str, Any]]:
    """The ok rows of ``ring`` in ``section`` matching ``match`` (rows without a ring are
    ``gf_p61``'s, as every run before ``--rings``)."""
    return [
        dict(r)
        for r in results.get(section) or []
        if r.get("ring", "gf_p61") == ring
        and r.get("status", "ok") == "ok"
        and all(r.get(k) == v for k, v in match.items())
    ]


@dataclass(frozen=True)
class PerCoordinate:
    """The fitted costs of one ring (None where not measured); ``large_clients``: clients
    of the large rows the ``uploads``, disk and per-aggregator fits come from."""

    ring: str
    itemsize: int
    prepare: Fit | None = None
    ingest_full: Fit | None = None
    ingest_seed: Fit | None = None
    reveal: Fit | None = None
    submit: Fit | None = None
    uploads: Fit | None = None
    collect: Fit | None = None
    aggregator_rss: Fit | None = None
    aggregator_disk: Fit | None = None
    client_rss: Fit | None = None
    collector_rss: Fit | None = None
    large_clients: int | None = None


def per_coordinate(results: Mapping[str, Any], ring: str) -> PerCoordinate:
    """The fitted costs of ``ring`` in a run's figures (module docstring)."""

    def pts(
        rows: Sequence[dict[str, Any]], value: Callable[[dict[str, Any]], float | None]
    ) -> list[tuple[int, float]]:
        out = []
        for r in rows:
            v = value(r)
            if v is not None:
                out.append((int(r["dim"]), float(v)))
        return out

    def worst(values: Sequence[float | None] | None) -> float | None:
        known = [v for v in values or [] if v]
        return max(known) if known else None

    fits: dict[str, Any] = {}
    client = _rows(results, "client", ring)
    fits["prepare"] = fit_line(pts(client, lambda r: r["prepare_s"]), "client")
    for kind in ("full", "seed"):
        ingest = _rows(results, "ingest", ring, kind=kind, fsync=True, inflight=1)
        fits[f"ingest_{kind}"] = fit_line(pts(ingest, lambda r: r["per_client_s"]), "ingest")
    reveal = _rows(results, "reveal", ring)
    fits["reveal"] = fit_line(pts(reveal, lambda r: r.get("reveal_s")), "reveal")
    large = [r for r in _rows(results, "large", ring) if "phases" in r]
    if large:
        clients = max(r["clients"] for r in large)
        large = [r for r in large if r["clients"] == clients]  # one shape of round
        fits["large_clients"] = clients
        fits["submit"] = fit_line(pts(large, lambda r: max(r["client_submit_s"])), "large")
        fits["uploads"] = fit_line(pts(large, lambda r: r["phases"]["uploads_s"]), "large")
        fits["collect"] = fit_line(pts(large, lambda r: r["collector_aggregate_s"]), "large")
        idle = worst(large[-1].get("aggregator_idle_rss_bytes")) or 0.0
        fits["aggregator_rss"] = fit_line(
            pts(large, lambda r: worst(r["aggregator_peak_rss_bytes"])), "large", idle
        )
        fits["aggregator_disk"] = fit_line(
            pts(large, lambda r: worst(r["data_dir_peak_bytes"])), "large"
        )
        start = worst(large[-1].get("client_start_rss_bytes")) or 0.0
        fits["client_rss"] = fit_line(
            pts(large, lambda r: worst(r["client_peak_rss_bytes"])), "large", start
        )
        start = large[-1].get("collector_start_rss_bytes") or 0.0
        fits["collector_rss"] = fit_line(
            pts(large, lambda r: r.get("collector_peak_rss_bytes")), "large", start
        )
    return PerCoordinate(ring, ring_named(ring).itemsize, **fits)


def paper_cost(
    pc: PerCoordinate, dim: int = PAPER_DIM, clients: int = PAPER_CLIENTS, m: int = 3
) -> list[dict[str, Any]]:
    """The cost of a round of ``clients`` x ``dim`` among ``m`` parties, per party, from
    ``pc``: rows of role, quantity, value at ``dim`` (s or bytes; None when not measured),
    per coordinate (ns or bytes), unit (``"s"``, ``"B"``) and how it was derived."""
    s = pc.itemsize
    rows: list[dict[str, Any]] = []

    def add(role: str, what: str, value: float | None, unit: str, how: str) -> None:
        per = None if value is None else value / dim * (1e9 if unit == "s" else 1.0)
        rows.append(
            {
                "role": role,
                "what": what,
                "value": value,
                "per_coordinate": per,
                "unit": unit,
                "how": how,
            }
        )

    def fitted(role: str, what: str, fit: Fit | None, unit: str, scale: float = 1.0) -> None:
        if fit is None:
            add(role, what, None, unit, "not measured")
        else:
            how = fit.source + (f", x {scale:g}" if scale != 1.0 else "")
            add(role, what, fit.at(dim) * scale, unit, how)

    full_per_agg = clients / m  # full shares go to hash(client) mod m: on average
    seed_per_agg = clients * (m - 1) / m
    # client
    fitted("client", "submit, streamed (share + upload)", pc.submit, "s")
    fitted("client", "prepare, whole-body path", pc.prepare, "s")
    if pc.client_rss is not None:
        fitted("client", "peak memory (its float64 input included)", pc.client_rss, "B")
    else:
        add("client", "memory: its float64 input", 8.0 * dim, "B", "model: 8 d")
    add(
        "client",
        "sent",
        s * dim + (m - 1) * SEED_SHARE_BYTES,
        "B",
        f"protocol: {s} d to one aggregator, a seed to each other",
    )
    # aggregator
    ingest = None
    how = "not measured"
    if pc.ingest_full is not None and pc.ingest_seed is not None:
        ingest = full_per_agg * pc.ingest_full.at(dim) + seed_per_agg * pc.ingest_seed.at(dim)
        how = f"{pc.ingest_full.source}, whole bodies"
    add(
        "aggregator",
        f"ingest of {full_per_agg:g} full + {seed_per_agg:g} seed shares",
        ingest,
        "s",
        how,
    )
    fitted("aggregator", "reveal", pc.reveal, "s")
    if pc.aggregator_rss is not None:
        fitted("aggregator", "peak memory (worst aggregator)", pc.aggregator_rss, "B")
    else:
        add(
            "aggregator",
            "peak memory: the target",
            float(large_rss_target_bytes(dim)),
            "B",
            "model: 2 x 8 d + 200 MB, not measured",
        )
    if pc.aggregator_disk is not None and pc.large_clients:
        fitted(
            "aggregator",
            "peak disk (worst aggregator: spool, journal)",
            pc.aggregator_disk,
            "B",
            clients / pc.large_clients,
        )
    else:
        add(
            "aggregator",
            "peak disk: spooled full shares",
            full_per_agg * s * dim,
            "B",
            f"model: {full_per_agg:g} x {s} d",
        )
    add(
        "aggregator",
        "sent (reveal; the leader also sends the result)",
        (m - 1) * s * dim,
        "B",
        f"protocol: {s} d to each of {m - 1} parties",
    )
    add(
        "aggregator",
        "received",
        (full_per_agg + m - 1) * s * dim,
        "B",
        "protocol: full shares + the others' sum shares",
    )
    # collector
    fitted("collector", "close -> verified .npy", pc.collect, "s")
    fitted("collector", "peak memory", pc.collector_rss, "B")
    add(
        "collector",
        "disk (float64 .npy + exact ring total)",
        (8 + s) * dim,
        "B",
        f"protocol: (8 + {s}) d",
    )
    add("collector", "received", s * dim, "B", f"protocol: {s} d from the leader")
    # the round, on this machine
    if pc.uploads is not None and pc.collect is not None and pc.large_clients:
        scale = clients / pc.large_clients
        add(
            "round",
            f"{clients} clients at once, then collect (this machine)",
            pc.uploads.at(dim) * scale + pc.collect.at(dim),
            "s",
            f"{pc.uploads.source}: uploads"
            + (f" x {scale:g}" if scale != 1 else "")
            + " + collect",
        )
    return rows


def bench_cost(
    results: Mapping[str, Any], rings: Sequence[str], dim: int = PAPER_DIM
) -> dict[str, Any]:
    """Per ring: the fits found and the paper cost at ``dim``."""
    out: dict[str, Any] = {}
    for ring in rings:
        pc = per_coordinate(results, ring)
        out[ring] = {"dim": dim, "fits": asdict(pc), "paper": paper_cost(pc, dim)}
    return out


def _value(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    return fmt_seconds(v) if unit == "s" else fmt_bytes(v)


def _per(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f} ns" if unit == "s" else f"{v:.2f} B"


def cost_table(costs: Mapping[str, Any]) -> str:
    """The paper cost of each ring as a table."""
    tables = []
    for ring, c in costs.items():
        tables.append(
            format_table(
                f"cost1e9: a round of {PAPER_CLIENTS} clients x d = {fmt_dim(c['dim'])} "
                f"[{ring}] on paper, per party, each figure a line a + b d fitted to what "
                "the named section measured (n/a: run it)",
                ["role", "quantity", "per coordinate", f"at d = {fmt_dim(c['dim'])}", "from"],
                [
                    [
                        r["role"],
                        r["what"],
                        _per(r["per_coordinate"], r["unit"]),
                        _value(r["value"], r["unit"]),
                        r["how"],
                    ]
                    for r in c["paper"]
                ],
            )
        )
    return "\n\n".join(tables)
