#!/usr/bin/env python
"""Start every aggregator of a topology on this machine: ``mpc-agg launch`` (see
mpc_agg/cli/launch.py), kept under this name for scripts and tests that call it.

    python scripts/launch_local.py [TOPOLOGY]        (default: configs/local-3.yaml)
"""

import sys

from mpc_agg.cli.launch import main

if __name__ == "__main__":
    sys.exit(main())
