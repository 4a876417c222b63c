"""Section ``flower``: Flower SecAgg+ (``scripts/flower_secaggplus.py``) per cell, each run
under a time limit, its time put next to the matching grid cell (ratio Flower / mpc_agg)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mpc_agg.launcher import die_with_parent

from ..plan import ROOT
from ..report import Progress, fmt_dim, fmt_ratio, fmt_seconds, format_table, ratio

FLOWER_KEYS = ("seconds", "max_abs_error", "num_shares", "reconstruction_threshold", "flwr_version")
"""What the Flower runner's JSON result says, copied into the row."""


def parse_last_json_line(stdout: str) -> dict[str, Any] | None:
    """The JSON object on the last non-empty line of ``stdout``, or None."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        return None
    try:
        obj = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def run_flower_cell(
    script: Path, clients: int, dim: int, timeout_s: float
) -> tuple[dict[str, Any] | None, str | None]:
    """Run the Flower SecAgg+ script once: (its JSON result, None) or (None, why not)."""
    proc = subprocess.Popen(
        [sys.executable, str(script), "--clients", str(clients), "--dim", str(dim), "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a timeout stops all it started
        preexec_fn=die_with_parent,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group this bench created for it
        proc.communicate()
        return None, f"timed out after {timeout_s:g} s"
    if proc.returncode != 0:
        tail = " | ".join(stderr.strip().splitlines()[-3:])[-300:]
        return None, f"exited with code {proc.returncode}: {tail}"
    obj = parse_last_json_line(stdout)
    if obj is None or not isinstance(obj.get("seconds"), (int, float)):
        return None, "printed no JSON object with 'seconds' on its last line"
    return obj, None


def bench_flower(
    cells: Sequence[tuple[int, int]],
    script: Path,
    timeout_s: float,
    grid_rows: Sequence[dict[str, Any]],
    progress: Progress,
    save: Callable[[], None],
    out: list[dict[str, Any]],
) -> None:
    """Flower SecAgg+ per cell; its time next to the matching grid cell (ratio Flower/mpc_agg)."""
    reason = None
    if importlib.util.find_spec("flwr") is None:
        reason = "flwr is not installed (pip install -e '.[bench]')"
    elif not script.is_file():
        reason = f"{script} not found"
    by_cell: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in grid_rows:  # one row per ring of the run
        by_cell.setdefault((r["clients"], r["dim"]), []).append(r)
    for n, (clients, dim) in enumerate(cells, 1):
        tag = f"flower {n}/{len(cells)}: {clients} clients x d = {fmt_dim(dim)}"
        row: dict[str, Any] = {"clients": clients, "dim": dim}
        if reason is not None:
            row.update(status="skipped", reason=reason)
        else:
            progress.line(f"{tag}: running (timeout {timeout_s:.0f} s)")
            t = time.perf_counter()
            obj, why = run_flower_cell(script, clients, dim, timeout_s)
            row["wall_s"] = time.perf_counter() - t
            if obj is None:
                row.update(status="skipped", reason=why)
            else:
                row.update(status="ok", **{k: obj.get(k) for k in FLOWER_KEYS})
                row["flower"] = obj  # everything the script reported (stages, memory, ...)
        matching = by_cell.get((clients, dim), [])
        done = [c for c in matching if c.get("status") == "ok"]
        mpc_s = done[0].get("round_s") if done else None  # the run's first ring
        row["mpc_agg_s"] = mpc_s
        row["ratio"] = ratio(row.get("seconds"), mpc_s) if row["status"] == "ok" else None
        for cell in matching:
            if row["status"] == "ok":
                cell["flower_s"] = row["seconds"]
                cell["flower_ratio"] = (
                    ratio(row["seconds"], cell.get("round_s"))
                    if cell.get("status") == "ok"
                    else None
                )
            else:
                cell["flower_note"] = "skipped"
        progress.line(
            f"{tag}: "
            + (
                f"{fmt_seconds(row['seconds'])} (Flower/mpc_agg {fmt_ratio(row['ratio'])})"
                if row["status"] == "ok"
                else f"skipped: {row['reason']}"
            )
        )
        out.append(row)
        save()


def flower_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Flower cells as a table (skipped ones with their reason)."""
    body = []
    for r in rows:
        name = f"{r['clients']} x {fmt_dim(r['dim'])}"
        if r["status"] != "ok":
            body.append([name, "skipped: " + str(r["reason"])[:60], "", "", "", ""])
            continue
        body.append(
            [
                name,
                fmt_seconds(r["seconds"]),
                f"{r['max_abs_error']:.1e}" if r.get("max_abs_error") is not None else "n/a",
                f"{r.get('num_shares')}/{r.get('reconstruction_threshold')}",
                fmt_seconds(r["mpc_agg_s"]),
                fmt_ratio(r["ratio"]),
            ]
        )
    version = next((r.get("flwr_version") for r in rows if r.get("flwr_version")), None)
    return format_table(
        f"flower: SecAgg+ (SecAggPlusWorkflow + secaggplus_mod, flwr {version or 'n/a'}); "
        "ratio = Flower / mpc_agg",
        ["clients x d", "Flower", "max err", "shares/thr", "mpc_agg", "ratio"],
        body,
    )
