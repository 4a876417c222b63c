"""The performance targets, judged against the figures of one run.

README, "Cost model and performance". Figures for the record, not asserts: each target is
"met", "NOT met" or "n/a" (not measured in this run).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .plan import INGEST_CASES, MUST_RUN, rss_target_bytes
from .report import fmt_dim, fmt_ratio, fmt_seconds, format_table


def verdict(ok: bool | None) -> str:
    """``"met"``, ``"NOT met"`` or ``"n/a"`` (None: not measured)."""
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def reference_row(rows: Sequence[dict[str, Any]], dim: int = 10**6) -> dict[str, Any] | None:
    """The row measured at ``dim``, else the one with the largest dimension (None if empty)."""
    if not rows:
        return None
    exact = [r for r in rows if r["dim"] == dim]
    return exact[0] if exact else max(rows, key=lambda r: r["dim"])


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance targets against the figures in ``results`` (the JSON document's
    sections; README, "Cost model and performance").

    Each entry: ``target`` (text), ``value`` (formatted measurement), ``verdict``.
    """
    out: list[dict[str, Any]] = []

    def add(target: str, value: str, ok: bool | None) -> None:
        out.append({"target": target, "value": value, "verdict": verdict(ok)})

    ingest = results.get("ingest", [])
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
    ref = reference_row(results.get("seed_expansion", []), dim=10**7)
    gbps = ref["gbps"] if ref else None
    add(
        "seed expansion >= 1 GB/s per core" + (f" (d={fmt_dim(ref['dim'])})" if ref else ""),
        "n/a" if gbps is None else f"{gbps:.2f} GB/s",
        None if gbps is None else gbps >= 1.0,
    )
    worst: tuple[float, dict[str, Any]] | None = None
    for cell in results.get("grid", []):
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
    reveal = {r["dim"]: r for r in results.get("reveal", []) if r.get("reveal_s") is not None}
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
    cells = {(c["clients"], c["dim"]): c for c in results.get("grid", [])}
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
    uploads = {r["mode"]: r for r in results.get("uploads", [])}
    for mode, what in (("shared", "100 x 1e4"), ("separate", "200 separate clients x 1e4")):
        row = uploads.get(mode)
        r_up = row.get("ratio_vs_http") if row else None
        add(
            f"e2e {what} <= 2.5x plaintext HTTP (uploads section)",
            fmt_ratio(r_up),
            None if r_up is None else r_up <= 2.5,
        )
    for clients, dim in MUST_RUN:
        cell = cells.get((clients, dim))
        status = None if cell is None else cell.get("status")
        value = "not selected" if cell is None else str(status)
        if cell is not None and status == "ok":
            value = f"ok in {fmt_seconds(cell['round_s'])}"
        add(
            f"round of {clients} x {fmt_dim(dim)} completes",
            value,
            None if cell is None else status == "ok",
        )
    return out


def targets_table(targets: Sequence[dict[str, Any]]) -> str:
    """The targets with their measured value and verdict."""
    return format_table(
        "performance targets: figures to report, not asserts",
        ["target", "measured", "verdict"],
        [[t["target"], t["value"], t["verdict"]] for t in targets],
    )
