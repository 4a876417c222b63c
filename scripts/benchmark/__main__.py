"""``python -m scripts.benchmark``: run the benchmark (see :mod:`scripts.benchmark.cli`)."""

import sys

from scripts.benchmark.cli import main

sys.exit(main())
