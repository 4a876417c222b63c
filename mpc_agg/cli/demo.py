"""``mpc-agg demo``: one secure-aggregation round on a local topology, end to end.

    mpc-agg demo [--topology configs/local-3.yaml] [--clients 20] [--dim 100000]

Starts every aggregator of the topology (separate processes, MPyC over mutually
authenticated TLS on 127.0.0.1, with throw-away keys and tokens the launcher provisions),
opens a round, has simulated clients encode, share and upload random vectors over HTTP,
aggregates, prints the number of clients, the max error of the revealed total against the
true (plaintext) sum and the timings, and stops every process.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

from mpc_agg import Client, MpcAggError
from mpc_agg.cli import common
from mpc_agg.launcher import LaunchError, LocalFederation, describe

DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "configs" / "local-3.yaml"
"""The default template: ``configs/local-3.yaml`` of the source checkout."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo``."""
    parser = common.parser_for(
        sub,
        "demo",
        "start a local federation, run one round of simulated clients, check the total",
        "Start every aggregator of a local topology template (separate processes, party "
        "links over mutually authenticated TLS on this machine, throw-away keys and tokens), "
        "open a round, have simulated clients encode, share and upload random vectors over "
        "HTTPS, aggregate, print the count, the error of the revealed total against the "
        "true sum and the timings, and stop every process. Exit 0 when the total is right.",
        run,
    )
    add_arguments(parser)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run one local secure-aggregation round and check it against the true sum.",
    )
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options."""
    parser.add_argument(
        "--topology",
        "--config",
        dest="config",
        default=str(DEFAULT_TOPOLOGY),
        help="topology template YAML (default: configs/local-3.yaml of this checkout)",
    )
    parser.add_argument("--clients", type=int, default=20, help="simulated clients (default 20)")
    parser.add_argument("--dim", type=int, default=100_000, help="vector length (default 100000)")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="clients uploading at the same time (default 4)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for the simulated data (not for shares, which use the OS CSPRNG)",
    )
    parser.add_argument(
        "--quiet-parties",
        action="store_true",
        help="show only warnings from the aggregator processes",
    )
    parser.add_argument(
        "--adopt-data-dir",
        action="store_true",
        help="start on data directories made by an older version or for a changed "
        "topology, keeping their privacy ledgers (each party says so)",
    )


def progress(done: int, total: int, started: float, nbytes: int) -> None:
    """A progress bar redrawn in place on a terminal; every 25 % otherwise (logs, CI)."""
    tty = sys.stderr.isatty()
    if not tty and done not in (0, total) and (4 * done // total) == (4 * (done - 1) // total):
        return
    elapsed = max(time.perf_counter() - started, 1e-9)
    width = 30
    filled = width * done // total
    bar = "#" * filled + "." * (width - filled)
    sys.stderr.write(
        f"{chr(13) if tty else ''}  uploading [{bar}] {done}/{total} clients"
        f"  {nbytes / elapsed / 1e6:7.1f} MB/s"
    )
    if done == total or not tty:
        sys.stderr.write("\n")
    sys.stderr.flush()


async def run_clients(
    clients: list[Client], round_id: str, data: np.ndarray, concurrency: int
) -> int:
    gate = asyncio.Semaphore(concurrency)
    done = 0
    nbytes = 0
    started = time.perf_counter()
    progress(0, len(clients), started, 0)

    async def one(i: int) -> None:
        nonlocal done, nbytes
        async with gate:
            receipt = await clients[i].submit_async(round_id, data[i])
        done += 1
        nbytes += receipt.upload_bytes
        progress(done, len(clients), started, nbytes)

    await asyncio.gather(*(one(i) for i in range(len(clients))))
    return nbytes


def main(argv: list[str] | None = None) -> int:
    """``scripts/demo.py``: the demo with its own parser."""
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when the revealed total is right."""
    if not Path(args.config).exists():
        print(f"error: no topology at {args.config}; give --topology FILE", file=sys.stderr)
        return 2
    if args.clients < 1 or args.dim < 1:
        print("error: --clients and --dim must be >= 1", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    print(f"Starting the aggregators of {args.config} ...", flush=True)
    try:
        federation = LocalFederation(
            args.config,
            log_level="warning" if args.quiet_parties else "info",
            adopt_data_dir=args.adopt_data_dir,
        )
    except MpcAggError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    topology = federation.topology
    try:
        t = time.perf_counter()
        with federation:
            t_ready = time.perf_counter() - t
            print(f"ready: {describe(topology)} in {t_ready:.2f} s", flush=True)
            round_id = f"demo-{int(time.time() * 1000)}"
            collector = federation.collector()
            collector.open_round(round_id, args.dim)
            lo = -min(1.0, topology.encoding.max_abs_coordinate)
            data = rng.uniform(lo, -lo, size=(args.clients, args.dim))
            clients = [
                federation.client(cid) for cid in (f"client-{i:05d}" for i in range(args.clients))
            ]
            print(f"Round {round_id}: {args.clients} clients x {args.dim} dims", flush=True)
            t = time.perf_counter()
            nbytes = asyncio.run(run_clients(clients, round_id, data, args.concurrency))
            t_upload = time.perf_counter() - t
            t = time.perf_counter()
            result = collector.aggregate(round_id, timeout=600)
            t_aggregate = time.perf_counter() - t
            t = time.perf_counter()
            true_sum = data.sum(axis=0)
            t_plain = time.perf_counter() - t
            # What the clients actually contributed: their vectors after clipping.
            true_sum = np.sum([topology.encoding.clip(x) for x in data], axis=0)
    except (MpcAggError, LaunchError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1

    error = np.abs(result.total - true_sum)
    print()
    print(
        f"clients aggregated : {result.num_clients} (dropped partial uploads: "
        f"{result.dropped_clients})"
    )
    print(f"dimension          : {args.dim}")
    print(f"revealed total[:3] : {np.array2string(result.total[:3], precision=6)}")
    print(f"true sum[:3]       : {np.array2string(true_sum[:3], precision=6)}")
    f = topology.encoding.frac_bits
    print(
        f"max abs error      : {error.max():.3e}  (encoding resolution 2^-{f} = {2.0**-f:.1e}"
        " per client)"
    )
    print(f"mean abs error     : {error.mean():.3e}")
    dp_ok = True
    if result.noise_stddev is not None and topology.dp is not None:
        spread = float(np.std(result.total - true_sum))
        dp_ok = abs(spread / result.noise_stddev - 1) < 0.1 if args.dim >= 1000 else True
        print(
            f"privacy            : {topology.dp.mechanism} noise, epsilon = {result.epsilon:g},"
            f" delta = {result.delta:g} this round"
        )
        print(
            f"budget spent       : epsilon = {result.cumulative_epsilon:.4g} of "
            f"{topology.dp.budget_epsilon:g} (at delta = {result.cumulative_delta:g})"
        )
        print(
            f"noise stddev       : {result.noise_stddev:.4g} announced, {spread:.4g} measured"
            " (error = noise, as intended)"
        )
    print("timings")
    print(f"  start parties    : {t_ready:8.3f} s")
    print(
        f"  encode+share+upload: {t_upload:6.3f} s  ({nbytes / 1e6:.1f} MB sent, "
        f"{args.clients / t_upload:.1f} clients/s)"
    )
    print(
        f"  close+agree+reveal: {t_aggregate:7.3f} s  (leader: agree "
        f"{result.timings.get('agree_s', float('nan')):.3f} s, reveal "
        f"{result.timings.get('reveal_s', float('nan')):.3f} s)"
    )
    print(f"  plaintext numpy sum: {t_plain:6.4f} s  (baseline)")
    exact_ok = result.noise_stddev is not None or error.max() <= 1e-3
    ok = result.num_clients == args.clients and exact_ok and dp_ok
    print("OK" if ok else "MISMATCH: the revealed total is not the true sum")
    return 0 if ok else 1
