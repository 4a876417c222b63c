"""Benchmark mpc_agg on this machine, next to plaintext baselines measured in the same run.

    python -m scripts.benchmark                  # every section, full grid (8 min here)
    python -m scripts.benchmark --quick          # smoke run: d in {1e4, 1e5}, 10 clients
    python scripts/bench.py --only reveal,grid --json bench.json   # the same, as a script

Sections (``--only`` selects some, in this order):

client   ``Client.prepare`` (clip + encode + shard + serialise: everything a client does
         before uploading) per vector, with its parts, against numpy adding the same float64
         vector into a float64 accumulator.
ingest   the aggregator's upload path in process (``Aggregator.receive_share_async``; no
         HTTP, no MPC) for full-share bodies (8 d bytes) and seed-share bodies (16-byte
         seed, expanded by the aggregator), journal fsync on and off, 1 or 4 uploads in
         flight, against the same numpy add; plus ``core.xof.expand`` alone.
reveal   a real 3-party federation (``LocalFederation`` on free loopback ports, fsync as in
         the base config, HTTPS and tokens with keys provisioned for the run), 2 clients
         per round: reveal latency from the leader's timings and
         the collector's close -> result wall time, in µs per element to show linearity in d.
uploads  the fixed cost of small uploads: 100 clients x 1e4 sharing one HTTP session (4 in
         flight) and 200 separate clients x 1e4 (own sessions: TCP + TLS handshakes each, 8
         in flight), 3 interleaved repeats of mpc_agg, a plain HTTP server and the same
         server over HTTPS (same sessions and concurrency), medians and ratios.
grid     end-to-end rounds (open -> every upload -> aggregate returns) over clients x d,
         uploads ``--concurrency`` at a time (the simulated clients share one HTTP session,
         as the baseline's uploads do), vectors generated per client from a seed (never
         all held at once); baselines over the very same vectors: a plaintext numpy sum (adds
         only) and a plaintext HTTP aggregation (one aiohttp server process adding raw float64
         bodies over plain HTTP without tokens, same concurrency: the floor for this
         architecture, whose uploads go over HTTPS with tokens; both wall times include
         generating the vectors, reported apart in the JSON); peak RSS of every
         aggregator process against the target 4 x d x 8 B + 200 MB. Cells estimated to take
         longer than ``--cell-budget-s`` (from the per-client time of cells already run) or
         that cannot fit in memory or on disk are skipped, saying why; the must-complete cells
         10 x 1e7 and 1000 x 1e5 always run when selected.
flower   Flower SecAgg+ (``scripts/flower_secaggplus.py``: SecAggPlusWorkflow + secaggplus_mod)
         on clients {10, 100} x d {1e4, 1e5, 1e6}, each under ``--flower-timeout-s``; its time
         (the script's "seconds": the round, without start-up and data generation) is put
         next to the matching grid cell.

A *ratio* is always "mpc_agg time / baseline time" for the same work measured in this run
(2.0x: mpc_agg takes twice as long), except Flower's, which is "Flower time / mpc_agg time"
(10x: mpc_agg is ten times faster). Progress goes to stderr, tables to stdout (each section's
table as it completes, then the grid with Flower and the targets), ``--json PATH`` writes every
raw figure and the machine's description. Exit status: 0 (skipped cells included), 1 when a
round fails or a revealed total is wrong, 2 on bad options.

The code: :mod:`.plan` (what runs, budgets), :mod:`.report` (units, tables, progress),
:mod:`.targets`, :mod:`.procs` (processes, memory, machine), :mod:`.workload`,
:mod:`.federation`, :mod:`.baselines` (+ :mod:`.plain_server`), ``sections/`` (one module per
section, each with its table), and this module (options, the run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from mpc_agg import MpcAggError, Topology
from mpc_agg.launcher import LaunchError

from .baselines import PlainServer
from .federation import Federation
from .plan import (
    DEFAULT_CONFIG,
    FLOWER_SCRIPT,
    FULL_CLIENTS,
    FULL_DIMS,
    QUICK_CLIENTS,
    QUICK_DIMS,
    SECTIONS,
    flower_cells,
    grid_cells,
    parse_sections,
)
from .procs import machine_info
from .report import Progress, fmt_dim, one_line, parse_count
from .sections.client import bench_client, client_table
from .sections.flower import bench_flower, flower_table
from .sections.grid import bench_grid, grid_table
from .sections.ingest import bench_ingest, ingest_table
from .sections.reveal import bench_reveal, reveal_table
from .sections.uploads import bench_uploads, uploads_table
from .targets import evaluate_targets, targets_table
from .workload import topology_document


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options; ``--help`` prints this module's description of the sections."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.benchmark",
        description=__doc__.split("\n\n")[0].strip() if __doc__ else None,
        epilog=(__doc__ or "").split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: d in {1e4, 1e5}, 10 clients, short timings (under a minute)",
    )
    parser.add_argument("--json", metavar="PATH", help="write every raw figure to PATH")
    parser.add_argument(
        "--dims",
        help="comma-separated vector lengths for every section (default 1e4,1e5,1e6,1e7; "
        "with --quick 1e4,1e5)",
    )
    parser.add_argument(
        "--clients",
        help="comma-separated client counts of the grid and Flower (default 10,100,1000; "
        "with --quick 10)",
    )
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="base topology (default configs/local-3.yaml): its parties, threshold, encoding "
        "and fsync, on fresh loopback ports and a temporary data directory",
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="uploads in flight in the grid (default 4)"
    )
    parser.add_argument(
        "--cell-budget-s",
        type=float,
        default=300.0,
        help="skip a grid cell whose estimated round time exceeds this (default 300 s); "
        "the must-complete cells 10 x 1e7 and 1000 x 1e5 run anyway",
    )
    parser.add_argument(
        "--flower-timeout-s",
        type=float,
        default=300.0,
        help="time limit of one Flower SecAgg+ cell (default 300 s)",
    )
    parser.add_argument(
        "--flower-script",
        default=str(FLOWER_SCRIPT),
        help="the Flower SecAgg+ runner (default scripts/flower_secaggplus.py)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated vectors")
    parser.add_argument(
        "--workdir",
        help="directory for journals and logs (default: a new temporary directory, deleted "
        "at the end)",
    )
    return parser.parse_args(argv)


def load_base_config(path: str) -> dict[str, Any]:
    """The base topology document; refused (ValueError) with a ``dp`` section, which the
    benchmark does not measure. Its aggregators' addresses and keys are not used: the
    parties run on fresh loopback ports with throw-away keys and tokens the launcher
    provisions (HTTPS and tokens, unless the base is ``insecure``)."""
    Topology.load(path)  # validate it as users would
    doc: dict[str, Any] = yaml.safe_load(Path(path).read_text())
    if doc.get("dp"):
        raise ValueError(f"{path}: the benchmark supports topologies without dp")
    return doc


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0, 1 on a failed round, 2 on bad options,
    130 when interrupted)."""
    args = parse_args(argv)
    try:
        sections = parse_sections(args.only)
        dims = (
            [parse_count(x) for x in args.dims.split(",")]
            if args.dims
            else list(QUICK_DIMS if args.quick else FULL_DIMS)
        )
        clients = (
            [parse_count(x) for x in args.clients.split(",")]
            if args.clients
            else list(QUICK_CLIENTS if args.quick else FULL_CLIENTS)
        )
        base = load_base_config(args.config)
        if args.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
        if max(dims) > max(FULL_DIMS):
            raise ValueError(f"--dims above {fmt_dim(max(FULL_DIMS))} are not supported")
    except (ValueError, MpcAggError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dims = sorted(set(dims))
    min_total_s = 0.2 if args.quick else 1.0
    progress = Progress()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {
            "sections": list(sections),
            "quick": args.quick,
            "dims": dims,
            "clients": sorted(set(clients)),
            "config": args.config,
            "fsync": bool(base.get("fsync", True)),
            "concurrency": args.concurrency,
            "cell_budget_s": args.cell_budget_s,
            "flower_timeout_s": args.flower_timeout_s,
            "seed": args.seed,
        },
        **{
            k: []
            for k in ("client", "ingest", "seed_expansion", "reveal", "uploads", "grid", "flower")
        },
        "failures": [],
    }

    def save() -> None:
        if args.json:
            results["targets"] = evaluate_targets(results)
            Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")

    def show(text: str) -> None:
        print("\n" + text, flush=True)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mpc_agg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    federation = Federation(base, workdir, progress)
    server = PlainServer()
    topo3 = Topology.from_dict(topology_document(base, workdir / "unused"))
    progress.line(
        f"mpc_agg bench: sections {', '.join(sections)}; d {', '.join(map(fmt_dim, dims))}; "
        f"workdir {workdir}"
    )
    code = 0
    try:
        if "client" in sections:
            results["client"] = bench_client(topo3, dims, min_total_s, progress)
            show(client_table(results["client"]))
            save()
        if "ingest" in sections:
            results["ingest"], results["seed_expansion"] = bench_ingest(
                base, workdir, dims, min_total_s, progress
            )
            show(ingest_table(results["ingest"], results["seed_expansion"]))
            save()
        if "reveal" in sections:
            try:
                results["reveal"] = bench_reveal(
                    federation, dims, progress, timeout_s=max(600.0, args.cell_budget_s)
                )
                show(reveal_table(results["reveal"]))
            except Exception as exc:  # noqa: BLE001 - reported, and the exit status is 1
                results["failures"].append(one_line(f"reveal: {type(exc).__name__}: {exc}"))
                progress.line(f"reveal: FAILED: {type(exc).__name__}: {exc}")
                if not isinstance(exc, LaunchError):
                    progress.line(f"the parties' last output:\n{federation.log_tail()}")
            save()
        if "uploads" in sections:
            try:
                results["uploads"] = bench_uploads(
                    federation, workdir, progress, seed=args.seed, timeout_s=600.0
                )
                show(uploads_table(results["uploads"]))
            except Exception as exc:  # noqa: BLE001 - reported, and the exit status is 1
                results["failures"].append(one_line(f"uploads: {type(exc).__name__}: {exc}"))
                progress.line(f"uploads: FAILED: {type(exc).__name__}: {exc}")
            save()
        if "grid" in sections:
            if federation.fed is not None:
                # Fresh processes: memory an aggregator kept from the reveal section's largest
                # round would otherwise count in the first cells' peak RSS.
                progress.line("grid: restarting the federation for fresh processes")
                federation.stop()
                federation.fed = None
            bench_grid(
                federation,
                server,
                workdir,
                grid_cells(clients, dims),
                args,
                progress,
                save,
                results["grid"],
            )
            show(grid_table(results["grid"]))
        federation.stop()
        server.stop()
        if "flower" in sections:
            bench_flower(
                flower_cells(clients, dims),
                Path(args.flower_script),
                args.flower_timeout_s,
                results["grid"],
                progress,
                save,
                results["flower"],
            )
            show(flower_table(results["flower"]))
            if results["grid"]:
                show(grid_table(results["grid"]))
        results["failures"] += [
            f"grid {r['clients']} x {fmt_dim(r['dim'])}: {r['reason']}"
            for r in results["grid"]
            if r["status"] == "failed"
        ]
        results["targets"] = evaluate_targets(results)
        show(targets_table(results["targets"]))
        if results["failures"]:
            show("failures:\n" + "\n".join(f"  {f}" for f in results["failures"]))
            code = 1
    except KeyboardInterrupt:
        progress.line("interrupted")
        code = 130
    finally:
        federation.stop()
        server.stop()
        results["machine"]["loadavg_at_end"] = (
            list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        )
        results["machine"]["bench_peak_rss_bytes"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        results["machine"]["elapsed_s"] = time.perf_counter() - progress.started
        results["processes"] = {
            "aggregators": federation.started_pids,
            "plain_http_server": server.started_pids,
        }
        save()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    progress.line(f"done in {time.perf_counter() - progress.started:.1f} s")
    return code
