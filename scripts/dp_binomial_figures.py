#!/usr/bin/env python
"""How much noise the joint binomial mechanism needs, against the central Gaussian reference.

    python scripts/dp_binomial_figures.py [--json] [--delta 1e-5]

For each dimension d in {1, 10, 50} and epsilon in {0.5, 1, 2} (l2_clip = 1, frac_bits = 0,
so delta2 = 1 + sqrt(d) encoded units), calibrates the smallest even number of trials B
such that Bin(B, 1/2) - B/2 on every coordinate is (epsilon, delta)-DP by the exact PLD
accounting of mpc_agg.dp.binomial. Prints the noise std sqrt(B/4), the RDP-calibrated
Gaussian sigma for the same delta2 (mpc_agg.dp.calibration.calibrate_gaussian), their ratio
against the target 1.15, the secure random bits B * d the round costs, and the wall time of
the calibration from cold caches. Sensitivities above MAX_DELTA2 are refused by the
accounting; such rows print the reason. Table (or, with --json, a JSON list) on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence

from mpc_agg.dp.binomial import binomial_bits, calibrate_binomial, clear_caches
from mpc_agg.dp.calibration import calibrate_gaussian, sensitivities
from mpc_agg.errors import ConfigError

DIMENSIONS = (1, 10, 50)
EPSILONS = (0.5, 1.0, 2.0)
L2_CLIP = 1.0
FRAC_BITS = 0
TARGET = 1.15


def row(eps: float, delta: float, d: int) -> dict[str, object]:
    """One grid point; ``trials`` is None (and ``refused`` the reason) when refused."""
    _, delta2 = sensitivities(L2_CLIP, FRAC_BITS, d)
    sigma = calibrate_gaussian(eps, delta, delta2)
    out: dict[str, object] = {
        "epsilon": eps,
        "delta": delta,
        "l2_clip": L2_CLIP,
        "frac_bits": FRAC_BITS,
        "d": d,
        "delta2": delta2,
        "gaussian_sigma": sigma,
    }
    clear_caches()
    start = time.perf_counter()
    try:
        trials = calibrate_binomial(eps, delta, delta2, d)
    except ConfigError as exc:
        return out | {"trials": None, "refused": str(exc)}
    seconds = time.perf_counter() - start
    std = math.sqrt(trials / 4.0)
    return out | {
        "trials": trials,
        "binomial_std": std,
        "ratio": std / sigma,
        "target": TARGET,
        "met": std / sigma <= TARGET,
        "bits": binomial_bits(trials, d),
        "seconds": seconds,
    }


def table(rows: Sequence[dict[str, object]]) -> str:
    head = (
        f"{'eps':>5} {'d':>4} {'delta2':>7} {'B':>7} {'binom std':>10} {'gauss sigma':>12} "
        f"{'ratio':>7} {'target':>7} {'met':>4} {'bits':>9} {'time s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        left = f"{r['epsilon']:>5g} {r['d']:>4} {r['delta2']:>7.3f}"
        if r["trials"] is None:
            lines.append(f"{left}  refused: {r['refused']}")
            continue
        lines.append(
            f"{left} {r['trials']:>7} {r['binomial_std']:>10.3f} {r['gaussian_sigma']:>12.3f} "
            f"{r['ratio']:>7.4f} {r['target']:>7.2f} {'yes' if r['met'] else 'NO':>4} "
            f"{r['bits']:>9,} {r['seconds']:>7.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dp_binomial_figures.py",
        description=(
            "Tabulate the joint binomial mechanism's calibrated trials and noise against the "
            "RDP-calibrated Gaussian at the same (epsilon, delta) and L2 sensitivity."
        ),
        epilog="All noise scales are in encoded integer units (frac_bits = 0: 1 unit = 1).",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list, not a table")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta (default 1e-5)")
    args = parser.parse_args(argv)

    # Pay dp-accounting's import once, outside the timed calibrations.
    import dp_accounting.pld.privacy_loss_distribution  # noqa: F401

    rows = []
    try:
        for d in DIMENSIONS:
            for eps in EPSILONS:
                rows.append(row(eps, args.delta, d))
                print(f"  d={d} eps={eps:g} done", file=sys.stderr)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(
            f"delta={args.delta:g}  l2_clip={L2_CLIP:g}  frac_bits={FRAC_BITS}  "
            f"ratio = sqrt(B/4) / gaussian sigma, target {TARGET}"
        )
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
