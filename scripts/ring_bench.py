#!/usr/bin/env python
"""``python scripts/ring_bench.py micro|e2e``: the A/B of the two share rings (``gf_p61``
against ``z2_32``; README, "Cost model and performance": compact shares), now sections of
:mod:`scripts.benchmark` run with ``--rings gf_p61,z2_32``. A thin wrapper kept for the
README's commands:

    micro: python -m scripts.benchmark --only client,ingest,reveal --rings gf_p61,z2_32 \\
               --dims 1e6
    e2e:   python -m scripts.benchmark --only grid --rings gf_p61,z2_32 --clients 10,100 \\
               --dims 1e6 --repeats 3

Further options (``--json PATH``, ...) are passed on. Both rings use frac_bits 16 and
coord_clip 1 (the default encoding does not fit z2_32), with TLS and tokens; the summary
table puts them side by side.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the checkout's root, where the scripts package lives
    sys.path.insert(0, str(ROOT))

from scripts.benchmark.cli import main  # noqa: E402

RINGS = ["--rings", "gf_p61,z2_32"]

MODES = {
    "micro": ["--only", "client,ingest,reveal", *RINGS, "--dims", "1e6"],
    "e2e": ["--only", "grid", *RINGS, "--clients", "10,100", "--dims", "1e6", "--repeats", "3"],
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in MODES:
        print(f"usage: {sys.argv[0]} micro|e2e [benchmark options]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main([*MODES[sys.argv[1]], *sys.argv[2:]]))
