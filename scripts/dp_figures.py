#!/usr/bin/env python
"""How much more noise the distributed discrete Gaussian adds than the central Gaussian.

    python scripts/dp_figures.py [--json] [--m 3] [--t 1] [--delta 1e-5]

For each epsilon in {0.5, 1, 2, 4}, frac_bits in {8, 16} and dimension d in {1e3, 1e5, 1e6}
(l2_clip = 1), calibrates the variance parameter sigma2 that each of the m aggregators adds
so that the m - t honest ones alone meet the target (mpc_agg.dp.calibration.calibrate_ddg);
the revealed total carries noise of standard deviation sqrt(m sigma2) encoded units. Prints
that over the RDP-calibrated Gaussian sigma for the same L2 sensitivity, next to the target
1.05 sqrt(m / (m - t)) (the factor sqrt(m / (m - t)) is the price of not trusting t
aggregators; 1.05 allows 5 % for rounding and the sum's own bound). Progress goes to
stderr; the table (or, with --json, a JSON list) to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from mpc_agg.dp.calibration import calibrate_ddg, calibrate_gaussian, sensitivities
from mpc_agg.errors import ConfigError

EPSILONS = (0.5, 1.0, 2.0, 4.0)
FRAC_BITS = (8, 16)
DIMENSIONS = (10**3, 10**5, 10**6)
L2_CLIP = 1.0
SLACK = 1.05


def row(eps: float, delta: float, frac_bits: int, d: int, m: int, t: int) -> dict[str, object]:
    """One grid point: calibrated noise, both scales in encoded units, ratio and target."""
    delta1, delta2 = sensitivities(L2_CLIP, frac_bits, d)
    sigma2 = calibrate_ddg(eps, delta, delta1, delta2, d, m - t)
    sigma = calibrate_gaussian(eps, delta, delta2)
    total_std = math.sqrt(sigma2 * m)
    ratio = total_std / sigma
    target = SLACK * math.sqrt(m / (m - t))
    return {
        "epsilon": eps,
        "delta": delta,
        "l2_clip": L2_CLIP,
        "frac_bits": frac_bits,
        "d": d,
        "m": m,
        "t": t,
        "delta1": delta1,
        "delta2": delta2,
        "sigma2_per_party": sigma2,
        "ddg_total_std": total_std,
        "gaussian_sigma": sigma,
        "ratio": ratio,
        "target": target,
        "met": ratio <= target,
    }


def table(rows: Sequence[dict[str, object]]) -> str:
    head = (
        f"{'eps':>5} {'frac':>4} {'d':>9} {'delta2':>10} {'sigma2/party':>12} "
        f"{'ddg std':>12} {'gauss sigma':>12} {'ratio':>7} {'target':>7}  met"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['epsilon']:>5g} {r['frac_bits']:>4} {r['d']:>9.0e} {r['delta2']:>10.1f} "
            f"{r['sigma2_per_party']:>12.4e} {r['ddg_total_std']:>12.5e} "
            f"{r['gaussian_sigma']:>12.5e} {r['ratio']:>7.4f} {r['target']:>7.4f}  "
            f"{'yes' if r['met'] else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dp_figures.py",
        description=(
            "Tabulate the distributed discrete Gaussian mechanism's total noise against the "
            "RDP-calibrated Gaussian at the same (epsilon, delta) and L2 sensitivity."
        ),
        epilog="All noise scales are in encoded integer units (1 unit = 2**-frac_bits).",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list, not a table")
    parser.add_argument("--m", type=int, default=3, help="number of aggregators (default 3)")
    parser.add_argument("--t", type=int, default=1, help="aggregators that may collude (default 1)")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta (default 1e-5)")
    args = parser.parse_args(argv)
    if not 0 <= args.t < args.m:
        print(f"error: need 0 <= --t < --m, got t={args.t} m={args.m}", file=sys.stderr)
        return 2

    grid = [(e, f, d) for e in EPSILONS for f in FRAC_BITS for d in DIMENSIONS]
    rows = []
    tty = sys.stderr.isatty()
    try:
        for i, (eps, frac_bits, d) in enumerate(grid, 1):
            rows.append(row(eps, args.delta, frac_bits, d, args.m, args.t))
            if tty:
                sys.stderr.write(f"\r  calibrating {i}/{len(grid)}")
                sys.stderr.flush()
    except ConfigError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    if tty:
        sys.stderr.write("\n")

    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        target = SLACK * math.sqrt(args.m / (args.m - args.t))
        print(
            f"delta={args.delta:g}  l2_clip={L2_CLIP:g}  m={args.m}  t={args.t}  "
            f"target ratio = {SLACK} * sqrt(m/(m-t)) = {target:.4f}"
        )
        print(table(rows))
    met = sum(bool(r["met"]) for r in rows)
    print(f"{met}/{len(rows)} grid points meet the target", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
