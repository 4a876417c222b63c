#!/usr/bin/env python
"""The demo, as before the ``mpc-agg`` command: ``mpc-agg demo`` (mpc_agg/cli/demo.py)."""

import sys

from mpc_agg.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
