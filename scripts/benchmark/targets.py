"""The performance targets, judged against the figures of one run.

README, "Cost model and performance". Figures for the record, not asserts: each target is
"met", "NOT met" or "n/a" (not measured in this run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .plan import (
    INGEST_CASES,
    LARGE_CELL,
    MUST_RUN,
    RSS_CELL,
    SEQUENTIAL_CELL,
    rss_target_bytes,
)
from .report import MB, fmt_dim, fmt_ratio, fmt_seconds, format_table


def verdict(ok: bool | None) -> str:
    """``"met"``, ``"NOT met"`` or ``"n/a"`` (None: not measured)."""
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def reference_row(rows: Sequence[dict[str, Any]], dim: int = 10**6) -> dict[str, Any] | None:
    """The row measured at ``dim``, else the one with the largest dimension (None if empty)."""
    if not rows:
        return None
    exact = [r for r in rows if r["dim"] == dim]
    return exact[0] if exact else max(rows, key=lambda r: r["dim"])


RING_SECTIONS = (
    "client",
    "ingest",
    "seed_expansion",
    "reveal",
    "uploads",
    "sequential",
    "grid",
    "rss",
    "large",
)


def rings_of(results: dict[str, Any]) -> list[str]:
    """The rings measured in ``results``, in order of appearance (rows without one are
    ``gf_p61``'s, as every run before ``--rings``); ``["gf_p61"]`` when there is none."""
    rings: list[str] = []
    for key in RING_SECTIONS:
        for row in results.get(key) or []:
            ring = row.get("ring", "gf_p61")
            if ring not in rings:
                rings.append(ring)
    return rings or ["gf_p61"]


def of_ring(rows: Sequence[dict[str, Any]] | None, ring: str) -> list[dict[str, Any]]:
    """The rows of ``ring`` (rows without one are ``gf_p61``'s)."""
    return [r for r in rows or [] if r.get("ring", "gf_p61") == ring]


def the_cell(rows: Sequence[dict[str, Any]], cell: tuple[int, int]) -> dict[str, Any] | None:
    """The row of (clients, d) ``cell``, else the one with the largest d (and clients)."""
    exact = [r for r in rows if (r["clients"], r["dim"]) == cell]
    if exact:
        return exact[0]
    return max(rows, key=lambda r: (r["dim"], r["clients"])) if rows else None


def _mb(n: float) -> str:
    return f"{n / MB:.0f} MB"


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance targets against the figures in ``results`` (the JSON document's
    sections; README, "Cost model and performance"), per ring when a run measured several
    (each target then names its ring).

    Each entry: ``target`` (text), ``value`` (formatted measurement), ``verdict``.
    """
    out: list[dict[str, Any]] = []
    rings = rings_of(results)
    for ring in rings:
        tag = f" [{ring}]" if len(rings) > 1 else ""

        def add(target: str, value: str, ok: bool | None, tag: str = tag) -> None:
            out.append({"target": target + tag, "value": value, "verdict": verdict(ok)})

        _ring_targets(results, ring, add)
    return out


def _ring_targets(
    results: dict[str, Any], ring: str, add: Callable[[str, str, bool | None], None]
) -> None:
    """The targets of one ring's figures, through ``add(target, value, ok)``."""
    ingest = of_ring(results.get("ingest"), ring)
    for fsync, inflight in INGEST_CASES:
        rows = [
            r
            for r in ingest
            if r["kind"] == "full" and r["fsync"] is fsync and r.get("inflight", 1) == inflight
        ]
        ref = reference_row(rows)
        r = ref["ratio_vs_numpy"] if ref else None
        where = f"d={fmt_dim(ref['dim'])}, " if ref else ""
        add(
            f"full-share ingest <= 3x numpy add ({where}fsync {'on' if fsync else 'off'}, "
            f"{inflight} in flight)",
            fmt_ratio(r),
            None if r is None else r <= 3.0,
        )
    ref = reference_row(of_ring(results.get("seed_expansion"), ring), dim=10**7)
    gbps = ref["gbps"] if ref else None
    add(
        "seed expansion >= 1 GB/s per core" + (f" (d={fmt_dim(ref['dim'])})" if ref else ""),
        "n/a" if gbps is None else f"{gbps:.2f} GB/s",
        None if gbps is None else gbps >= 1.0,
    )
    grid = of_ring(results.get("grid"), ring)
    worst: tuple[float, dict[str, Any]] | None = None
    for cell in grid:
        peaks = [p for p in cell.get("aggregator_peak_rss_bytes") or [] if p]
        if cell.get("status") == "ok" and peaks:
            q = max(peaks) / rss_target_bytes(cell["dim"])
            if worst is None or q > worst[0]:
                worst = (q, cell)
    add(
        "aggregator peak RSS <= 4*d*8 B + 200 MB (worst cell)",
        "n/a"
        if worst is None
        else f"{fmt_ratio(worst[0])} of target at {worst[1]['clients']} x "
        f"{fmt_dim(worst[1]['dim'])}",
        None if worst is None else worst[0] <= 1.0,
    )
    rss_cell = the_cell(of_ring(results.get("rss"), ring), RSS_CELL)
    peaks = [p for p in (rss_cell or {}).get("peak_rss_bytes") or [] if p]
    where = f"{rss_cell['clients']} x {fmt_dim(rss_cell['dim'])}" if rss_cell else "100 x 1e6"
    add(
        f"aggregator peak RSS (VmHWM) at {where} <= 4*d*8 B + 200 MB",
        f"{_mb(max(peaks))} of {_mb(rss_cell['rss_target_bytes'])}"
        if rss_cell and peaks
        else "n/a",
        None if not (rss_cell and peaks) else max(peaks) <= rss_cell["rss_target_bytes"],
    )
    reveal = {
        r["dim"]: r for r in of_ring(results.get("reveal"), ring) if r.get("reveal_s") is not None
    }
    r6 = reveal.get(10**6)
    add(
        "reveal of d=1e6 among 3 parties <= 1 s",
        fmt_seconds(r6["reveal_s"]) if r6 else "n/a",
        None if r6 is None else r6["reveal_s"] <= 1.0,
    )
    per_elt = [r["us_per_element"] for d, r in reveal.items() if d >= 10**5]
    spread = max(per_elt) / min(per_elt) if len(per_elt) >= 2 and min(per_elt) > 0 else None
    add(
        "reveal linear in d (max/min µs per element, d >= 1e5, within 2x)",
        fmt_ratio(spread),
        None if spread is None else spread <= 2.0,
    )
    cells = {(c["clients"], c["dim"]): c for c in grid}
    c = cells.get((100, 10**6))
    ok_cell = c is not None and c.get("status") == "ok"
    r_http = c.get("ratio_vs_http") if ok_cell and c else None
    add(
        "e2e 100 x 1e6 <= 2x plaintext HTTP",
        fmt_ratio(r_http),
        None if r_http is None else r_http <= 2.0,
    )
    r_fl = c.get("flower_ratio") if ok_cell and c else None
    add(
        "e2e 100 x 1e6 >= 5x faster than Flower SecAgg+",
        fmt_ratio(r_fl),
        None if r_fl is None else r_fl >= 5.0,
    )
    uploads = {r["mode"]: r for r in of_ring(results.get("uploads"), ring)}
    for mode, what in (("shared", "100 x 1e4"), ("separate", "200 separate clients x 1e4")):
        row = uploads.get(mode)
        r_up = row.get("ratio_vs_http") if row else None
        add(
            f"e2e {what} <= 2.5x plaintext HTTP (uploads section)",
            fmt_ratio(r_up),
            None if r_up is None else r_up <= 2.5,
        )
    row = the_cell(of_ring(results.get("sequential"), ring), SEQUENTIAL_CELL)
    where = f"{row['clients']} x {fmt_dim(row['dim'])}" if row else "20 x 1e6"
    r_tcp = row.get("ratio_vs_tcp") if row else None
    add(
        f"{where} one after another <= 3x raw TCP float32 stream",
        fmt_ratio(r_tcp),
        None if r_tcp is None else r_tcp <= 3.0,
    )
    row = the_cell(of_ring(results.get("large"), ring), LARGE_CELL)
    where = f"{row['clients']} x {fmt_dim(row['dim'])}" if row else "3 x 1e8"
    status = None if row is None else row.get("status")
    add(
        f"large {where} (default topology, max_dim raised) completes exactly",
        "not selected"
        if row is None
        else (f"exact in {fmt_seconds(row['round_s'])}" if status == "ok" else str(status)),
        None if row is None else status == "ok",
    )
    peaks = [p for p in (row or {}).get("aggregator_peak_rss_bytes") or [] if p]
    add(
        f"large {where}: aggregator peak RSS <= 2*d*8 B + 200 MB",
        f"{_mb(max(peaks))} of {_mb(row['rss_target_bytes'])}" if row and peaks else "n/a",
        None if not (row and peaks) else max(peaks) <= row["rss_target_bytes"],
    )
    for clients, dim in MUST_RUN:
        must = cells.get((clients, dim))
        status = None if must is None else must.get("status")
        value = "not selected" if must is None else str(status)
        if must is not None and status == "ok":
            value = f"ok in {fmt_seconds(must['round_s'])}"
        add(
            f"round of {clients} x {fmt_dim(dim)} completes",
            value,
            None if must is None else status == "ok",
        )


def targets_table(targets: Sequence[dict[str, Any]]) -> str:
    """The targets this run measured, with their value and verdict, then how many it did
    not (all of them are in the JSON)."""
    shown = [t for t in targets if t["verdict"] != "n/a"]
    table = format_table(
        "performance targets: figures to report, not asserts",
        ["target", "measured", "verdict"],
        [[t["target"], t["value"], t["verdict"]] for t in shown],
    )
    missing = len(targets) - len(shown)
    if missing:
        table += f"\n({missing} other targets not measured by the sections run)"
    return table
