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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..baselines import PlainServer, plain_round, self_signed_tls
from ..federation import Federation, mpc_round
from ..report import Progress, fmt_ratio, fmt_seconds, format_table, median, ratio
from ..workload import new_round_id

UPLOAD_CASES = (("shared", 100, 4), ("separate", 200, 8))
"""(sessions, clients, uploads in flight) of the uploads section, at d = UPLOAD_DIM."""

UPLOAD_DIM = 10**4

UPLOAD_REPEATS = 3


def bench_uploads(
    federation: Federation,
    workdir: Path,
    progress: Progress,
    *,
    seed: int,
    timeout_s: float,
    repeats: int = UPLOAD_REPEATS,
) -> list[dict[str, Any]]:
    """One row per case: median wall times (s) of mpc_agg's round and of its upload phase,
    of the plain HTTP and HTTPS rounds, and the ratios mpc_agg / baseline."""
    http = PlainServer()
    https = PlainServer(self_signed_tls(workdir / "plain-tls"))
    rows = []
    try:
        http.start()
        https.start()
        for mode, clients, inflight in UPLOAD_CASES:
            tag = f"uploads: {clients} {mode} clients x 1e4, {inflight} in flight"
            times: dict[str, list[float]] = {"mpc": [], "upload": [], "http": [], "https": []}
            for rep in range(repeats):
                progress.line(f"{tag}: repeat {rep + 1}/{repeats}")
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
                        label=tag,
                        timeout_s=timeout_s,
                        separate=mode == "separate",
                    )
                )
                if res["result"].num_clients != clients:
                    raise RuntimeError(f"{tag}: {res['result'].num_clients} clients counted")
                times["mpc"].append(res["round_s"])
                times["upload"].append(res["upload_s"])
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
            mpc, up = median(times["mpc"]), median(times["upload"])
            row = {
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
                "all_s": times,
            }
            row["ratio_vs_http"] = ratio(mpc, row["http_s"])
            row["ratio_vs_https"] = ratio(mpc, row["https_s"])
            rows.append(row)
            progress.line(
                f"{tag}: mpc_agg {fmt_seconds(mpc)}, HTTP {fmt_seconds(row['http_s'])}, "
                f"HTTPS {fmt_seconds(row['https_s'])}"
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
        "TLS (P-256 certificate, as an aggregator's); per upload = upload phase / clients",
        [
            "clients x d",
            "sessions",
            "in flight",
            "mpc_agg",
            "uploads",
            "per upload",
            "plain HTTP",
            "ratio",
            "plain HTTPS",
            "ratio",
        ],
        [
            [
                f"{r['clients']} x 1e4",
                r["mode"],
                str(r["inflight"]),
                fmt_seconds(r["round_s"]),
                fmt_seconds(r["upload_s"]),
                fmt_seconds(r["per_upload_s"]),
                fmt_seconds(r["http_s"]),
                fmt_ratio(r["ratio_vs_http"]),
                fmt_seconds(r["https_s"]),
                fmt_ratio(r["ratio_vs_https"]),
            ]
            for r in rows
        ],
    )
