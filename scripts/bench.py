#!/usr/bin/env python
"""``python scripts/bench.py [options]``: the benchmark, as ``python -m scripts.benchmark``.

A thin wrapper kept for the README's command; the code is the :mod:`scripts.benchmark`
package (``python scripts/bench.py --help`` lists the sections and options).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the checkout's root, where the scripts package lives
    sys.path.insert(0, str(ROOT))

from scripts.benchmark.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
