"""Section ``uploads``: the fixed cost of small uploads, end to end on the real federation,
against plaintext HTTP and plaintext HTTPS servers receiving the same vectors in the same
run (issue 15's small-upload targets).

Two cases at d = 1e4, each repeated with the three systems interleaved (mpc_agg, plain
HTTP, plain HTTPS; medians reported):

* ``shared``: 100 clients, 4 in flight, the simulated clients sharing one HTTP session
  (connections and TLS handshakes kept; ``Client(session=...)``), as the baselines' uploads
  share one;
* ``separate``: 200 clients, 8 in flight, each client with its own session (a TCP and, for
  mpc_agg and plain HTTPS, a TLS handshake per aggregator per client), as separate client
  processes would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..baselines import PlainServer, plain_round, self_signed_tls
from ..federation import Federation, mpc_round
from ..procs import PeakRss
from ..report import (
    Progress,
    fmt_bytes,
    fmt_ratio,
    fmt_seconds,
    format_table,
    median,
    ratio,
)
from ..workload import new_round_id

UPLOAD_CASES = (("shared", 100, 4), ("separate", 200, 8))
"""(sessions, clients, uploads in flight) of the uploads section, at d = UPLOAD_DIM."""

UPLOAD_DIM = 10**4

UPLOAD_REPEATS = 3


def bench_uploads(
    federations: Mapping[str, Federation],
    workdir: Path,
    progress: Progress,
    *,
    seed: int,
    timeout_s: float,
    repeats: int = UPLOAD_REPEATS,
) -> list[dict[str, Any]]:
    """One row per case and ring (one federation each): median wall times (s) of mpc_agg's
    round and of its upload phase, of the plain HTTP and HTTPS rounds, the ratios mpc_agg /
    baseline, and every aggregator's peak RSS over the case (bytes)."""
    http = PlainServer()
    https = PlainServer(self_signed_tls(workdir / "plain-tls"))
    rings = list(federations)
    rows = []
    try:
        http.start()
        https.start()
        for mode, clients, inflight in UPLOAD_CASES:
            tag = f"uploads: {clients} {mode} clients x 1e4, {inflight} in flight"
            times: dict[str, list[float]] = {"http": [], "https": []}
            monitors: dict[str, list[PeakRss]] = {}
            for ring in rings:
                federations[ring].ensure()
                monitors[ring] = [PeakRss(pid) for pid in federations[ring].pids]
                for mon in monitors[ring]:
                    mon.reset()
                times[f"mpc:{ring}"] = []
                times[f"upload:{ring}"] = []
            for rep in range(repeats):
                progress.line(f"{tag}: repeat {rep + 1}/{repeats}")
                for ring in rings if rep % 2 == 0 else rings[::-1]:
                    federation = federations[ring]
                    federation.ensure()
                    res = asyncio.run(
                        mpc_round(
                            federation.deployment,
                            new_round_id("uploads"),
                            clients,
                            UPLOAD_DIM,
                            seed=seed,
                            concurrency=inflight,
                            progress=progress,
                            label=f"{tag} [{ring}]",
                            timeout_s=timeout_s,
                            separate=mode == "separate",
                        )
                    )
                    if res["result"].num_clients != clients:
                        raise RuntimeError(f"{tag}: {res['result'].num_clients} clients counted")
                    times[f"mpc:{ring}"].append(res["round_s"])
                    times[f"upload:{ring}"].append(res["upload_s"])
                for key, server in (("http", http), ("https", https)):
                    wall, _ = asyncio.run(
                        plain_round(
                            server.url,
                            new_round_id("plain"),
                            clients,
                            UPLOAD_DIM,
                            seed=seed,
                            concurrency=inflight,
                            progress=progress,
                            label=tag,
                            timeout_s=timeout_s,
                            ssl_context=server.client_ssl,
                            separate=mode == "separate",
                        )
                    )
                    times[key].append(wall)
            for ring in rings:
                mpc, up = median(times[f"mpc:{ring}"]), median(times[f"upload:{ring}"])
                row: dict[str, Any] = {
                    "ring": ring,
                    "mode": mode,
                    "clients": clients,
                    "dim": UPLOAD_DIM,
                    "inflight": inflight,
                    "repeats": repeats,
                    "round_s": mpc,
                    "upload_s": up,
                    "per_upload_s": up / clients,
                    "http_s": median(times["http"]),
                    "https_s": median(times["https"]),
                    "aggregator_peak_rss_bytes": [mon.peak() for mon in monitors[ring]],
                    "all_s": times,
                }
                row["ratio_vs_http"] = ratio(mpc, row["http_s"])
                row["ratio_vs_https"] = ratio(mpc, row["https_s"])
                rows.append(row)
                progress.line(
                    f"{tag} [{ring}]: mpc_agg {fmt_seconds(mpc)}, HTTP "
                    f"{fmt_seconds(row['http_s'])}, HTTPS {fmt_seconds(row['https_s'])}"
                )
    finally:
        http.stop()
        https.stop()
    return rows


def uploads_table(rows: Sequence[dict[str, Any]]) -> str:
    """The uploads section's rows as a table."""
    return format_table(
        "uploads: small vectors end to end (open -> uploads -> aggregate), medians of "
        "interleaved repeats; plain HTTP has no TLS, plain HTTPS is the same server over "
        "TLS (P-256 certificate, as an aggregator's); per upload = upload phase / clients; peak "
        "RSS: the largest aggregator's over the case",
        [
            "clients x d",
            "ring",
            "sessions",
            "in flight",
            "mpc_agg",
            "uploads",
            "per upload",
            "plain HTTP",
            "ratio",
            "plain HTTPS",
            "ratio",
            "peak RSS",
        ],
        [
            [
                f"{r['clients']} x 1e4",
                r.get("ring", "gf_p61"),
                r["mode"],
                str(r["inflight"]),
                fmt_seconds(r["round_s"]),
                fmt_seconds(r["upload_s"]),
                fmt_seconds(r["per_upload_s"]),
                fmt_seconds(r["http_s"]),
                fmt_ratio(r["ratio_vs_http"]),
                fmt_seconds(r["https_s"]),
                fmt_ratio(r["ratio_vs_https"]),
                fmt_bytes(
                    max((p for p in r.get("aggregator_peak_rss_bytes") or [] if p), default=None)
                ),
            ]
            for r in rows
        ],
    )
