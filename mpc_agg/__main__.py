"""``python -m mpc_agg``: the ``mpc-agg`` command (:mod:`mpc_agg.cli`)."""

import sys

from mpc_agg.cli import main

sys.exit(main())
