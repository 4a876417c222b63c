"""Section ``reveal``: 2-client rounds on the real 3-party federation; the leader's reveal
time and the collector's close -> result wall time, in µs per element to show linearity
in d."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from ..federation import Federation, mpc_round
from ..plan import REVEAL_CLIENTS
from ..report import Progress, fmt_dim, fmt_seconds, format_table, median
from ..workload import new_round_id


def bench_reveal(
    federations: Mapping[str, Federation],
    dims: Sequence[int],
    progress: Progress,
    timeout_s: float,
) -> list[dict[str, Any]]:
    """Per d and ring (one federation each): 2-client rounds on the real federation; the
    leader's reveal time and the collector's close -> result wall time (s), and µs per
    element."""
    return [
        reveal_row(ring, federation, dim, progress, timeout_s)
        for dim in dims
        for ring, federation in federations.items()
    ]


def reveal_row(
    ring: str, federation: Federation, dim: int, progress: Progress, timeout_s: float
) -> dict[str, Any]:
    """One d of the reveal section on ``federation`` (of ``ring``)."""
    reps = 3 if dim <= 10**5 else (2 if dim <= 10**6 else 1)
    runs = []
    for rep in range(reps):
        federation.ensure()
        label = f"reveal: d = {fmt_dim(dim)} [{ring}], round {rep + 1}/{reps}"
        progress.line(label)
        out = asyncio.run(
            mpc_round(
                federation.deployment,
                new_round_id("reveal"),
                REVEAL_CLIENTS,
                dim,
                seed=rep,
                concurrency=REVEAL_CLIENTS,
                progress=progress,
                label=label,
                timeout_s=timeout_s,
            )
        )
        if out["result"].num_clients != REVEAL_CLIENTS:
            raise RuntimeError(
                f"reveal round counted {out['result'].num_clients} clients, "
                f"expected {REVEAL_CLIENTS}"
            )
        runs.append(out)
    timings = [dict(o["result"].timings) for o in runs]
    reveal_s = (
        median([t["reveal_s"] for t in timings]) if all("reveal_s" in t for t in timings) else None
    )
    agree_s = (
        median([t["agree_s"] for t in timings]) if all("agree_s" in t for t in timings) else None
    )
    wall = median([o["aggregate_s"] for o in runs])
    return {
        "ring": ring,
        "dim": dim,
        "clients": REVEAL_CLIENTS,
        "reps": reps,
        "reveal_s": reveal_s,
        "agree_s": agree_s,
        "close_to_result_s": wall,
        "us_per_element": None if reveal_s is None else reveal_s / dim * 1e6,
        "wall_us_per_element": wall / dim * 1e6,
        "timings": timings,
    }


def reveal_table(rows: Sequence[dict[str, Any]]) -> str:
    """The reveal section's rows as a table."""
    return format_table(
        f"reveal: 3-party local federation, {REVEAL_CLIENTS} clients (leader timings; "
        "close->result is the collector's wall time)",
        ["d", "ring", "rounds", "agree", "reveal", "µs/elt", "close->result", "µs/elt", "target"],
        [
            [
                fmt_dim(r["dim"]),
                r.get("ring", "gf_p61"),
                str(r["reps"]),
                fmt_seconds(r["agree_s"]),
                fmt_seconds(r["reveal_s"]),
                "n/a" if r["us_per_element"] is None else f"{r['us_per_element']:.3f}",
                fmt_seconds(r["close_to_result_s"]),
                f"{r['wall_us_per_element']:.3f}",
                f"<= {fmt_seconds(r['dim'] / 1e6)}",
            ]
            for r in rows
        ],
    )
