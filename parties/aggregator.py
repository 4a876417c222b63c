#!/usr/bin/env python
"""Run one aggregator party: python parties/aggregator.py --config CONFIG --index I --party-dir DIR

See ``--help``; the implementation is :mod:`mpc_agg.party`.
"""

import sys

from mpc_agg.party import main

if __name__ == "__main__":
    sys.exit(main())
