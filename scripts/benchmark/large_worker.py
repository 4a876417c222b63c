"""One client or the collector of the ``large`` section, in its own process (so that its peak
memory is its own):

    python -m scripts.benchmark.large_worker submit --deployment DIR --round R --index I \\
        --dim D --seed S --frac-bits F [--stream-above-bytes N] [--timeout-s T]
    python -m scripts.benchmark.large_worker collect --deployment DIR --round R \\
        --out PATH.npy [--timeout-s T]

``DIR`` is a local deployment's directory (:meth:`mpc_agg.provision.LocalDeployment.open`:
the provisioned topology and the party directories, for the tokens). ``submit`` makes
client ``I``'s exact input (:func:`..workload.client_input`, held in memory) and submits it
with ``Client.submit`` (which streams a full share above ``N`` bytes); ``collect`` closes
the round and streams its total into the memory-mapped ``.npy`` at ``PATH``
(``Collector.aggregate(..., out=PATH)``). Either prints ``READY`` once set up (imports done,
the input made) and waits for a line on its standard input before it starts, so that the
clients start together and start-up is not timed; then one JSON line: its timings in
seconds, its ``VmRSS`` after start-up and its peak ``VmHWM`` in bytes, and what it sent or
received. Exit status 0, or 1 with the error on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .procs import process_memory
from .workload import client_input, client_name


def wait_for_go() -> None:
    """Say ``READY`` and wait for the section's go (a line on standard input)."""
    print("READY", flush=True)
    if not sys.stdin.readline():
        raise RuntimeError("the section closed standard input before saying go")


def submit(args: argparse.Namespace) -> dict[str, Any]:
    """Client ``args.index``'s input, made and submitted; its figures."""
    from mpc_agg.core import codec
    from mpc_agg.core.sharing import ShareKind
    from mpc_agg.provision import LocalDeployment

    deployment = LocalDeployment.open(args.deployment)
    topology = deployment.topology()
    started = process_memory().get("VmRSS")
    t0 = time.perf_counter()
    x = client_input(args.seed, args.index, args.dim, args.frac_bits)
    t1 = time.perf_counter()
    options: dict[str, Any] = {"timeout_s": args.timeout_s}
    if args.stream_above_bytes is not None:
        options["stream_above_bytes"] = args.stream_above_bytes
    client = deployment.client(client_name(args.index), **options)
    full_bytes = codec.share_body_length(ShareKind.FULL, args.dim, topology.encoding.ring)
    ready = process_memory().get("VmRSS")
    wait_for_go()
    t2 = time.perf_counter()
    try:
        receipt = client.submit(args.round, x)
    finally:
        client.close()
    t3 = time.perf_counter()
    return {
        "index": args.index,
        "generate_s": t1 - t0,
        "submit_s": t3 - t2,
        "upload_bytes": receipt.upload_bytes,
        "full_share_bytes": full_bytes,
        "streamed": full_bytes > client.stream_above_bytes,
        "rss_start_bytes": started,
        "rss_ready_bytes": ready,
        "peak_rss_bytes": process_memory().get("VmHWM"),
    }


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """The round closed and its total streamed into ``args.out``; the collector's figures."""
    from mpc_agg.provision import LocalDeployment

    deployment = LocalDeployment.open(args.deployment)
    started = process_memory().get("VmRSS")
    collector = deployment.collector(timeout_s=args.timeout_s)
    wait_for_go()
    t0 = time.perf_counter()
    result = collector.aggregate(args.round, timeout=args.timeout_s, out=args.out)
    t1 = time.perf_counter()
    return {
        "aggregate_s": t1 - t0,
        "num_clients": result.num_clients,
        "dim": int(result.total.shape[0]),
        "timings": dict(result.timings),
        "rss_start_bytes": started,
        "peak_rss_bytes": process_memory().get("VmHWM"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="a client or the collector of the large section")
    sub = parser.add_subparsers(dest="role", required=True)
    for role in ("submit", "collect"):
        p = sub.add_parser(role)
        p.add_argument("--deployment", required=True, help="the local deployment's directory")
        p.add_argument("--round", required=True, help="the round id")
        p.add_argument("--timeout-s", type=float, default=3600.0, help="request timeout")
        if role == "submit":
            p.add_argument("--index", type=int, required=True, help="the client's number")
            p.add_argument("--dim", type=int, required=True, help="vector length")
            p.add_argument("--seed", type=int, required=True, help="seed of the inputs")
            p.add_argument("--frac-bits", type=int, required=True, help="the encoding's")
            p.add_argument("--stream-above-bytes", type=int, help="Client(stream_above_bytes=...)")
        else:
            p.add_argument("--out", required=True, help="the .npy to write the total to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        figures = submit(args) if args.role == "submit" else collect(args)
    except Exception as exc:  # noqa: BLE001 - reported to the section, which fails the cell
        print(f"{args.role}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
