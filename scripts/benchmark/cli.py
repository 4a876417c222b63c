"""Benchmark mpc_agg on this machine, next to plaintext baselines measured in the same run.

    python -m scripts.benchmark                  # every section but large, full grid
    python -m scripts.benchmark --quick          # smoke run: d in {1e4, 1e5}, 10 clients
    python scripts/bench.py --only reveal,grid --json bench.json   # the same, as a script
    python -m scripts.benchmark --only grid --rings gf_p61,z2_32 --clients 10,100 --dims 1e6
    python -m scripts.benchmark --only large,cost1e9             # 3 x 1e8, then d = 1e9 on paper

Sections (``--only`` selects some, in this order; all but ``large`` by default):

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
sequential  clients one after another (each waits until the previous upload is accepted;
         default 20 x 1e6, each client its own connections) against a raw TCP stream of the
         same vectors as float32 into one asyncio server process, one connection per client
         (``tcp_server``); 3 interleaved repeats, medians, ratio; every aggregator's peak RSS.
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
rss      every aggregator's peak RSS (VmHWM, over the process's whole life) in one round of
         100 x 1e6 on a federation started for it, against 4 x 8d + 200 MB, in MB.
flower   Flower SecAgg+ (``scripts/flower_secaggplus.py``: SecAggPlusWorkflow + secaggplus_mod)
         on clients {10, 100} x d {1e4, 1e5, 1e6}, each under ``--flower-timeout-s``; its time
         (the script's "seconds": the round, without start-up and data generation) is put
         next to the matching grid cell.

large    3 clients x 1e8 (``--dims``/``--clients`` override) on the base topology with only
         max_dim raised: clients at once, each in its own process, full shares streamed, the
         total streamed into a memory-mapped .npy and checked exactly, block by block; time
         per phase, peak RSS of every aggregator (against 2 x 8d + 200 MB), of the clients
         and the collector, peak disk under the data directories, bytes sent.
cost1e9  d = 1e9 on paper: time, memory, disk and bytes per party, from the per-coordinate
         costs of the client, ingest, reveal and large sections (of this run, else of the
         JSON given to ``--costs-from``), scaled linearly in d.

Rings: ``--rings gf_p61,z2_32`` runs the sections that depend on the ring (client, ingest,
reveal, uploads, sequential, grid, rss, large) once per ring, interleaved where they repeat,
and prints an A/B summary; when the base encoding does not fit z2_32 every ring then uses
frac_bits 16 and coord_clip 1 (said on stderr and in the JSON). Default: the base's ring.

A *ratio* is always "mpc_agg time / baseline time" for the same work measured in this run
(2.0x: mpc_agg takes twice as long), except Flower's, which is "Flower time / mpc_agg time"
(10x: mpc_agg is ten times faster). Progress goes to stderr, tables to stdout (each section's
table as it completes, then the grid with Flower, the ring summary and the targets),
``--json PATH`` writes every raw figure and the machine's description. Exit status: 0
(skipped cells included), 1 when a round fails or a revealed total is wrong, 2 on bad
options.

The code: :mod:`.plan` (what runs, budgets), :mod:`.report` (units, tables, progress),
:mod:`.targets`, :mod:`.rings`, :mod:`.procs` (processes, memory, disk, machine),
:mod:`.workload`, :mod:`.federation`, :mod:`.baselines` (+ :mod:`.plain_server`,
:mod:`.tcp_server`), :mod:`.large_worker`, ``sections/`` (one module per section, each
with its table), and this module (options, the run).
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
    DEFAULT_SECTIONS,
    FLOWER_SCRIPT,
    FULL_CLIENTS,
    FULL_DIMS,
    QUICK_CLIENTS,
    QUICK_DIMS,
    SECTION_REPEATS,
    SECTIONS,
    check_dims,
    flower_cells,
    grid_cells,
    parse_sections,
    section_cells,
    small_dims,
)
from .procs import machine_info
from .report import Progress, fmt_dim, one_line, parse_count
from .rings import base_ring, parse_rings, ring_bases, rings_table
from .sections.client import bench_client, client_table
from .sections.cost import bench_cost, cost_table
from .sections.flower import bench_flower, flower_table
from .sections.grid import bench_grid, grid_table
from .sections.ingest import bench_ingest, ingest_table
from .sections.large import bench_large, large_table
from .sections.reveal import bench_reveal, reveal_table
from .sections.rss import bench_rss, rss_table
from .sections.sequential import bench_sequential, sequential_table
from .sections.uploads import bench_uploads, uploads_table
from .targets import evaluate_targets, targets_table
from .workload import room_for_clients, topology_document


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
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all but "
        "large, which needs about 10 GB of memory and 5 GB of disk)",
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
        "with --quick 1e4,1e5; sequential, rss and large have their own default d, which "
        "this replaces when given; those above 1e7, up to 1e9, are for large only)",
    )
    parser.add_argument(
        "--clients",
        help="comma-separated client counts of the grid and Flower (default 10,100,1000; "
        "with --quick 10); sequential, rss and large have their own default, which this "
        "replaces when given",
    )
    parser.add_argument(
        "--rings",
        help="comma-separated share rings to measure, of gf_p61,z2_32 (default: the base "
        "topology's)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="interleaved repeats of each measurement of uploads, sequential (default 3) "
        "and grid (default 1); medians reported",
    )
    parser.add_argument(
        "--stream-above-mb",
        type=float,
        help="large: streaming threshold of the parties and the clients in MiB (default: "
        "theirs, 16 and 64, or half a full share when d would not stream at those)",
    )
    parser.add_argument(
        "--large-timeout-s",
        type=float,
        help="large: time limit of each client and of the collector (default 600 s + 20 ns "
        "per coordinate uploaded)",
    )
    parser.add_argument(
        "--costs-from",
        metavar="PATH",
        help="cost1e9: a previous run's JSON, for the per-coordinate costs this run did not "
        "measure",
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
        given_dims = [parse_count(x) for x in args.dims.split(",")] if args.dims else None
        given_clients = [parse_count(x) for x in args.clients.split(",")] if args.clients else None
        dims = given_dims or list(QUICK_DIMS if args.quick else FULL_DIMS)
        clients = given_clients or list(QUICK_CLIENTS if args.quick else FULL_CLIENTS)
        base = load_base_config(args.config)
        if args.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
        if args.repeats is not None and args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        if args.stream_above_mb is not None and not args.stream_above_mb > 0:
            raise ValueError(f"--stream-above-mb must be > 0, got {args.stream_above_mb}")
        check_dims(sections, dims)
        rings = parse_rings(args.rings) if args.rings else (base_ring(base),)
        bases, ring_note = ring_bases(base, rings, room_for_clients(base))
        costs_from = json.loads(Path(args.costs_from).read_text()) if args.costs_from else {}
    except (ValueError, OSError, MpcAggError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    all_dims = sorted(set(dims))
    dims = small_dims(all_dims)  # every section but large

    def repeats(section: str) -> int:
        return args.repeats if args.repeats is not None else SECTION_REPEATS[section]

    def cells(section: str) -> list[tuple[int, int]]:
        given = given_dims if section == "large" or not given_dims else small_dims(given_dims)
        return section_cells(section, given_clients, given, args.quick)

    min_total_s = 0.2 if args.quick else 1.0
    progress = Progress()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {
            "sections": list(sections),
            "quick": args.quick,
            "dims": all_dims,
            "clients": sorted(set(clients)),
            "config": args.config,
            "fsync": bool(base.get("fsync", True)),
            "concurrency": args.concurrency,
            "cell_budget_s": args.cell_budget_s,
            "flower_timeout_s": args.flower_timeout_s,
            "seed": args.seed,
            "rings": list(rings),
            "ring_encoding_note": ring_note,
            "encodings": {r: doc.get("encoding") for r, doc in bases.items()},
            "repeats": args.repeats,
            "stream_above_mb": args.stream_above_mb,
            "costs_from": args.costs_from,
        },
        **{
            k: []
            for k in (
                "client",
                "ingest",
                "seed_expansion",
                "reveal",
                "uploads",
                "sequential",
                "grid",
                "rss",
                "flower",
                "large",
            )
        },
        "cost1e9": {},
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
    federations = {
        ring: Federation(bases[ring], workdir, progress, name=f"federation-{ring}")
        for ring in rings
    }
    server = PlainServer()
    topologies = {
        ring: Topology.from_dict(topology_document(bases[ring], workdir / "unused"))
        for ring in rings
    }
    progress.line(
        f"mpc_agg bench: sections {', '.join(sections)}; d {', '.join(map(fmt_dim, all_dims))}; "
        f"rings {', '.join(rings)}; workdir {workdir}"
    )
    if ring_note:
        progress.line(f"note: {ring_note}")

    def stop_federations() -> None:
        for fed in federations.values():
            fed.stop()

    def log_tails() -> str:
        return "\n".join(f"[{r}]\n{f.log_tail()}" for r, f in federations.items())

    def failed(section: str, exc: BaseException) -> None:
        results["failures"].append(one_line(f"{section}: {type(exc).__name__}: {exc}"))
        progress.line(f"{section}: FAILED: {type(exc).__name__}: {exc}")
        if not isinstance(exc, LaunchError):
            progress.line(f"the parties' last output:\n{log_tails()}")

    code = 0
    rss_pids: list[int] = []
    try:
        if "client" in sections:
            results["client"] = bench_client(topologies, dims, min_total_s, progress)
            show(client_table(results["client"]))
            save()
        if "ingest" in sections:
            results["ingest"], results["seed_expansion"] = bench_ingest(
                bases, workdir, dims, min_total_s, progress
            )
            show(ingest_table(results["ingest"], results["seed_expansion"]))
            save()
        if "reveal" in sections:
            try:
                results["reveal"] = bench_reveal(
                    federations, dims, progress, timeout_s=max(600.0, args.cell_budget_s)
                )
                show(reveal_table(results["reveal"]))
            except Exception as exc:  # noqa: BLE001 - reported, and the exit status is 1
                failed("reveal", exc)
            save()
        if "uploads" in sections:
            try:
                results["uploads"] = bench_uploads(
                    federations,
                    workdir,
                    progress,
                    seed=args.seed,
                    timeout_s=600.0,
                    repeats=repeats("uploads"),
                )
                show(uploads_table(results["uploads"]))
            except Exception as exc:  # noqa: BLE001 - reported, and the exit status is 1
                failed("uploads", exc)
            save()
        if "sequential" in sections:
            try:
                results["sequential"] = bench_sequential(
                    federations,
                    cells("sequential"),
                    progress,
                    seed=args.seed,
                    repeats=repeats("sequential"),
                    timeout_s=max(600.0, args.cell_budget_s),
                )
                show(sequential_table(results["sequential"]))
            except Exception as exc:  # noqa: BLE001 - reported, and the exit status is 1
                failed("sequential", exc)
            save()
        if "grid" in sections:
            if any(fed.fed is not None for fed in federations.values()):
                # Fresh processes: memory an aggregator kept from the earlier sections'
                # largest rounds would otherwise count in the first cells' peak RSS.
                progress.line("grid: restarting the federations for fresh processes")
                for fed in federations.values():
                    fed.stop()
                    fed.fed = None
            bench_grid(
                federations,
                server,
                workdir,
                grid_cells(clients, dims),
                args,
                progress,
                save,
                results["grid"],
                repeats=repeats("grid"),
            )
            show(grid_table(results["grid"]))
        stop_federations()
        server.stop()
        if "rss" in sections:
            try:
                results["rss"], pids = bench_rss(
                    bases,
                    workdir,
                    cells("rss"),
                    progress,
                    seed=args.seed,
                    concurrency=args.concurrency,
                    timeout_s=max(600.0, args.cell_budget_s),
                )
                rss_pids.extend(pids)
                show(rss_table(results["rss"]))
            except Exception as exc:  # noqa: BLE001 - reported, and the exit status is 1
                failed("rss", exc)
            save()
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
        if "large" in sections:
            results["large"] = bench_large(
                bases,
                workdir,
                cells("large"),
                progress,
                seed=args.seed,
                stream_above_mb=args.stream_above_mb,
                timeout_s=args.large_timeout_s,
            )
            show(large_table(results["large"]))
            save()
        if "cost1e9" in sections:
            merged = {
                k: results.get(k) or costs_from.get(k, [])
                for k in ("client", "ingest", "reveal", "large")
            }
            results["cost1e9"] = bench_cost(merged, rings)
            show(cost_table(results["cost1e9"]))
            save()
        if len(rings) > 1:
            show(rings_table(results, rings))
        results["failures"] += [
            f"{key} {r['clients']} x {fmt_dim(r['dim'])} [{r.get('ring', rings[0])}]: {r['reason']}"
            for key in ("grid", "large")
            for r in results[key]
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
        stop_federations()
        server.stop()
        results["machine"]["loadavg_at_end"] = (
            list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        )
        results["machine"]["bench_peak_rss_bytes"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        results["machine"]["elapsed_s"] = time.perf_counter() - progress.started
        results["processes"] = {
            "aggregators": [p for f in federations.values() for p in f.started_pids] + rss_pids,
            "plain_http_server": server.started_pids,
        }
        save()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    progress.line(f"done in {time.perf_counter() - progress.started:.1f} s")
    return code
