#!/usr/bin/env python
"""Flower's SecAgg+ as a baseline: one secure-aggregation round of N clients x D floats.

    python scripts/flower_secaggplus.py --clients 10 --dim 100000 [--json]

Runs Flower's own server workflow (``DefaultWorkflow`` with ``SecAggPlusWorkflow`` as its fit
workflow, legacy ``FedAvg``) and N ``ClientApp``s with Flower's ``secaggplus_mod``, all in
this process over :class:`mpc_agg.integrations.flower_local.InProcessGrid` (no Ray, no
SuperLink, no network, clients one after another in this thread). Each client contributes a
float64 vector of D standard normal values (seeded); the aggregate is checked against the
numpy sum.

Measured (``seconds``): the wall time of the SecAgg+ round, i.e. the four protocol stages
(setup: key pairs; share keys: Shamir shares of two secrets, encrypted per neighbour;
collect masked vectors: quantise, mask, upload; unmask: server rebuilds and removes the
masks) plus Flower's ``aggregate_fit``. It is all client work plus all server work, since
both run here; ``client_seconds`` is the part spent inside ClientApp calls. Data generation
and process start-up are not timed; no model is sent to clients (empty initial parameters).

Flower computes a weighted mean (weight = num_examples / max_weight); every client reports
weight 1 and max_weight is 1, so the mean times N is the sum. Values are clipped to
[-clipping_range, clipping_range] and stochastically rounded to 2^22 levels, so each client
adds up to one quantisation step 2 * clipping_range / 2^22 of error per element.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

FLOWER_DEFAULT_CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**22  # Flower's default quantization_range
MODULUS_RANGE = 2**32  # Flower's default (and largest allowed) modulus_range
MAX_SHARES_BY_DEFAULT = 11
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time one Flower SecAgg+ round (SecAggPlusWorkflow + secaggplus_mod, all in this "
            "process over an in-memory grid) of N clients x D float64 values, and check the "
            "aggregate against the numpy sum. 'seconds' is the wall time of the round: all "
            "client work plus all server work (four SecAgg+ stages and Flower's "
            "aggregate_fit), without data generation."
        ),
    )
    parser.add_argument("--clients", type=int, required=True, help="number of clients N (>= 3)")
    parser.add_argument("--dim", type=int, required=True, help="vector length D per client")
    parser.add_argument(
        "--num-shares",
        type=int,
        default=None,
        help=(
            f"SecAgg+ neighbourhood size: each client Shamir-shares its secrets among this "
            f"many clients, itself included (default min(N, {MAX_SHARES_BY_DEFAULT}); "
            f"odd unless N; Flower's cost grows with it; N shares make it plain SecAgg)"
        ),
    )
    parser.add_argument(
        "--reconstruction-threshold",
        type=int,
        default=None,
        help="shares needed to rebuild a secret (default num_shares // 2 + 1, a majority)",
    )
    parser.add_argument(
        "--clipping-range",
        type=float,
        default=None,
        help=(
            f"values are clipped to [-c, c] before quantisation (default "
            f"{FLOWER_DEFAULT_CLIPPING_RANGE:g}, Flower's, or the next power of two above "
            f"the largest |value| if that does not fit)"
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the client data (default 0)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last stdout line"
    )
    parser.add_argument("--verbose", action="store_true", help="show Flower's INFO/DEBUG logs")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """A message naming the first bad option and its value, or None."""
    if args.clients < 3:
        return f"--clients must be >= 3 (Flower needs num_shares > 2), got {args.clients}"
    if args.clients * QUANTIZATION_RANGE >= MODULUS_RANGE:
        return (
            f"--clients must be < {MODULUS_RANGE // QUANTIZATION_RANGE} (N * 2^22 must stay "
            f"below Flower's modulus 2^32), got {args.clients}"
        )
    if args.dim < 1:
        return f"--dim must be >= 1, got {args.dim}"
    if not 2 < args.num_shares <= args.clients:
        return f"--num-shares must be in [3, --clients={args.clients}], got {args.num_shares}"
    if args.num_shares < args.clients and args.num_shares % 2 == 0:
        # SecAggPlusWorkflow sends the even count to the clients, then widens each
        # neighbourhood to count + 1 and the clients' share lists run out (IndexError).
        return f"--num-shares must be odd when below --clients, got {args.num_shares}"
    if not 2 <= args.reconstruction_threshold < args.num_shares:
        return (
            f"--reconstruction-threshold must be in [2, num_shares={args.num_shares}), "
            f"got {args.reconstruction_threshold}"
        )
    if args.clipping_range is not None and not args.clipping_range > 0:
        return f"--clipping-range must be > 0, got {args.clipping_range}"
    return None


def pick_clipping_range(max_abs: float, requested: float | None) -> float:
    """Flower's default 8.0 when the data fit in it, else the next power of two above."""
    if requested is not None:
        return requested
    if max_abs <= FLOWER_DEFAULT_CLIPPING_RANGE:
        return FLOWER_DEFAULT_CLIPPING_RANGE
    return float(2 ** math.ceil(math.log2(max_abs)))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (data generation included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def run_round(args: argparse.Namespace, vectors: np.ndarray, clipping_range: float) -> dict:
    """Run one SecAgg+ round over an InProcessGrid; return the mean and the timings."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.serverapp import ServerApp

    from mpc_agg.integrations.flower_local import InProcessGrid, run_server_app

    num_clients = vectors.shape[0]

    class Contributor(NumPyClient):
        """Returns its precomputed vector with weight 1 (``num_examples``)."""

        def __init__(self, partition_id: int) -> None:
            self.partition_id = partition_id

        def fit(self, parameters: list, config: dict) -> tuple[list, int, dict]:
            return [vectors[self.partition_id]], 1, {}

    def client_fn(context: Any) -> Any:
        return Contributor(int(context.node_config["partition-id"])).to_client()

    client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    grid = InProcessGrid(client_app, num_clients)
    stage_seconds: dict[str, float] = {}
    stage_client_seconds: dict[str, float] = {}
    stage_ok: dict[str, bool] = {}

    def timed(name: str, stage: Callable[..., bool]) -> Callable[..., bool]:
        def run(*stage_args: Any) -> bool:
            client_before = grid.client_seconds
            started = time.perf_counter()
            try:
                stage_ok[name] = stage(*stage_args)
                return stage_ok[name]
            finally:
                stage_seconds[name] = time.perf_counter() - started
                stage_client_seconds[name] = grid.client_seconds - client_before

        return run

    workflow = SecAggPlusWorkflow(
        num_shares=args.num_shares,
        reconstruction_threshold=args.reconstruction_threshold,
        max_weight=1.0,  # weight 1 per client: q_ratio = 2^22, no rescaling of values
        clipping_range=clipping_range,
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
    )
    # Time each of Flower's stage methods as they are (they are looked up on the instance).
    for name in STAGES:
        method = f"{name}_stage"
        setattr(workflow, method, timed(name, getattr(workflow, method)))
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        strategy = FedAvg(
            fraction_evaluate=0.0,  # no evaluate round: only the aggregation is timed
            min_fit_clients=num_clients,
            min_available_clients=num_clients,
            initial_parameters=ndarrays_to_parameters([]),  # no model to download
        )
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)

    started = time.perf_counter()
    context = run_server_app(server_app, grid)
    total = time.perf_counter() - started

    # A stage that fails makes the workflow log "Secure aggregation halted" and return.
    completed = all(stage_ok.get(name, False) for name in STAGES)
    mean = None
    if completed:
        (mean,) = context.state.array_records["parameters"].to_numpy_ndarrays()
    return {
        "mean": mean,
        "seconds": sum(stage_seconds.values()),
        "client_seconds": sum(stage_client_seconds.values()),
        "stage_seconds": stage_seconds,
        "stage_client_seconds": stage_client_seconds,
        "app_seconds": total,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import flwr
    except ImportError:
        print(
            "flower_secaggplus.py needs Flower: pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    if args.num_shares is None:
        args.num_shares = min(args.clients, MAX_SHARES_BY_DEFAULT)
    if args.reconstruction_threshold is None:
        args.reconstruction_threshold = args.num_shares // 2 + 1
    problem = check_args(args)
    if problem is not None:
        print(f"flower_secaggplus.py: {problem}", file=sys.stderr)
        return 2

    # Flower logs every stage at INFO/DEBUG; without --verbose show only its errors.
    logging.getLogger("flwr").setLevel(logging.DEBUG if args.verbose else logging.ERROR)

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    progress(f"generating {args.clients} x {args.dim} float64 values (seed {args.seed})")
    vectors = np.random.default_rng(args.seed).standard_normal((args.clients, args.dim))
    expected = vectors.sum(axis=0)
    max_abs = float(np.abs(vectors).max())
    clipping_range = pick_clipping_range(max_abs, args.clipping_range)
    if max_abs > clipping_range:
        progress(f"warning: |values| up to {max_abs:.3g} are clipped to {clipping_range:g}")

    progress(
        f"Flower {flwr.__version__} SecAgg+ round: num_shares {args.num_shares}, "
        f"reconstruction_threshold {args.reconstruction_threshold}, "
        f"clipping_range {clipping_range:g}"
    )
    result = run_round(args, vectors, clipping_range)
    if result["mean"] is None:
        progress("the SecAgg+ round halted without an aggregate (rerun with --verbose)")
        return 1
    total = result["mean"] * args.clients
    max_abs_error = float(np.abs(total - expected).max())
    step = 2 * clipping_range / QUANTIZATION_RANGE
    error_bound = args.clients * step  # stochastic rounding: < 1 step per client and element

    record = {
        "clients": args.clients,
        "dim": args.dim,
        "seconds": round(result["seconds"], 4),
        "client_seconds": round(result["client_seconds"], 4),
        "server_seconds": round(result["seconds"] - result["client_seconds"], 4),
        "stage_seconds": {k: round(v, 4) for k, v in result["stage_seconds"].items()},
        "stage_client_seconds": {k: round(v, 4) for k, v in result["stage_client_seconds"].items()},
        "app_seconds": round(result["app_seconds"], 4),
        "max_abs_error": max_abs_error,
        "error_bound": error_bound,
        "num_shares": args.num_shares,
        "reconstruction_threshold": args.reconstruction_threshold,
        "clipping_range": clipping_range,
        "max_abs_value": max_abs,
        "quantization_range": QUANTIZATION_RANGE,
        "modulus_range": MODULUS_RANGE,
        "seed": args.seed,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "flwr_version": flwr.__version__,
    }
    ok = max_abs_error <= error_bound
    if args.json:
        print(json.dumps(record))
    else:
        print(
            f"Flower {record['flwr_version']} SecAgg+: {args.clients} clients x {args.dim} in "
            f"{record['seconds']:.3f} s (clients {record['client_seconds']:.3f} s, server "
            f"{record['server_seconds']:.3f} s); max abs error {max_abs_error:.2e} "
            f"(bound {error_bound:.2e}); num_shares {args.num_shares}, threshold "
            f"{args.reconstruction_threshold}, clipping_range {clipping_range:g}"
        )
    if not ok:
        progress(f"max abs error {max_abs_error:.3g} exceeds the bound {error_bound:.3g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
