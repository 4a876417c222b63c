"""Section ``grid``: end-to-end rounds over clients x d on the real federation, with the
numpy and plaintext HTTP baselines over the same vectors and every aggregator's peak RSS;
cells that cannot finish in the budget or fit in memory or on disk are skipped, saying why."""

from __future__ import annotations

import argparse
import asyncio
import shutil
from collections.abc import Callable, Sequence
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
    one_line,
    ratio,
)
from ..workload import new_round_id


def bench_grid(
    federation: Federation,
    server: PlainServer,
    workdir: Path,
    cells: Sequence[tuple[int, int]],
    args: argparse.Namespace,
    progress: Progress,
    save: Callable[[], None],
    out: list[dict[str, Any]],
) -> None:
    """Run (or skip) every cell, appending one row per cell to ``out``."""
    measured: list[tuple[int, int, float]] = []
    m = len(federation.base["aggregators"])
    frac_bits = None
    for n, (clients, dim) in enumerate(cells, 1):
        tag = f"grid {n}/{len(cells)}: {clients} clients x d = {fmt_dim(dim)}"
        mem = available_memory_bytes()
        disk = shutil.disk_usage(workdir).free
        plan = plan_cell(
            clients,
            dim,
            estimate_s=estimate_round_seconds(measured, clients, dim),
            budget_s=args.cell_budget_s,
            memory_bytes=cell_memory_bytes(dim, m, args.concurrency),
            available_memory_bytes=None if mem is None else int(mem * MEMORY_HEADROOM),
            disk_bytes=cell_disk_bytes(clients, dim),
            free_disk_bytes=int(disk * MEMORY_HEADROOM),
            must_run=(clients, dim) in MUST_RUN,
        )
        row: dict[str, Any] = {
            "clients": clients,
            "dim": dim,
            "must_run": plan.must_run,
            "estimate_s": plan.estimate_s,
            "status": "skipped",
            "reason": plan.reason,
            "rss_target_bytes": rss_target_bytes(dim),
        }
        out.append(row)
        if not plan.run:
            progress.line(f"{tag}: skipped: {plan.reason}")
            save()
            continue
        est = "" if plan.estimate_s is None else f" (estimated {plan.estimate_s:.0f} s)"
        progress.line(f"{tag}: running{est}")
        try:
            federation.ensure()
            topo = federation.topology
            frac_bits = topo.encoding.frac_bits
            monitors = [PeakRss(pid) for pid in federation.pids]
            for mon in monitors:
                mon.reset()
            row["aggregator_rss_before_bytes"] = [mon.current() for mon in monitors]
            res = asyncio.run(
                mpc_round(
                    federation.deployment,
                    new_round_id("grid"),
                    clients,
                    dim,
                    seed=args.seed,
                    concurrency=args.concurrency,
                    progress=progress,
                    label=tag,
                    timeout_s=max(600.0, 4 * args.cell_budget_s),
                )
            )
            row["aggregator_peak_rss_bytes"] = [mon.peak() for mon in monitors]
            row["rss_method"] = monitors[0].method
        except Exception as exc:  # noqa: BLE001 - any failure of a round is reported
            row.update(status="failed", reason=one_line(f"{type(exc).__name__}: {exc}"))
            row["error"] = f"{type(exc).__name__}: {exc}"
            progress.line(f"{tag}: FAILED: {row['error']}")
            if not isinstance(exc, LaunchError):  # a LaunchError carries the parties' output
                progress.line(f"the parties' last output:\n{federation.log_tail()}")
            save()
            continue
        result = res.pop("result")
        row.update(res)
        row["timings"] = dict(result.timings)
        row["num_clients"] = result.num_clients
        measured.append((clients, dim, res["round_s"]))
        progress.line(f"{tag}: round {res['round_s']:.2f} s; numpy baseline")
        add_s, gen_s, total = numpy_sum(clients, dim, args.seed)
        error = float(np.max(np.abs(result.total - total)))
        bound = clients * 2.0 ** -(frac_bits or 0) + 1e-9
        del result
        row.update(numpy_s=add_s, generate_s=gen_s, max_abs_error=error, error_bound=bound)
        row["ratio_vs_numpy"] = ratio(res["round_s"], add_s)
        if row["num_clients"] != clients or not error <= bound:
            row.update(
                status="failed",
                reason=f"wrong total: {row['num_clients']} clients counted, max abs error "
                f"{error:.3g} (bound {bound:.3g})",
            )
            progress.line(f"{tag}: FAILED: {row['reason']}")
            save()
            continue
        try:
            if not server.alive():
                server.start()
            mon = PeakRss(server.pid)
            mon.reset()
            http_s, http_total = asyncio.run(
                plain_round(
                    server.url,
                    new_round_id("plain"),
                    clients,
                    dim,
                    seed=args.seed,
                    concurrency=args.concurrency,
                    progress=progress,
                    label=tag,
                    timeout_s=max(600.0, 4 * args.cell_budget_s),
                )
            )
            row["http_s"] = http_s
            row["http_peak_rss_bytes"] = mon.peak()
            row["http_max_abs_error"] = float(np.max(np.abs(http_total - total)))
            row["ratio_vs_http"] = ratio(res["round_s"], http_s)
        except Exception as exc:  # noqa: BLE001 - a baseline failure is reported, not fatal
            row["http_error"] = f"{type(exc).__name__}: {exc}"
            progress.line(f"{tag}: plaintext HTTP baseline failed: {row['http_error']}")
        del total
        row["status"] = "ok"
        progress.line(
            f"{tag}: mpc_agg {fmt_seconds(res['round_s'])}, numpy {fmt_seconds(add_s)}, "
            f"HTTP {fmt_seconds(row.get('http_s'))}"
        )
        save()


def grid_table(rows: Sequence[dict[str, Any]]) -> str:
    """The grid (with Flower's times once measured), then the cells not run and why."""
    body = []
    notes = []
    for r in rows:
        name = f"{r['clients']} x {fmt_dim(r['dim'])}"
        if r["status"] != "ok":
            body.append([name, r["status"]] + [""] * 12)
            notes.append(f"  {name}: {r['status']}: {r['reason']}")
            continue
        peaks = [p for p in r.get("aggregator_peak_rss_bytes") or [] if p]
        peak = max(peaks) if peaks else None
        before = [p for p in r.get("aggregator_rss_before_bytes") or [] if p]
        fl = r.get("flower_s")
        body.append(
            [
                name,
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
