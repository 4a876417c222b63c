#!/usr/bin/env python
"""Round time against network latency, on the namespace lab of ``scripts/netns_lab.py``.

    sudo .venv/bin/python -m scripts.wan_bench [--delays 0,10,25,50] [--dims 1000,100000]
                                                [--clients 10] [--repeats 3] [--rate-mbit 100]

README, "Cost model and performance". For each one-way latency ``L`` the lab is built
afresh (three aggregators and a clients' host, each in its own namespace, ``L`` on every
path, ``--rate-mbit`` per host uplink), a federation provisioned as three organisations
would (``mpc-agg keygen`` / ``assemble`` / ``token``) and started with ``mpc-agg party``;
then, from the clients' host, one warm-up round and ``--repeats`` timed rounds per vector
length: open, every client submits at once, collect (close, reveal, every statement
checked). Prints the median time of each phase, then the least-squares slope of round time
against the round-trip time ``2L``: the number of round trips a round costs, to compare with
:data:`MODEL_RTTS` (derived in the README from the protocol).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from scripts import netns_lab

CONFIG = netns_lab.ROOT / "configs" / "local-3.yaml"

MODEL_RTTS = {
    "open": 3,  # TCP + TLS 1.3 handshakes, then PUT at all aggregators at once
    "submit": 3,  # the same per client, its shares to all aggregators at once
    "collect": 8,  # close (3) + party protocol (4 one-way = 2) + result poll (~1-2)
    # + statements from the two followers on new connections (3) - overlap
}
"""Round trips per phase for small vectors (README, "Cost model and performance")."""


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``: ``(a, b)``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def run(
    delays: list[float],
    dims: list[int],
    clients: int,
    repeats: int,
    rate_mbit: float,
    config: Path,
) -> dict[tuple[float, int], dict[str, float]]:
    """Median phase times per (one-way delay ms, dim)."""
    ids = [f"c{k}" for k in range(clients)]
    out: dict[tuple[float, int], dict[str, float]] = {}
    for delay in delays:
        with (
            tempfile.TemporaryDirectory(prefix="wan-bench-") as tmp,
            netns_lab.federation(
                Path(tmp), config, clients=ids, delay_ms=delay, rate_mbit=rate_mbit
            ) as fed,
        ):
            print(f"# L = {delay:g} ms: lab up ({fed.lab.model} links)", file=sys.stderr)

            def one_round(round_id: str, dim: int) -> dict[str, float]:
                argv = [sys.executable, "-m", "scripts.netns_lab", "round", "-t",
                        str(fed.topology), "--collector-tokens", str(fed.collector_grants),
                        "--round", round_id, "--dim", str(dim), "--client-tokens",
                        *(str(fed.client_grants(c)) for c in ids)]  # fmt: skip
                result: dict[str, float] = json.loads(fed.in_clients(argv, timeout=300))
                return result

            one_round("warm-up", dims[0])  # ARP, the parties' first-round paths
            for dim in dims:
                runs = [one_round(f"r{dim}-{k}", dim) for k in range(repeats)]
                medians = {
                    key: statistics.median(r[key] for r in runs)
                    for key in ("open_s", "submit_s", "collect_s", "round_s")
                }
                out[(delay, dim)] = medians
                print(
                    f"#   d = {dim}: round {medians['round_s']:.3f} s "
                    f"(max error {max(r['max_error'] for r in runs):.2e})",
                    file=sys.stderr,
                )
    return out


def report(
    results: dict[tuple[float, int], dict[str, float]], clients: int, rate_mbit: float
) -> str:
    """The table (milliseconds) and the fitted round trips per round."""
    delays = sorted({k[0] for k in results})
    dims = sorted({k[1] for k in results})
    lines = [
        f"{clients} clients, 3 aggregators, {rate_mbit:g} Mbit/s per host; median of the "
        "timed rounds, ms (open / submit / collect = round)",
        "",
        "| one-way L | RTT | " + " | ".join(f"d = {d:,}" for d in dims) + " |",
        "|---|---|" + "---|" * len(dims),
    ]
    for delay in delays:
        cells = []
        for dim in dims:
            r = results[(delay, dim)]
            cells.append(
                f"{1e3 * r['open_s']:.0f} / {1e3 * r['submit_s']:.0f} / "
                f"{1e3 * r['collect_s']:.0f} = **{1e3 * r['round_s']:.0f}**"
            )
        lines.append(f"| {delay:g} ms | {2 * delay:g} ms | " + " | ".join(cells) + " |")
    lines += ["", "round trips per round (least-squares slope of time against RTT):", ""]
    model = sum(MODEL_RTTS.values())
    for dim in dims:
        rtts = [2 * d / 1e3 for d in delays]
        parts = []
        for phase in ("open_s", "submit_s", "collect_s", "round_s"):
            base, slope = _fit(rtts, [results[(d, dim)][phase] for d in delays])
            parts.append(f"{phase[:-2]} {slope:.1f}")
            if phase == "round_s":
                parts.append(f"(intercept {1e3 * base:.0f} ms)")
        lines.append(f"- d = {dim:,}: " + ", ".join(parts) + f"; model for small d: {model}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[2])
    parser.add_argument("--delays", default="0,10,25,50", help="one-way latencies, ms")
    parser.add_argument("--dims", default="1000,100000", help="vector lengths")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--config", type=Path, default=CONFIG, help="topology template")
    args = parser.parse_args(argv)
    reason = netns_lab.unavailable()
    if reason is not None:
        print(f"error: the namespace lab cannot run here: {reason}", file=sys.stderr)
        return 2
    results = run(
        [float(x) for x in args.delays.split(",")],
        [int(x) for x in args.dims.split(",")],
        args.clients,
        args.repeats,
        args.rate_mbit,
        args.config,
    )
    print(report(results, args.clients, args.rate_mbit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
