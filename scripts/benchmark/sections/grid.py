"""Section ``grid``: end-to-end rounds over clients x d on the real federation, with the
numpy and plaintext HTTP baselines over the same vectors and every aggregator's peak RSS;
cells that cannot finish in the budget or fit in memory or on disk are skipped, saying why."""

from __future__ import annotations

import argparse
import asyncio
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpc_agg.launcher import LaunchError

from ..baselines import PlainServer, numpy_sum, plain_round
from ..federation import Federation, mpc_round
from ..plan import (
    MEMORY_HEADROOM,
    MUST_RUN,
    cell_disk_bytes,
    cell_memory_bytes,
    estimate_round_seconds,
    plan_cell,
    rss_target_bytes,
)
from ..procs import PeakRss, available_memory_bytes
from ..report import (
    Progress,
    fmt_bytes,
    fmt_dim,
    fmt_ratio,
    fmt_seconds,
    format_table,
    median,
    one_line,
    ratio,
)
from ..workload import new_round_id


def bench_grid(
    federations: Mapping[str, Federation],
    server: PlainServer,
    workdir: Path,
    cells: Sequence[tuple[int, int]],
    args: argparse.Namespace,
    progress: Progress,
    save: Callable[[], None],
    out: list[dict[str, Any]],
    repeats: int = 1,
) -> None:
    """Run (or skip) every cell on every ring's federation, appending one row per cell and
    ring to ``out``. With ``repeats`` > 1, each cell's rounds (rings in alternating order)
    and its plaintext HTTP baseline are repeated interleaved, and medians reported."""
    rings = list(federations)
    measured: dict[str, list[tuple[int, int, float]]] = {r: [] for r in rings}
    m = len(next(iter(federations.values())).base["aggregators"])
    for n, (clients, dim) in enumerate(cells, 1):
        tag = f"grid {n}/{len(cells)}: {clients} clients x d = {fmt_dim(dim)}"
        mem = available_memory_bytes()
        disk = shutil.disk_usage(workdir).free
        estimates = [estimate_round_seconds(measured[r], clients, dim) for r in rings]
        known = [e for e in estimates if e is not None]
        plan = plan_cell(
            clients,
            dim,
            estimate_s=sum(known) * repeats if known else None,
            budget_s=args.cell_budget_s,
            memory_bytes=cell_memory_bytes(dim, m, args.concurrency),
            available_memory_bytes=None if mem is None else int(mem * MEMORY_HEADROOM),
            disk_bytes=cell_disk_bytes(clients, dim),
            free_disk_bytes=int(disk * MEMORY_HEADROOM),
            must_run=(clients, dim) in MUST_RUN,
        )
        rows: dict[str, dict[str, Any]] = {}
        for ring in rings:
            rows[ring] = {
                "ring": ring,
                "clients": clients,
                "dim": dim,
                "must_run": plan.must_run,
                "estimate_s": plan.estimate_s,
                "status": "skipped",
                "reason": plan.reason,
                "repeats": repeats,
                "rss_target_bytes": rss_target_bytes(dim),
            }
            out.append(rows[ring])
        if not plan.run:
            progress.line(f"{tag}: skipped: {plan.reason}")
            save()
            continue
        est = "" if plan.estimate_s is None else f" (estimated {plan.estimate_s:.0f} s)"
        progress.line(f"{tag}: running{est}; numpy baseline first")
        add_s, gen_s, total = numpy_sum(clients, dim, args.seed)
        timeout_s = max(600.0, 4 * args.cell_budget_s)
        runs: dict[str, list[dict[str, Any]]] = {r: [] for r in rings}
        monitors: dict[str, list[PeakRss]] = {}
        http_runs: list[float] = []
        http_peak: int | None = None
        http_error: float | None = None
        for rep in range(repeats):
            for ring in rings if rep % 2 == 0 else rings[::-1]:
                row = rows[ring]
                if row.get("error"):
                    continue
                label = f"{tag} [{ring}]" + (f" {rep + 1}/{repeats}" if repeats > 1 else "")
                federation = federations[ring]
                try:
                    federation.ensure()
                    if ring not in monitors:
                        monitors[ring] = [PeakRss(pid) for pid in federation.pids]
                        for mon in monitors[ring]:
                            mon.reset()
                        row["aggregator_rss_before_bytes"] = [
                            mon.current() for mon in monitors[ring]
                        ]
                    res = asyncio.run(
                        mpc_round(
                            federation.deployment,
                            new_round_id("grid"),
                            clients,
                            dim,
                            seed=args.seed,
                            concurrency=args.concurrency,
                            progress=progress,
                            label=label,
                            timeout_s=timeout_s,
                        )
                    )
                except Exception as exc:  # noqa: BLE001 - any failure of a round is reported
                    row.update(status="failed", reason=one_line(f"{type(exc).__name__}: {exc}"))
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    progress.line(f"{label}: FAILED: {row['error']}")
                    if not isinstance(exc, LaunchError):  # a LaunchError carries the output
                        progress.line(f"the parties' last output:\n{federation.log_tail()}")
                    continue
                result = res.pop("result")
                frac_bits = federation.topology.encoding.frac_bits
                error = float(np.max(np.abs(result.total - total)))
                bound = clients * 2.0 ** -(frac_bits or 0) + 1e-9
                res.update(
                    timings=dict(result.timings),
                    num_clients=result.num_clients,
                    max_abs_error=error,
                    error_bound=bound,
                )
                del result
                if res["num_clients"] != clients or not error <= bound:
                    row.update(
                        status="failed",
                        error="wrong total",
                        reason=f"wrong total: {res['num_clients']} clients counted, max abs "
                        f"error {error:.3g} (bound {bound:.3g})",
                    )
                    progress.line(f"{label}: FAILED: {row['reason']}")
                    continue
                runs[ring].append(res)
                progress.line(f"{label}: round {res['round_s']:.2f} s")
            try:
                if not server.alive():
                    server.start()
                mon = PeakRss(server.pid)
                mon.reset()
                wall, http_total = asyncio.run(
                    plain_round(
                        server.url,
                        new_round_id("plain"),
                        clients,
                        dim,
                        seed=args.seed,
                        concurrency=args.concurrency,
                        progress=progress,
                        label=tag,
                        timeout_s=timeout_s,
                    )
                )
                http_runs.append(wall)
                peak = mon.peak()
                http_peak = max(http_peak or 0, peak or 0) or None
                http_error = float(np.max(np.abs(http_total - total)))
            except Exception as exc:  # noqa: BLE001 - a baseline failure is reported, not fatal
                for row in rows.values():
                    row["http_error"] = f"{type(exc).__name__}: {exc}"
                progress.line(f"{tag}: plaintext HTTP baseline failed: {type(exc).__name__}: {exc}")
                http_error = None
        del total
        http_s = median(http_runs) if http_runs else None
        for ring in rings:
            row = rows[ring]
            if ring in monitors:
                row["aggregator_peak_rss_bytes"] = [mon.peak() for mon in monitors[ring]]
                row["rss_method"] = monitors[ring][0].method
            if row.get("error") or not runs[ring]:
                save()
                continue
            done = runs[ring]
            for key in ("round_s", "open_s", "upload_s", "aggregate_s"):
                row[key] = median([r[key] for r in done])
            row["all_round_s"] = [r["round_s"] for r in done]
            row.update(
                upload_bytes=done[0]["upload_bytes"],
                timings=done[-1]["timings"],
                num_clients=done[-1]["num_clients"],
                max_abs_error=max(r["max_abs_error"] for r in done),
                error_bound=done[0]["error_bound"],
                numpy_s=add_s,
                generate_s=gen_s,
                ratio_vs_numpy=ratio(row["round_s"], add_s),
                http_s=http_s,
                all_http_s=http_runs,
                http_peak_rss_bytes=http_peak,
                http_max_abs_error=http_error,
                ratio_vs_http=ratio(row["round_s"], http_s),
                status="ok",
                reason=None,
            )
            measured[ring].append((clients, dim, row["round_s"]))
            progress.line(
                f"{tag} [{ring}]: mpc_agg {fmt_seconds(row['round_s'])}, numpy "
                f"{fmt_seconds(add_s)}, HTTP {fmt_seconds(http_s)}"
            )
        save()


def grid_table(rows: Sequence[dict[str, Any]]) -> str:
    """The grid (with Flower's times once measured), then the cells not run and why."""
    body = []
    notes = []
    for r in rows:
        name = f"{r['clients']} x {fmt_dim(r['dim'])}"
        ring = r.get("ring", "gf_p61")
        if r["status"] != "ok":
            body.append([name, ring, r["status"]] + [""] * 12)
            notes.append(f"  {name} [{ring}]: {r['status']}: {r['reason']}")
            continue
        peaks = [p for p in r.get("aggregator_peak_rss_bytes") or [] if p]
        peak = max(peaks) if peaks else None
        before = [p for p in r.get("aggregator_rss_before_bytes") or [] if p]
        fl = r.get("flower_s")
        body.append(
            [
                name,
                ring,
                fmt_seconds(r["round_s"]),
                fmt_seconds(r["upload_s"]),
                fmt_seconds(r["aggregate_s"]),
                fmt_seconds(r["numpy_s"]),
                fmt_ratio(r["ratio_vs_numpy"]),
                fmt_seconds(r.get("http_s")),
                fmt_ratio(r.get("ratio_vs_http")),
                fmt_bytes(max(before)) if before else "n/a",
                fmt_bytes(peak),
                fmt_bytes(r["rss_target_bytes"]),
                f"{r['max_abs_error']:.1e}",
                fmt_seconds(fl) if fl is not None else r.get("flower_note", ""),
                fmt_ratio(r.get("flower_ratio")) if fl is not None else "",
            ]
        )
    table = format_table(
        "grid: end-to-end round wall time (open -> uploads -> aggregate returns), 3 local "
        "parties; ratio = mpc_agg / baseline, Flower ratio = Flower / mpc_agg; RSS: the "
        "largest aggregator's, before the cell and at its peak",
        [
            "clients x d",
            "ring",
            "mpc_agg",
            "uploads",
            "aggregate",
            "numpy",
            "ratio",
            "plain HTTP",
            "ratio",
            "RSS before",
            "peak RSS",
            "RSS target",
            "max err",
            "Flower",
            "Fl/mpc",
        ],
        body,
    )
    return table + ("\nnot run:\n" + "\n".join(notes) if notes else "")
