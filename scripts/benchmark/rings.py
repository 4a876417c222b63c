"""The share rings a run measures (``--rings gf_p61,z2_32``), and the topology each one runs.

README, "Cost model and performance" (compact shares). Pure: a base topology document in,
one document per ring out. ``z2_32`` holds sums below 2^31 only, so when the base encoding
does not fit it (the shipped default: frac_bits 24, clip 1000, 10,000 clients), every ring
of the run takes :data:`COMPACT_ENCODING` instead, so that the rings are compared on the
same encoding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mpc_agg import Topology
from mpc_agg.core.ring import RINGS, ring_named
from mpc_agg.errors import ConfigError

COMPACT_ENCODING: dict[str, Any] = {"frac_bits": 16, "coord_clip": 1.0, "l2_clip": None}
"""The encoding of a run whose rings do not all fit the base's: 16 fractional bits and a
clip of 1.0 fit z2_32 for 32,767 clients (the simulated vectors lie in [-1, 1))."""

RING_NAMES = tuple(RINGS)
"""Every ring, as ``encoding.ring`` names it."""


def parse_rings(text: str) -> tuple[str, ...]:
    """``"z2_32,gf_p61"`` -> the named rings, in the order given, each once; ValueError
    naming the choices otherwise."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip()
        if not name:
            continue
        try:
            ring_named(name)
        except ValueError:
            raise ValueError(
                f"unknown ring {name!r}; choose from {', '.join(RING_NAMES)}"
            ) from None
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no ring named in {text!r}; choose from {', '.join(RING_NAMES)}")
    return tuple(names)


def base_ring(base: dict[str, Any]) -> str:
    """The ring of a parsed topology document (``gf_p61`` unless its encoding names one)."""
    return str((base.get("encoding") or {}).get("ring", "gf_p61"))


def _with_encoding(base: dict[str, Any], encoding: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(base))  # deep copy of plain YAML data
    doc["encoding"] = encoding
    return doc


def _fits(doc: dict[str, Any], max_clients: int) -> bool:
    """True when ``doc`` loads with room for ``max_clients`` clients (the ring's headroom)."""
    trial = json.loads(json.dumps(doc))
    rounds = dict(trial.get("rounds") or {})
    rounds["max_clients"] = max(int(rounds.get("max_clients", 0)), max_clients)
    trial["rounds"] = rounds
    try:
        Topology.from_dict(trial)
    except ConfigError:
        return False
    return True


def ring_bases(
    base: dict[str, Any], rings: Sequence[str], max_clients: int
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """One topology document per ring: ``base`` with ``encoding.ring`` set, and a note (else
    None) when the base encoding does not fit every ring with ``max_clients`` clients, so
    that all of them use :data:`COMPACT_ENCODING` instead (same encoding for a fair A/B)."""
    encoding = dict(base.get("encoding") or {})
    docs = {r: _with_encoding(base, {**encoding, "ring": r}) for r in rings}
    too_small = [r for r, doc in docs.items() if not _fits(doc, max_clients)]
    if not too_small:
        return docs, None
    compact = {k: v for k, v in {**encoding, **COMPACT_ENCODING}.items() if v is not None}
    compact.pop("ring", None)
    docs = {r: _with_encoding(base, {**compact, "ring": r}) for r in rings}
    misfit = [r for r, doc in docs.items() if not _fits(doc, max_clients)]
    if misfit:
        raise ValueError(
            f"ring(s) {', '.join(misfit)} cannot hold {max_clients} clients even with "
            f"frac_bits {COMPACT_ENCODING['frac_bits']} and clip {COMPACT_ENCODING['coord_clip']}"
        )
    old = ", ".join(f"{k} {v}" for k, v in encoding.items() if k != "ring") or "the defaults"
    note = (
        f"the base encoding ({old}) does not fit {', '.join(too_small)} with {max_clients} "
        f"clients: every ring of this run uses frac_bits {COMPACT_ENCODING['frac_bits']}, "
        f"coord_clip {COMPACT_ENCODING['coord_clip']}, no l2_clip"
    )
    return docs, note


def _pick(rows: Sequence[dict[str, Any]] | None, ring: str, **match: Any) -> dict[str, Any] | None:
    """The row of ``ring`` matching ``match`` at d = 1e6, else at the largest d."""
    fit = [
        r
        for r in rows or []
        if r.get("ring", "gf_p61") == ring
        and r.get("status", "ok") == "ok"
        and all(r.get(k) == v for k, v in match.items())
    ]
    exact = [r for r in fit if r["dim"] == 10**6]
    return exact[0] if exact else (max(fit, key=lambda r: r["dim"]) if fit else None)


def rings_table(results: dict[str, Any], rings: Sequence[str]) -> str:
    """The rings side by side (A/B summary of a run with ``--rings``): per-coordinate client
    cost, full-share size, ingest, reveal and every end-to-end cell measured, each at
    d = 1e6 where measured (else the largest d), with the ratio of each ring to the first."""
    from .report import fmt_bytes, fmt_dim, fmt_ratio, fmt_seconds, format_table, ratio

    quantities: list[tuple[str, dict[str, float | None], str]] = []

    def add(name: str, key: str, section: str, unit: str, **match: Any) -> None:
        values: dict[str, float | None] = {}
        dims = set()
        for ring in rings:
            row = _pick(results.get(section), ring, **match)
            values[ring] = None if row is None else row.get(key)
            if row is not None:
                dims.add(row["dim"])
        if any(v is not None for v in values.values()):
            where = f" (d={'/'.join(fmt_dim(d) for d in sorted(dims))})"
            quantities.append((name + where, values, unit))

    add("Client.prepare per coordinate", "ns_per_coordinate", "client", "ns")
    add("full-share upload", "full_share_bytes", "client", "B")
    add(
        "ingest, full share, fsync on",
        "per_client_s",
        "ingest",
        "s",
        kind="full",
        fsync=True,
        inflight=1,
    )
    add(
        "ingest, seed share, fsync on",
        "per_client_s",
        "ingest",
        "s",
        kind="seed",
        fsync=True,
        inflight=1,
    )
    add("reveal (leader)", "reveal_s", "reveal", "s")
    for section, label in (("sequential", "one after another"), ("grid", "end to end")):
        shapes = sorted(
            {
                (r["clients"], r["dim"])
                for r in results.get(section) or []
                if r.get("status", "ok") == "ok"
            }
        )
        for clients, dim in shapes:
            values: dict[str, float | None] = {}
            for ring in rings:
                row = next(
                    (
                        r
                        for r in results.get(section) or []
                        if r.get("ring", "gf_p61") == ring
                        and (r["clients"], r["dim"]) == (clients, dim)
                        and r.get("status", "ok") == "ok"
                    ),
                    None,
                )
                values[ring] = None if row is None else row.get("round_s")
            quantities.append((f"{label} {clients} x {fmt_dim(dim)}", values, "s"))
    for mode in ("shared", "separate"):
        add(f"small uploads, {mode} sessions", "round_s", "uploads", "s", mode=mode)
    add("large round", "round_s", "large", "s")
    for section, key in (("rss", "peak_rss_bytes"), ("large", "aggregator_peak_rss_bytes")):
        peak: dict[str, float | None] = {}
        for ring in rings:
            row = _pick(results.get(section), ring)
            peaks = [p for p in (row or {}).get(key) or [] if p]
            peak[ring] = max(peaks) if peaks else None
        if any(v is not None for v in peak.values()):
            quantities.append((f"aggregator peak RSS ({section})", peak, "B"))
    if not quantities:
        return "rings side by side: nothing measured here depends on the ring"

    def show(v: float | None, unit: str) -> str:
        if v is None:
            return "n/a"
        if unit == "ns":
            return f"{v:.1f} ns"
        return fmt_bytes(v) if unit == "B" else fmt_seconds(v)

    first = rings[0]
    body = [
        [name]
        + [show(values[r], unit) for r in rings]
        + [fmt_ratio(ratio(values[r], values[first])) for r in rings[1:]]
        for name, values, unit in quantities
    ]
    return format_table(
        "rings side by side (medians as measured above); ratio = ring / " + first,
        ["quantity", *rings, *(f"{r}/{first}" for r in rings[1:])],
        body,
    )
