"""Section ``sequential``: clients submitting one after another (each waits until the
previous upload was accepted) to the real local federation, against a raw TCP stream of the
same vectors as float32 into one asyncio server process (:mod:`..tcp_server`) in the same
run (issue 15's target: 20 x 1e6 within 3x).

Both sides get the same vectors, generated before the clock starts (generation is not
timed on either side), and make one connection per client: mpc_agg's clients each open
their own HTTPS sessions to the three aggregators (TLS handshakes included, as separate
client processes would), the baseline's each their own TCP connection. A round is open ->
every upload -> the total returned (mpc_agg: the collector's verified result; the baseline:
the float64 sum). Repeated with the systems interleaved (ring order alternating), medians
reported; every aggregator's peak RSS over the cell.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..baselines import TcpServer, tcp_sequential_round
from ..federation import Federation, mpc_round
from ..plan import rss_target_bytes
from ..procs import PeakRss
from ..report import (
    Progress,
    fmt_bytes,
    fmt_dim,
    fmt_ratio,
    fmt_seconds,
    format_table,
    median,
    ratio,
)
from ..workload import client_vector, new_round_id


def bench_sequential(
    federations: Mapping[str, Federation],
    cells: Sequence[tuple[int, int]],
    progress: Progress,
    *,
    seed: int,
    repeats: int,
    timeout_s: float,
) -> list[dict[str, Any]]:
    """One row per (cell, ring): median wall times (s) of mpc_agg's sequential round and
    of the raw TCP baseline over the same vectors, their ratio, the worst error of each
    total against the numpy sum, and every aggregator's peak RSS (bytes)."""
    rings = list(federations)
    server = TcpServer()
    rows: list[dict[str, Any]] = []
    try:
        server.start()
        for clients, dim in cells:
            tag = f"sequential: {clients} clients x d = {fmt_dim(dim)} one after another"
            progress.line(f"{tag}: generating the vectors")
            vectors = [client_vector(seed, i, dim) for i in range(clients)]
            expected = np.sum(vectors, axis=0)
            times: dict[str, list[float]] = {"tcp": []}
            parts: dict[str, dict[str, list[float]]] = {
                r: {"upload": [], "aggregate": []} for r in rings
            }
            errors: dict[str, float] = {r: 0.0 for r in rings}
            monitors: dict[str, list[PeakRss]] = {}
            for ring in rings:
                federations[ring].ensure()
                monitors[ring] = [PeakRss(pid) for pid in federations[ring].pids]
                for mon in monitors[ring]:
                    mon.reset()
                times[ring] = []
            tcp_error = 0.0
            for rep in range(repeats):
                order = rings if rep % 2 == 0 else rings[::-1]
                for ring in order:
                    label = f"{tag} [{ring}] {rep + 1}/{repeats}"
                    progress.line(label)
                    fed = federations[ring]
                    fed.ensure()
                    res = asyncio.run(
                        mpc_round(
                            fed.deployment,
                            new_round_id("sequential"),
                            clients,
                            dim,
                            seed=seed,
                            concurrency=1,
                            progress=progress,
                            label=label,
                            timeout_s=timeout_s,
                            separate=True,
                            vector_of=vectors.__getitem__,
                        )
                    )
                    result = res["result"]
                    if result.num_clients != clients:
                        raise RuntimeError(f"{label}: {result.num_clients} clients counted")
                    errors[ring] = max(errors[ring], float(np.max(np.abs(result.total - expected))))
                    times[ring].append(res["round_s"])
                    parts[ring]["upload"].append(res["upload_s"])
                    parts[ring]["aggregate"].append(res["aggregate_s"])
                    del result, res
                wall, total = asyncio.run(
                    tcp_sequential_round(server.port, vectors, timeout_s=timeout_s)
                )
                times["tcp"].append(wall)
                tcp_error = max(tcp_error, float(np.max(np.abs(total - expected))))
            tcp_s = median(times["tcp"])
            for ring in rings:
                fed = federations[ring]
                frac_bits = fed.topology.encoding.frac_bits
                mpc = median(times[ring])
                row: dict[str, Any] = {
                    "ring": ring,
                    "clients": clients,
                    "dim": dim,
                    "repeats": repeats,
                    "sessions": "separate",
                    "round_s": mpc,
                    "upload_s": median(parts[ring]["upload"]),
                    "aggregate_s": median(parts[ring]["aggregate"]),
                    "per_client_s": median(parts[ring]["upload"]) / clients,
                    "tcp_s": tcp_s,
                    "ratio_vs_tcp": ratio(mpc, tcp_s),
                    "max_abs_error": errors[ring],
                    "error_bound": clients * 2.0**-frac_bits,
                    "tcp_max_abs_error": tcp_error,
                    "aggregator_peak_rss_bytes": [mon.peak() for mon in monitors[ring]],
                    "rss_method": monitors[ring][0].method if monitors[ring] else None,
                    "rss_target_bytes": rss_target_bytes(dim),
                    "all_s": {"mpc_agg": times[ring], "tcp": times["tcp"]},
                }
                if not errors[ring] <= row["error_bound"] + 1e-9:
                    raise RuntimeError(
                        f"{tag} [{ring}]: wrong total, max abs error {errors[ring]:.3g} "
                        f"(bound {row['error_bound']:.3g})"
                    )
                rows.append(row)
                progress.line(
                    f"{tag} [{ring}]: mpc_agg {fmt_seconds(mpc)}, raw TCP {fmt_seconds(tcp_s)} "
                    f"({fmt_ratio(row['ratio_vs_tcp'])})"
                )
            del vectors, expected
    finally:
        server.stop()
    return rows


def sequential_table(rows: Sequence[dict[str, Any]]) -> str:
    """The sequential section's rows as a table."""
    body = []
    for r in rows:
        peaks = [p for p in r.get("aggregator_peak_rss_bytes") or [] if p]
        body.append(
            [
                f"{r['clients']} x {fmt_dim(r['dim'])}",
                r["ring"],
                fmt_seconds(r["round_s"]),
                fmt_seconds(r["per_client_s"]),
                fmt_seconds(r["aggregate_s"]),
                fmt_seconds(r["tcp_s"]),
                fmt_ratio(r["ratio_vs_tcp"]),
                "<= 3x",
                fmt_bytes(max(peaks)) if peaks else "n/a",
                f"{r['max_abs_error']:.1e}",
            ]
        )
    return format_table(
        "sequential: clients one after another (open -> each upload accepted before the next "
        "-> total), each client its own connections; baseline: raw TCP float32 stream into "
        "one asyncio process, one connection per client; medians of interleaved repeats",
        [
            "clients x d",
            "ring",
            "mpc_agg",
            "per client",
            "aggregate",
            "raw TCP",
            "ratio",
            "target",
            "peak RSS",
            "max err",
        ],
        body,
    )
