"""Section ``rss``: the peak resident memory of every aggregator process over a whole
round of clients x d (issue 15's target: 100 x 1e6 within 4 x 8d + 200 MB per process).

Each (ring, cell) runs on a federation started for it alone and stopped after it, so the
kernel's high-water mark ``VmHWM`` (``/proc/<pid>/status``), read once the round's total
is back, is the process's peak over its whole life: start-up, the uploads (4 in flight,
the simulated clients sharing one HTTP session, as in the grid), the agreement and the
reveal. Its idle ``VmRSS`` (ready, before the round) and its ``VmRSS`` at the end are
reported next to it; the revealed total is checked against the numpy sum.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..baselines import numpy_sum
from ..federation import Federation, mpc_round
from ..plan import rss_target_bytes
from ..procs import process_memory
from ..report import MB, Progress, fmt_dim, fmt_seconds, format_table
from ..workload import new_round_id


def bench_rss(
    bases: Mapping[str, dict[str, Any]],
    workdir: Path,
    cells: Sequence[tuple[int, int]],
    progress: Progress,
    *,
    seed: int,
    concurrency: int,
    timeout_s: float,
) -> tuple[list[dict[str, Any]], list[int]]:
    """One row per (cell, ring): each aggregator's idle, peak (``VmHWM``) and final RSS in
    bytes against the target; and the pids of every party started (all stopped)."""
    rows: list[dict[str, Any]] = []
    pids: list[int] = []
    for clients, dim in cells:
        for ring, base in bases.items():
            tag = f"rss: {clients} clients x d = {fmt_dim(dim)} [{ring}]"
            progress.line(f"{tag}: fresh federation")
            fed = Federation(base, workdir, progress, name=f"rss-{ring}-{clients}x{dim}")
            try:
                fed.ensure()
                pids += fed.pids
                idle = [process_memory(p).get("VmRSS") for p in fed.pids]
                res = asyncio.run(
                    mpc_round(
                        fed.deployment,
                        new_round_id("rss"),
                        clients,
                        dim,
                        seed=seed,
                        concurrency=concurrency,
                        progress=progress,
                        label=tag,
                        timeout_s=timeout_s,
                    )
                )
                memory = [process_memory(p) for p in fed.pids]
                frac_bits = fed.topology.encoding.frac_bits
            finally:
                fed.stop()
            result = res.pop("result")
            _, _, expected = numpy_sum(clients, dim, seed)
            error = float(np.max(np.abs(result.total - expected)))
            bound = clients * 2.0**-frac_bits + 1e-9
            if result.num_clients != clients or not error <= bound:
                raise RuntimeError(
                    f"{tag}: wrong total ({result.num_clients} clients counted, max abs "
                    f"error {error:.3g}, bound {bound:.3g})"
                )
            del result, expected
            peaks = [m.get("VmHWM") for m in memory]
            target = rss_target_bytes(dim)
            known = [p for p in peaks if p]
            row = {
                "ring": ring,
                "clients": clients,
                "dim": dim,
                "round_s": res["round_s"],
                "upload_bytes": res["upload_bytes"],
                "idle_rss_bytes": idle,
                "peak_rss_bytes": peaks,
                "end_rss_bytes": [m.get("VmRSS") for m in memory],
                "rss_target_bytes": target,
                "worst_of_target": max(known) / target if known else None,
                "max_abs_error": error,
            }
            rows.append(row)
            progress.line(
                f"{tag}: round {fmt_seconds(res['round_s'])}, peak RSS "
                + ", ".join("n/a" if p is None else f"{p / MB:.0f} MB" for p in peaks)
                + f" (target {target / MB:.0f} MB)"
            )
    return rows, pids


def rss_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rss section's rows: per aggregator idle / peak / end RSS in MB, and the target."""

    def mb(values: Sequence[int | None]) -> str:
        return " / ".join("n/a" if v is None else f"{v / MB:.0f}" for v in values)

    return format_table(
        "rss: every aggregator's resident memory over one round on a fresh federation, in "
        "MB per aggregator (0 / 1 / 2); peak = VmHWM over the process's life",
        ["clients x d", "ring", "round", "idle RSS", "peak RSS", "end RSS", "target", "verdict"],
        [
            [
                f"{r['clients']} x {fmt_dim(r['dim'])}",
                r["ring"],
                fmt_seconds(r["round_s"]),
                mb(r["idle_rss_bytes"]),
                mb(r["peak_rss_bytes"]),
                mb(r["end_rss_bytes"]),
                f"{r['rss_target_bytes'] / MB:.0f}",
                "n/a"
                if r["worst_of_target"] is None
                else ("met" if r["worst_of_target"] <= 1.0 else "NOT met"),
            ]
            for r in rows
        ],
    )
